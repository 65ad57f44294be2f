"""Linear-BN-ReLU-Linear heads: the projector, and the two-layer (BYOL default) predictor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """``Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out)``.

    Args:
        in_dim: input features.
        hidden_dim: hidden units (the authors' code: 512; BYOL on ImageNet: 4096).
        out_dim: output features (the authors' code: 128; BYOL on ImageNet: 256).
        bias: biases of both linear layers.
        bn_affine: learnable scale/shift in the BatchNorm (the authors' code uses ``affine=False``).
        tied: the paper's "sym W_p" for the two-layer predictor (Table 3): the second layer's weight is the
            transpose of the first (the authors' code ties them the same way), so needs ``in_dim == out_dim``.

    Example:
        >>> head = MLP(512, 512, 128)
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 128])
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, *, bias: bool = True, bn_affine: bool = True,
                 tied: bool = False) -> None:
        super().__init__()
        if tied and in_dim != out_dim:
            raise ValueError(f"a tied (symmetric) two-layer head needs in_dim == out_dim, got {in_dim} and {out_dim}")
        self.fc1 = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.bn = nn.BatchNorm1d(hidden_dim, affine=bn_affine)
        self.tied = tied
        self.fc2 = nn.Linear(hidden_dim, out_dim, bias=bias)
        if tied:
            # Only the bias of fc2 is used; its weight is fc1.weight.T.
            self.fc2.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        h = F.relu(self.bn(self.fc1(x)))
        weight = self.fc1.weight.t() if self.tied else self.fc2.weight
        return F.linear(h, weight, self.fc2.bias)

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """Trained by gradient descent: nothing to set from statistics."""
