"""The one protocol every predictor follows, as a base class the type checker can see."""

from __future__ import annotations

import torch
from torch import nn


class Predictor(nn.Module):
    """A predictor W_p: ``forward(z) -> p`` and an explicit ``update(z)``.

    The method calls ``update`` under ``torch.no_grad()`` in training steps only (a no-op in eval mode and for
    predictors trained by gradient descent). A predictor with ``uses_target = True`` is called as
    ``update(z, z_target=...)`` with the row-aligned target projections of the other view.
    """

    uses_target: bool = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d)
        raise NotImplementedError(
            f"{type(self).__name__} must define forward(z): every predictor maps (B, d) -> (B, d)"
        )

    def update(self, z: torch.Tensor, z_target: torch.Tensor | None = None) -> None:
        """Fold the detached batch ``z`` (B, d) into the predictor's statistics; nothing by default."""
