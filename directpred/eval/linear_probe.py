"""Offline linear probe on frozen features: the authors' protocol (``linear_feature_eval.py``).

Standardised features (mean/std of the training features), logistic regression ``Linear(D, C)``, Adam lr 3e-4,
weight decay 1e-3, batch 128, 50 epochs. The authors' code reports the best test accuracy over the probe epochs;
we report the final-epoch accuracy as the headline (``linear_top1``) and that best-over-epochs figure, labelled as
such (``linear_top1_best``), for comparison with the paper.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearProbe:
    """Logistic-regression probe with scikit-learn's contract (``fit`` returns ``self``; ``*_`` attributes).

    Args:
        epochs: passes over the training features (50).
        lr: Adam learning rate (3e-4).
        weight_decay: Adam weight decay (1e-3).
        batch_size: minibatch size (128).
        seed: seed of the initialisation and the shuffling.

    Attributes (after ``fit``):
        history_: test accuracy after every epoch (when test features were given to ``fit``).
        best_accuracy_: the best entry of ``history_`` (the authors' reported figure).
    """

    def __init__(
        self, *, epochs: int = 50, lr: float = 3e-4, weight_decay: float = 1e-3, batch_size: int = 128, seed: int = 0
    ) -> None:
        self.epochs, self.lr, self.weight_decay, self.batch_size, self.seed = epochs, lr, weight_decay, batch_size, seed

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean_) / self.std_

    def fit(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor | None = None,
        y_test: torch.Tensor | None = None,
    ) -> LinearProbe:
        g = torch.Generator().manual_seed(self.seed)
        self.mean_ = x_train.float().mean(0)
        # StandardScaler: the population std (one training sample gives 0, not NaN); constant features stay finite
        self.std_ = x_train.float().std(0, correction=0).clamp(min=1e-6)
        xs = self._standardise(x_train)
        y = y_train.long()
        n_classes = int(y.max()) + 1
        self.linear_ = nn.Linear(xs.shape[1], n_classes).to(xs.device)
        with torch.no_grad():  # seeded init, independent of the global RNG
            bound = 1.0 / xs.shape[1] ** 0.5
            self.linear_.weight.copy_(torch.rand(self.linear_.weight.shape, generator=g) * 2 * bound - bound)
            self.linear_.bias.copy_(torch.rand(self.linear_.bias.shape, generator=g) * 2 * bound - bound)
        y = y.to(xs.device)
        opt = torch.optim.Adam(self.linear_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.history_: list[float] = []
        for _ in range(self.epochs):
            perm = torch.randperm(len(xs), generator=g).to(xs.device)  # drawn on the CPU: same order on any device
            for start in range(0, len(xs), self.batch_size):
                idx = perm[start : start + self.batch_size]
                loss = F.cross_entropy(self.linear_(xs[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if x_test is not None and y_test is not None:
                self.history_.append(self.score(x_test, y_test))
        self.best_accuracy_ = max(self.history_) if self.history_ else float("nan")
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_(self._standardise(x)).argmax(1)

    def score(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Top-1 accuracy in [0, 1]."""
        return float((self.predict(x.to(self.mean_.device)).cpu() == y.long().cpu()).float().mean())
