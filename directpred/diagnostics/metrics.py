"""Pure metric functions behind the training diagnostics: spectra, eigenspace alignment, collapse signals.

All functions take tensors and return tensors or floats; nothing here keeps state. Notation follows the paper:
F = E[f f^T] is the correlation of the predictor's input f (the projection), ``F = U diag(s_j) U^T`` with the
eigenvalues s_j sorted in *descending* order, and W_p is the (linear) predictor.

* Theorem 3 (eigenspace alignment) predicts that W_p commutes with F, so every eigenvector u_j of F is an
  eigenvector of W_p: the cosine between ``W_p u_j`` and ``u_j`` tends to 1 (the paper's Fig. 2 measure).
* Eq. 14 (the invariant parabola, eta > 0) gives ``s_j ∝ p_j^2``, i.e. ``p_j ∝ sqrt(s_j)`` (DirectPred's Eq.
  18). We pair p_j with s_j through the Rayleigh quotient ``p_j := u_j^T W_p u_j``, which is W_p's eigenvalue
  on u_j once the two are aligned, and report the log-log slope (0.5 for the paper's law) and the Pearson
  correlation of p_j with sqrt(s_j).
* RankMe (Garrido et al., ICML 2023) is the effective rank ``exp(H(sigma / ||sigma||_1))`` of an embedding
  matrix; it is k for k equal singular values and about 1 for a collapsed embedding.
* The per-dimension std of the l2-normalised outputs (SimSiam paper, Chen & He 2021, Fig. 2) is about
  1/sqrt(d) for outputs spread over the sphere and 0 for collapsed (constant) outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from directpred.heads.base import Predictor
from directpred.heads.directpred import PartitionedDirectPred
from directpred.heads.mlp import MLP
from directpred.linalg import symmetric_part


def eigen_spectrum(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of the symmetric part of ``M`` (d, d), in float64; all
    NaN when ``M`` holds a NaN or an infinity (a diverged run: ``eigh`` would raise), so that every metric built on
    them is NaN, the module's "no value" (a null in the log), instead of an exception that loses the run's report.

    Examples:
        >>> s, U = eigen_spectrum(torch.diag(torch.tensor([1.0, 3.0])))
        >>> s.tolist()
        [3.0, 1.0]
    """
    A = symmetric_part(M.detach().double())
    if not bool(torch.isfinite(A).all()):
        return A.new_full(A.shape[:1], math.nan), A.new_full(A.shape, math.nan)
    s, U = torch.linalg.eigh(A)
    return s.flip(0), U.flip(1)


def cosines_along(W_p: torch.Tensor, U: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine between ``W_p u_j`` and ``u_j`` for every column u_j of ``U`` (the paper's Fig. 2 measure; the same
    quantity from F itself, in numpy, is :func:`directpred.theory.invariants.alignment`).

    Args:
        W_p: the predictor (d, d).
        U: unit eigenvectors of F as columns (d, k).
        eps: guards the division when ``W_p u_j = 0``.

    Returns:
        ``cos_j`` (k,), in [-1, 1]: 1 when u_j is an eigenvector of W_p with a positive eigenvalue.
    """
    W = W_p.detach().to(U.dtype)
    WU = W @ U  # (d, k): column j is W_p u_j
    return (WU * U).sum(0) / (WU.norm(dim=0) * U.norm(dim=0)).clamp(min=eps)


def alignment_summary(cos: torch.Tensor, s: torch.Tensor) -> dict[str, float]:
    """One-number summaries of the cosines ``cos`` (k,) of :func:`cosines_along`, paired with the eigenvalues
    ``s`` (k,) of F.

    ``alignment`` is the plain mean over eigenvectors (every direction counts, as in Fig. 2's average);
    ``alignment_weighted`` weights ``cos_j`` by ``s_j`` (the directions that carry the projection's energy),
    which is less noisy early in training when the small-eigenvalue directions of F^ are poorly estimated.
    """
    w = s.clamp(min=0).to(cos.dtype)
    weighted = float((cos * w).sum() / w.sum()) if float(w.sum()) > 0 else float("nan")
    return {"alignment": float(cos.mean()), "alignment_weighted": weighted}


def asymmetry(W_p: torch.Tensor) -> float:
    """``||W_p - W_p^T||_F / ||W_p||_F``: 0 for a symmetric predictor, 2 for an antisymmetric one; NaN for a
    non-finite W_p."""
    W = W_p.detach().double()
    n = float(W.norm())
    if not math.isfinite(n):
        return math.nan
    return float((W - W.t()).norm()) / n if n > 0 else 0.0


def rayleigh_eigenvalues(W_p: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``p_j = u_j^T W_p u_j`` (k,): W_p's eigenvalue along u_j once W_p and F are aligned."""
    W = W_p.detach().to(U.dtype)
    return ((W @ U) * U).sum(0)


def sqrt_law_fit(p: torch.Tensor, s: torch.Tensor, *, rel_floor: float = 1e-6) -> dict[str, float]:
    """How p_j follows the paper's ``p_j ∝ sqrt(s_j)`` (Eqs. 14, 18).

    Args:
        p: predictor eigenvalues paired with ``s`` (k,), e.g. from :func:`rayleigh_eigenvalues`.
        s: eigenvalues of F (k,).
        rel_floor: pairs with ``s_j <= rel_floor * max(s)`` or ``p_j <= 0`` are left out of the log-log fit.

    Returns:
        ``p_s_slope``: least-squares slope of log p_j on log s_j (0.5 for the square-root law; DirectPred's
        eps boost lowers it, see Eq. 18); ``p_sqrt_s_corr``: Pearson correlation of p_j and sqrt(s_j) over
        all j.
    """
    p, s = p.detach().double(), s.detach().double()
    keep = (s > rel_floor * s.max().clamp(min=0)) & (p > 0)
    slope = float("nan")
    if int(keep.sum()) >= 2:
        x, y = s[keep].log(), p[keep].log()
        x = x - x.mean()
        denom = float((x * x).sum())
        if denom > 0:
            slope = float((x * (y - y.mean())).sum() / denom)
    return {"p_s_slope": slope, "p_sqrt_s_corr": pearson(p, s.clamp(min=0).sqrt())}


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two vectors (nan when one is constant up to rounding, e.g. W_p = I)."""
    a, b = a.double(), b.double()
    tiny = [float(v.abs().max()) * 1e-9 for v in (a, b)]
    a, b = a - a.mean(), b - b.mean()
    if float(a.norm()) <= tiny[0] or float(b.norm()) <= tiny[1]:
        return float("nan")
    return float((a * b).sum()) / float(a.norm() * b.norm())


def rankme(Z: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe effective rank of an embedding matrix ``Z`` (N, d) (Garrido et al. 2023, Eq. 1).

    ``exp(-sum_k q_k log q_k)`` with ``q_k = sigma_k / ||sigma||_1 + eps``; k for a rank-k embedding with
    equal singular values, at most ``min(N, d)``. Not centred, as in the RankMe paper. NaN when ``Z`` holds a NaN
    or an infinity (``svdvals`` would raise).

    Examples:
        >>> round(rankme(torch.eye(8)[:, :3] @ torch.randn(3, 16)), 0) <= 3
        True
    """
    Z = Z.detach().double()
    if not bool(torch.isfinite(Z).all()):
        return math.nan
    sigma = torch.linalg.svdvals(Z)
    total = float(sigma.sum())
    if total <= 0:
        return 0.0
    q = sigma / total + eps
    return math.exp(float(-(q * q.log()).sum()))


def normalized_std(Z: torch.Tensor) -> float:
    """Mean over dimensions of the std over samples of the l2-normalised rows of ``Z`` (N, d).

    About ``1/sqrt(d)`` when the outputs spread over the unit sphere, 0 when they collapse to one vector.
    """
    z = F.normalize(Z.detach().double(), dim=1)
    return float(z.std(dim=0).mean())


def mlp_mean_jacobian(mlp: MLP, z: torch.Tensor) -> torch.Tensor:
    """The input-output Jacobian of a Linear-BN-ReLU-Linear predictor averaged over the batch ``z`` (B, d).

    The BatchNorm's statistics are those of this batch, held fixed (the term through the batch mean and
    variance, O(1/B) per sample, is dropped), so the Jacobian of sample b is
    ``W_2 diag(1[a_b > 0] * gamma / sqrt(var + eps_bn)) W_1`` and its batch mean has the closed form
    ``W_2 diag(mean_b 1[a_b > 0] * gamma / sqrt(var + eps_bn)) W_1``. This stands in for W_p in the alignment
    and asymmetry of a two-layer predictor.

    Args:
        mlp: a :class:`directpred.heads.MLP` (attributes ``fc1``, ``bn``, ``fc2``, ``tied``).
        z: predictor inputs (B, d).

    Returns:
        The mean Jacobian (d_out, d_in), float64.
    """
    z = z.detach().double()
    W1 = mlp.fc1.weight.detach().double()  # (hidden, d)
    W2 = (mlp.fc1.weight.t() if mlp.tied else mlp.fc2.weight).detach().double()  # (out, hidden)
    a = z @ W1.t()
    if mlp.fc1.bias is not None:
        a = a + mlp.fc1.bias.detach().double()
    bn = mlp.bn
    mean, var = a.mean(0), a.var(0, unbiased=False)
    scale = 1.0 / (var + bn.eps).sqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    pre = (a - mean) * scale
    if bn.bias is not None:
        pre = pre + bn.bias.detach().double()
    gate = (pre > 0).double().mean(0) * scale  # (hidden,)
    return (W2 * gate) @ W1


def _batch_mean_matrix(predictor: Predictor) -> tuple[Callable[[torch.Tensor], torch.Tensor], str] | None:
    """For a predictor whose W_p is a mean over a batch (one view's matrix, and its kind), None for the others. The
    partitioned DirectPred comes first: its global ``weight`` predicts nothing."""
    if isinstance(predictor, PartitionedDirectPred):
        return predictor.mean_weight, "partitions"
    if isinstance(predictor, MLP):
        return (lambda z: mlp_mean_jacobian(predictor, z.float())), "jacobian"
    return None


def needs_batch(predictor: Predictor) -> bool:
    """Whether :func:`predictor_matrix` needs the predictor's inputs (the MLP's and the partitioned DirectPred's W_p
    are means over a batch)."""
    return _batch_mean_matrix(predictor) is not None


def predictor_matrix(predictor: Predictor, *views: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """The matrix that plays W_p for any predictor of :mod:`directpred.heads`.

    Args:
        predictor: the predictor.
        views: the predictor's inputs (B, d), one batch per view; the two-layer MLP needs them.

    Returns:
        ``(W_p, kind)``: ``weight`` for linear predictors (DirectPred, DirectCopy, linear, identity) with kind
            ``"weight"``; for the two-layer MLP, the mean over ``views`` of each view's batch-mean Jacobian
            (:func:`mlp_mean_jacobian`: each view has its own BatchNorm batch, as in training) with kind
            ``"jacobian"``; for the feature-dependent DirectPred, the mean over ``views`` of the batch mean of the
            per-sample matrices (:meth:`~directpred.heads.directpred.PartitionedDirectPred.mean_weight`, also its mean
            Jacobian), with kind ``"partitions"``; ``(None, "none")`` otherwise (the MLP and the partitions without
            ``views``).
    """
    batch_mean = _batch_mean_matrix(predictor)
    if batch_mean is not None:
        if not views:
            return None, "none"
        per_view, kind = batch_mean
        return torch.stack([per_view(z.detach()) for z in views]).sum(0) / len(views), kind
    W = getattr(predictor, "weight", None)
    if isinstance(W, torch.Tensor) and W.ndim == 2 and W.shape[0] == W.shape[1]:
        return W.detach(), "weight"
    return None, "none"
