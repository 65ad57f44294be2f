"""Predictors set directly from F^: DirectPred (paper §4, Eqs. 18-19) and DirectCopy.

Protocol (shared by every predictor): ``forward(z) = z @ weight.T`` and an explicit ``update(z)`` that the method
calls under ``torch.no_grad()`` in training steps only, never in evaluation or feature extraction. ``update`` folds
the batch into F^ (buffer ``corr``) and, every ``freq`` calls (the 1st, the (freq+1)-th, ...), sets ``weight`` from
F^. With ``freq > 1`` the weight is an ordinary parameter in between and receives gradient steps: the paper's
hybrid. With ``freq == 1`` any gradient step would be overwritten before use, so the weight needs no gradient.
"""

from __future__ import annotations

import abc
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from directpred import distributed
from directpred.heads.base import Predictor
from directpred.heads.correlation import CorrelationEstimator, full_precision, nonfinite_input_error, symmetric_eigh
from directpred.linalg import symmetric_part


def directpred_eigenvalues(s: torch.Tensor, *, eps: float, eps_mode: str = "code", c: float = 0.0) -> torch.Tensor:
    """The map from eigenvalues s_j of F^ to eigenvalues p_j of W_p.

    * ``eps_mode="code"`` (the authors' code, our default): ``p_j = sqrt(s_j/s_max) + eps``, floored at 1e-4 as in
      the code. With ``c != 0`` (Table 7's c_j variant; the code's ``dyn_eps_inside`` with ``dyn_eps = -c``):
      ``p_j = sqrt(max(s_j/s_max - c, 1e-4)) + eps``, so a trapped mode (``s_j/s_max - c <= 1e-4``) gets
      ``p_j = sqrt(1e-4) + eps = 0.01 + eps``, as in the authors' code (Table 7 uses eps = 0).
    * ``eps_mode="paper"`` (Eq. 18): ``p_j = sqrt(max(s_j - c, 0)) + eps * s_max``.

    Under the cosine loss only the direction of ``W_p z`` matters, so the code form equals
    ``sqrt(s_j) + eps * sqrt(s_max)`` up to scale: the two differ in how the eps term scales with s_max. ``c`` is
    applied to normalised eigenvalues in code mode and raw ones in paper mode.
    """
    s = s.clamp(min=0)
    s_max = s.max()
    if eps_mode == "code":
        if s_max <= 0:
            return torch.full_like(s, max(eps, 1e-4))
        if c != 0:
            return (s / s_max - c).clamp(min=1e-4).sqrt() + eps
        return ((s / s_max).sqrt() + eps).clamp(min=1e-4)
    if eps_mode == "paper":
        return (s - c).clamp(min=0).sqrt() + eps * s_max
    raise ValueError(f"eps_mode={eps_mode!r} must be 'code' or 'paper'")


class _SetFromCorrelation(CorrelationEstimator, Predictor, abc.ABC):
    """A linear predictor whose weight is set from F^ every ``freq`` updates (gradient steps in between)."""

    eigh_fallbacks: torch.Tensor  # () long: eigendecompositions that fell back to float64

    def __init__(
        self, dim: int, *, rho: float, eps: float, freq: int, average: str, zero_mean: bool, eigh_dtype: torch.dtype
    ) -> None:
        super().__init__(dim, rho=rho, average=average, zero_mean=zero_mean)
        if isinstance(freq, bool) or int(freq) != freq or freq < 1:  # 1.5 would gate W_p on count % 1.5
            raise ValueError(f"freq={freq!r} must be an integer >= 1")
        if not eps >= 0:  # also NaN, which would make W_p NaN
            raise ValueError(f"eps={eps} must be >= 0")
        if eigh_dtype not in (torch.float32, torch.float64):  # eigh has no half-precision kernel
            raise ValueError(f"eigh_dtype={eigh_dtype} must be torch.float32 or torch.float64")
        freq = int(freq)
        self.eps, self.freq, self.eigh_dtype = eps, freq, eigh_dtype
        self.weight = nn.Parameter(torch.eye(dim), requires_grad=freq > 1)
        self.register_buffer("eigh_fallbacks", torch.zeros((), dtype=torch.long))

    @abc.abstractmethod
    def target_weight(self, F_hat: torch.Tensor) -> torch.Tensor:
        """The W_p (d, d) that this rule sets from F^ (d, d)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d)
        return F.linear(z, self.weight.to(z.dtype))

    @torch.no_grad()
    def update(self, z: torch.Tensor, z_target: torch.Tensor | None = None) -> None:
        """Fold ``z`` (B, d), detached, into F^; on the 1st, (freq+1)-th, ... call also set ``weight``.

        Runs in float32 with autocast off. A no-op in eval mode (like BatchNorm's statistics). ``z_target`` is
        ignored (only :class:`OptimalPredictor` uses it).
        """
        if not self.training:
            return
        set_now = int(self.count) % self.freq == 0
        with full_precision(z.device):
            super().update(z)
            if set_now:
                self.weight.copy_(self.target_weight(self.matrix()))


class DirectPred(_SetFromCorrelation):
    """DirectPred: ``W_p = U diag(p_j) U^T`` from the eigendecomposition ``F^ = U diag(s_j) U^T`` (Eq. 18).

    Args:
        dim: feature dimension d (the projector's output).
        rho: moving-average rate of F^ (Eq. 19); the paper's best is 0.3.
        eps: boost of small eigenvalues; the paper's best is 0.1 (the authors' README example uses 0.01).
        freq: set W_p every ``freq`` updates; >1 is the hybrid with gradient steps in between (Table 8, freq=5).
        eps_mode: ``"code"`` or ``"paper"``; see :func:`directpred_eigenvalues`.
        c: the c_j variant (Table 7); 0 disables it.
        zero_mean: covariance instead of correlation.
        average: ``"ema"`` or ``"cumulative"``.
        eigh_dtype: dtype of the eigendecomposition (float32 or float64; never half precision).

    Examples:
        >>> dp = DirectPred(8, rho=0.3, eps=0.1)
        >>> dp.update(torch.randn(64, 8))  # training step only
        >>> torch.allclose(dp.weight, dp.weight.T)
        True
    """

    def __init__(
        self,
        dim: int,
        *,
        rho: float = 0.3,
        eps: float = 0.1,
        freq: int = 1,
        eps_mode: str = "code",
        c: float = 0.0,
        zero_mean: bool = False,
        average: str = "ema",
        eigh_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(dim, rho=rho, eps=eps, freq=freq, average=average, zero_mean=zero_mean, eigh_dtype=eigh_dtype)
        if eps_mode not in ("code", "paper"):
            raise ValueError(f"eps_mode={eps_mode!r} must be 'code' or 'paper'")
        self.eps_mode, self.c = eps_mode, c

    def target_weight(self, F_hat: torch.Tensor) -> torch.Tensor:
        s, U, fell_back = symmetric_eigh(F_hat, self.eigh_dtype)
        self.eigh_fallbacks += int(fell_back)
        p = directpred_eigenvalues(s, eps=self.eps, eps_mode=self.eps_mode, c=self.c)
        W = (U * p) @ U.t()
        return symmetric_part(W)  # exactly symmetric (the product is only up to rounding)


class DirectCopy(_SetFromCorrelation):
    """DirectCopy (Wang, Chen, Du, Tian 2021): ``W_p = F^ / ||F^||_2 + eps I``, no eigendecomposition.

    We normalise by the spectral norm (the largest eigenvalue of the PSD F^), so the top eigenvalue of W_p is
    ``1 + eps`` whatever the dimension, matching DirectPred's ``s_j / s_max`` scaling. The Frobenius norm would shrink
    every eigenvalue by up to sqrt(d) and let ``eps I`` dominate at d=128; an unnormalised F^ (the authors'
    ``directcopy`` branch) makes ``eps`` depend on the feature scale. The spectral norm is computed by ``eigvalsh``.
    """

    def __init__(
        self,
        dim: int,
        *,
        rho: float = 0.3,
        eps: float = 0.1,
        freq: int = 1,
        zero_mean: bool = False,
        average: str = "ema",
        eigh_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(dim, rho=rho, eps=eps, freq=freq, average=average, zero_mean=zero_mean, eigh_dtype=eigh_dtype)

    def target_weight(self, F_hat: torch.Tensor) -> torch.Tensor:
        A = symmetric_part(F_hat)
        try:
            norm = torch.linalg.eigvalsh(A.to(self.eigh_dtype)).abs().max()
        except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
            norm = A.new_tensor(float("nan"))
        if not torch.isfinite(norm):  # same fallback as DirectPred's symmetric_eigh: float64
            try:
                norm = torch.linalg.eigvalsh(A.double()).abs().max()
            except RuntimeError as exc:  # as symmetric_eigh: the trainer's non-finite handling names the step
                raise FloatingPointError(f"eigvalsh of F^ failed even in float64 ({exc})") from None
            self.eigh_fallbacks += 1
            warnings.warn(
                f"eigvalsh of F^ failed in {self.eigh_dtype}; fell back to float64", RuntimeWarning, stacklevel=2
            )
        eye = torch.eye(self.dim, dtype=A.dtype, device=A.device)
        if not torch.isfinite(norm) or norm <= 0:
            return eye * (1.0 + self.eps)
        return (A.double() / norm.double()).to(A.dtype) + self.eps * eye


class PartitionedDirectPred(DirectPred):
    """Feature-dependent W_p from random partitions of the input space (paper §4, 78.20 on STL-10).

    Our reading: ``partitions = n`` random hyperplanes ``w_i`` (fixed, the same on every rank); each splits the space
    into two cells, ``side_i(f) = [f . w_i >= theta_i]``. Every cell keeps its own F^ (Eq. 19, same rho) and its own
    DirectPred matrix, and the predictor applied to f is the average over hyperplanes of the matrix of the cell f
    falls in: ``W_p(f) = (1/n) sum_i W_{i, side_i(f)}``. This follows the authors' code (``n_corr`` hyperplanes,
    averaged per-cell predictors), and reads the paper's "6 random partitions" as ``n = 6`` hyperplanes; the paper's
    text says the cell correlations are summed, which the code does not do. Where it differs from the code: the
    threshold theta_i is a moving average (the same rho) of the mean of ``f . w_i`` over both views and the global
    batch, where the code takes each view's current batch mean; so in evaluation a sample's prediction does not
    depend on the rest of its batch (and is defined for one image), while in training the current batch still
    weighs ``1 - rho`` in theta (with ``update_at: forward``). And the hyperplanes are drawn from ``seed``
    (``train.seed``), not the global torch seed. The cells hold correlations (no ``zero_mean``, as in the code's
    partition mode). Every cell's F^ is updated every step; with ``freq > 1`` the cells' W_p are set every ``freq``
    steps and held in between (the code sets them every step); a cell no sample falls in keeps its estimate (the
    code folds in a zero matrix). The global F^ and its W_p (``weight``, which makes
    no prediction) are kept too: the diagnostics compare F^ with the batch mean of the per-sample matrices
    (:meth:`mean_weight`). No gradient steps on W_p.
    """

    planes: torch.Tensor  # (d, n) the hyperplanes' normals w_i
    theta: torch.Tensor  # (n,) running thresholds theta_i
    cell_corr: torch.Tensor  # (n, 2, d, d) every cell's F^
    cell_count: torch.Tensor  # (n, 2) long: updates of every cell
    cell_weight: torch.Tensor  # (n, 2, d, d) every cell's W_p

    def __init__(
        self,
        dim: int,
        *,
        partitions: int,
        seed: int = 0,
        rho: float = 0.3,
        eps: float = 0.1,
        freq: int = 1,
        eps_mode: str = "code",
        c: float = 0.0,
        zero_mean: bool = False,
        average: str = "ema",
        eigh_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            dim,
            rho=rho,
            eps=eps,
            freq=freq,
            eps_mode=eps_mode,
            c=c,
            zero_mean=zero_mean,
            average=average,
            eigh_dtype=eigh_dtype,
        )
        if isinstance(partitions, bool) or int(partitions) != partitions or partitions < 1:  # 0: NaN predictions
            raise ValueError(f"partitions={partitions!r} must be an integer >= 1 (use DirectPred for one global F^)")
        if average != "ema":  # the cells and their thresholds are moving averages with rho, as in the authors' code
            raise ValueError(f"average={average!r}: the partitions' cells are moving averages; use average='ema'")
        self.weight.requires_grad_(False)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("planes", torch.randn(dim, partitions, generator=g))  # (d, n)
        self.register_buffer("theta", torch.zeros(partitions))
        self.register_buffer("cell_corr", torch.zeros(partitions, 2, dim, dim))
        self.register_buffer("cell_count", torch.zeros(partitions, 2, dtype=torch.long))
        self.register_buffer("cell_weight", torch.eye(dim).expand(partitions, 2, dim, dim).clone())

    def _sides(self, z: torch.Tensor, theta: torch.Tensor | None = None) -> torch.Tensor:  # (B, n) True = positive
        with full_precision(z.device):  # the same float32 sides in forward (under autocast) as in update
            return (z.float() @ self.planes.float()) >= (self.theta if theta is None else theta)

    def mean_weight(self, z: torch.Tensor) -> torch.Tensor:
        """The batch mean of the matrix each sample is predicted with, ``mean_b W_p(f_b)``, in float32.

        ``W_p(f)`` is constant within a cell, so this is also the predictor's input-output Jacobian averaged over the
        batch: ``(1/n) sum_i (q_i W_{i,+} + (1 - q_i) W_{i,-})`` with ``q_i`` the share of ``z`` on the positive side
        of hyperplane ``i``. The diagnostics read it as this predictor's W_p.
        """
        q = self._sides(z).float().mean(0)[:, None, None]  # (n, 1, 1)
        W = self.cell_weight.float()
        return (q * W[:, 0] + (1 - q) * W[:, 1]).mean(0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        W = self.cell_weight.to(z.dtype)  # (n, 2, d, d)
        out = torch.einsum("bd,nsed->bnse", z, W)  # (B, n, 2, d): every cell's prediction
        pos = self._sides(z).unsqueeze(-1)  # (B, n, 1)
        return torch.where(pos, out[:, :, 0], out[:, :, 1]).mean(1)

    @torch.no_grad()
    def update(self, z: torch.Tensor, z_target: torch.Tensor | None = None) -> None:
        """Fold ``z`` into the cells' F^ (float32, autocast off) and set their matrices; a no-op in eval mode."""
        if not self.training:
            return
        self.check_input(z)
        with full_precision(z.device):
            self._update_cells(z.detach().float())

    def _update_cells(self, z: torch.Tensor) -> None:
        # Two host reads (device syncs) per update: the step count, and all cells' sample counts and update counts at
        # once, which also reveal an empty batch and non-finite inputs; nothing is written before those checks, so a
        # refused batch leaves the state as it was.
        count = int(self.count)
        set_now = count % self.freq == 0
        proj = torch.cat([(z @ self.planes.float()).sum(0), z.new_tensor([z.shape[0]])])  # any module dtype
        distributed.all_reduce_sum(proj)  # the mean over the global batch, whatever each rank's share of it
        proj_mean = (proj[:-1] / proj[-1]).to(self.theta.dtype)  # 0/0 for an empty batch: refused below
        theta = proj_mean if count == 0 else self.theta.lerp(proj_mean, 1 - self.rho)
        pos = self._sides(z, theta).float()  # (B, n)
        d = self.dim
        s_pos = torch.einsum("bn,bd,be->nde", pos, z, z)  # (n, d, d): sum over positive-side samples
        s_all = (z.t() @ z).expand_as(s_pos)
        n_pos = pos.sum(0)
        stats = torch.cat([s_pos.flatten(), s_all.flatten(), n_pos, n_pos.new_tensor([z.shape[0]])])
        distributed.all_reduce_sum(stats)
        k = self.planes.shape[1]
        s_pos, s_all = stats[: k * d * d].view(k, d, d), stats[k * d * d : 2 * k * d * d].view(k, d, d)
        n_pos, n = stats[2 * k * d * d : 2 * k * d * d + k], stats[-1]
        cell_sum = torch.stack([s_pos, s_all - s_pos], 1)  # (n, 2, d, d)
        cell_n = torch.stack([n_pos, n - n_pos], 1)  # (n, 2)
        # z^T z (global) and theta are finite unless the inputs hold NaN/inf or their squares overflow float32.
        finite = (torch.isfinite(s_all[0]).all() & torch.isfinite(theta).all()).double()
        host = torch.stack([cell_n.double(), self.cell_count.double(), finite.expand(k, 2)]).tolist()  # the one read
        cell_n_host, cell_count_host = host[0], [[int(c) for c in row] for row in host[1]]
        if sum(cell_n_host[0]) == 0:  # a hyperplane's two sides hold the whole global batch: it is empty
            raise ValueError(f"the predictor's update got an empty batch z of shape {tuple(z.shape)}")
        if not host[2][0][0]:
            raise nonfinite_input_error(z)  # this rank's z: the message names NaN/inf or the overflow
        self.theta.copy_(theta)
        for i in range(k):
            for side in range(2):
                if cell_n_host[i][side] == 0:
                    continue  # no sample fell in this cell: keep its estimate
                batch = cell_sum[i, side] / cell_n[i, side]
                w = 1.0 if cell_count_host[i][side] == 0 else 1.0 - self.rho
                self.cell_corr[i, side].lerp_(batch.to(self.cell_corr.dtype), w)
                self.cell_count[i, side] += 1
                cell_count_host[i][side] += 1
        super().update(z)  # global F^ and weight, for diagnostics; also advances count
        if set_now:
            for i in range(k):
                for side in range(2):
                    if cell_count_host[i][side] > 0:
                        self.cell_weight[i, side] = self.target_weight(self.cell_corr[i, side])
