"""A single linear predictor trained by SGD, optionally constrained to be symmetric (the paper's "sym W_p")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from directpred.heads.base import Predictor
from directpred.linalg import symmetric_part


class _Symmetric(nn.Module):
    def forward(self, A: torch.Tensor) -> torch.Tensor:
        return symmetric_part(A)


class LinearPredictor(Predictor):
    """``p = W_p z (+ b)`` with W_p (dim, dim) trained by gradient descent.

    With ``symmetric=True`` (Assumption 3, Table 3's "sym W_p") the weight is parametrised as ``(A + A^T)/2`` with
    A initialised symmetric: the initialisation is symmetric and every gradient step is symmetrised, so W_p stays
    exactly symmetric, also under momentum and weight decay.

    Args:
        dim: input and output size.
        bias: add a learnable bias (Table 2/3's "bias" columns).
        symmetric: constrain W_p = W_p^T.
    """

    def __init__(self, dim: int, *, bias: bool = False, symmetric: bool = False) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim, bias=bias)
        self.symmetric = symmetric
        if symmetric:
            with torch.no_grad():
                self.linear.weight.copy_(symmetric_part(self.linear.weight))
            parametrize.register_parametrization(self.linear, "weight", _Symmetric())

    @property
    def weight(self) -> torch.Tensor:
        """The current W_p, (dim, dim)."""
        return self.linear.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, dim) -> (B, dim)
        return F.linear(z, self.linear.weight, self.linear.bias)

    @torch.no_grad()
    def update(self, z: torch.Tensor, z_target: torch.Tensor | None = None) -> None:
        """Trained by gradient descent: nothing to set from statistics."""


class IdentityPredictor(Predictor):
    """``W_p = I``: the no-predictor ablation, which collapses (paper §3, remark after Theorem 2)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.eye(dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z

    @torch.no_grad()
    def update(self, z: torch.Tensor, z_target: torch.Tensor | None = None) -> None:
        """Nothing to learn."""
