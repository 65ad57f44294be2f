"""Linear-BN-ReLU-Linear heads: the projector, and the two-layer (BYOL default) predictor."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from directpred.heads.base import Predictor


class MLP(Predictor):
    """``Linear(in, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, out)``.

    Args:
        in_dim: input features.
        hidden_dim: hidden units (the authors' code: 512; BYOL on ImageNet: 4096).
        out_dim: output features (the authors' code: 128; BYOL on ImageNet: 256).
        bias: biases of both linear layers.
        bn_affine: learnable scale/shift in the BatchNorm (the authors' code uses ``affine=False``).
        tied: the paper's "sym W_p" for the two-layer predictor (Table 3): the second layer's weight is the
            transpose of the first, so needs ``in_dim == out_dim``. The tied weight W gets the gradient
            ``(G1 + G2^T) / 2`` (G1, G2: the gradients of the two layers as if untied), the step of the authors'
            code, which steps both layers and then sets both to ``(W1 + W2^T) / 2``.

    Examples:
        >>> head = MLP(512, 512, 128)
        >>> head(torch.randn(4, 512)).shape
        torch.Size([4, 128])
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        *,
        bias: bool = True,
        bn_affine: bool = True,
        tied: bool = False,
    ) -> None:
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
        if self.tied:
            # Value W exactly (0.5 W + 0.5 W is exact), gradient halved: both uses give (G1 + G2^T) / 2.
            W = 0.5 * self.fc1.weight + (0.5 * self.fc1.weight).detach()
            h = F.relu(self.bn(F.linear(x, W, self.fc1.bias)))
            return F.linear(h, W.t(), self.fc2.bias)
        h = F.relu(self.bn(self.fc1(x)))
        return F.linear(h, self.fc2.weight, self.fc2.bias)

    @torch.no_grad()
    def update(self, z: torch.Tensor, z_target: torch.Tensor | None = None) -> None:
        """Trained by gradient descent: nothing to set from statistics."""
