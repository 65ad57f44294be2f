"""Losses: pure functions. The stop-gradient and the two-view symmetrisation live here and nowhere else."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``mean_b (2 - 2 cos(p_b, t_b))``, which equals ``mean_b ||p_b/|p_b| - t_b/|t_b|||^2`` (BYOL's loss).

    Computed in float32 for half-precision inputs (bf16/fp16 under autocast) and in float64 for float64 ones.

    Args:
        p: predictions (B, d).
        t: targets (B, d), row-aligned with ``p``; the caller decides whether they carry gradient.

    Raises:
        ValueError: ``p`` and ``t`` differ in shape (broadcasting, e.g. a (1, d) target against (B, d)
            predictions, would silently compute a different loss), or the batch is empty (B = 0: the mean over
            no rows is NaN).

    Examples:
        >>> e = torch.eye(2)
        >>> negative_cosine(e, 3 * e).item(), negative_cosine(e, e.flip(0)).item(), negative_cosine(e, -e).item()
        (0.0, 2.0, 4.0)
    """
    if p.shape != t.shape:
        raise ValueError(
            f"negative_cosine: predictions {tuple(p.shape)} and targets {tuple(t.shape)} must have the same shape "
            "(B, d), one target row per prediction row"
        )
    if p.ndim > 1 and p.shape[:-1].numel() == 0:
        raise ValueError(
            f"negative_cosine: an empty batch, predictions and targets of shape {tuple(p.shape)}: the mean over no "
            "rows is NaN; give at least one row"
        )
    # Half-precision inputs are computed in float32; float64 ones stay float64 (gradcheck, theory comparisons).
    dtype = torch.promote_types(torch.promote_types(p.dtype, t.dtype), torch.float32)
    return 2.0 - 2.0 * F.cosine_similarity(p.to(dtype), t.to(dtype), dim=-1, eps=1e-8).mean()


def isoloss_prediction(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``StopGrad(p) + z - StopGrad(z)``: the prediction ``p = W_p z`` in value (exactly, in any dtype), the identity
    in gradient (IsoLoss).

    Any loss of the result has the value of that loss of ``p``, and its gradient with respect to ``z`` is the loss's
    gradient with respect to ``p``: the factor ``W_p^T`` that the chain rule through ``p = W_p z`` would apply, which
    scales eigenmode j of the gradient by W_p's eigenvalue p_j, is left out, so that every mode learns at the same
    rate (Halvagal, Laborieux and Zenke, NeurIPS 2023). For the negative cosine this is the gradient of their cosine
    IsoLoss; for the squared distance that of their Euclidean one. ``W_p`` gets no gradient through the result.

    Args:
        p: predictions (B, d), ``W_p z``.
        z: the predictor's inputs (B, d), row-aligned with ``p``.

    Examples:
        >>> z = torch.tensor([[1.0, 2.0]], requires_grad=True)
        >>> p = z @ torch.diag(torch.tensor([0.5, 0.25]))
        >>> q = isoloss_prediction(p, z)
        >>> q.sum().backward()
        >>> q.tolist(), z.grad.tolist()  # the value of p, the gradient of the identity
        ([[0.5, 0.5]], [[1.0, 1.0]])
    """
    if p.shape != z.shape:
        raise ValueError(
            f"isoloss_prediction: predictions {tuple(p.shape)} and inputs {tuple(z.shape)} must have the same shape "
            "(B, d): IsoLoss needs a square predictor W_p"
        )
    # p.detach() + (z - z.detach()), not z + (p - z).detach(): z - z.detach() is exactly 0, so the value is p to the
    # last bit in every dtype (the other form rounds once more, up to 4e-3 relative in bf16)
    return p.detach() + (z - z.detach())


def two_view_loss(
    p1: torch.Tensor,
    p2: torch.Tensor,
    t1: torch.Tensor,
    t2: torch.Tensor,
    *,
    symmetric: bool = True,
    stop_gradient: bool = True,
) -> torch.Tensor:
    """The BYOL/SimSiam objective for two views.

    View 1's prediction ``p1`` regresses view 2's target ``t2``; with ``symmetric`` the roles are also swapped and
    the two terms are **summed**, as in the authors' code and BYOL (so lr 0.03 means what it meant there).

    Args:
        p1, p2: predictions of views 1 and 2 (B, d).
        t1, t2: targets of views 1 and 2 (B, d): the EMA network's projections (BYOL) or the online ones (SimSiam).
        symmetric: add the swapped term (the default); False is the asymmetric loss (the paper's 60-epoch ImageNet).
        stop_gradient: ``StopGrad`` on the targets (Eq. 1). False is the Theorem 2 ablation: gradients flow through
            the targets too, and the network collapses.
    """
    if stop_gradient:
        t1, t2 = t1.detach(), t2.detach()
    loss = negative_cosine(p1, t2)
    if symmetric:
        loss = loss + negative_cosine(p2, t1)
    return loss
