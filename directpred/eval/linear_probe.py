"""Offline linear probe on frozen features: the authors' protocol (``linear_feature_eval.py``).

Standardised features (mean/std of the training features), logistic regression ``Linear(D, C)``, Adam lr 3e-4,
weight decay 1e-3, batch 128, 50 epochs. The authors' code reports the best test accuracy over the probe epochs;
we report the final-epoch accuracy as the headline (``linear_top1``) and that best-over-epochs figure, labelled as
such (``linear_top1_best``), for comparison with the paper.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from directpred.eval.inputs import accuracy, as_features, as_labels, check_count, check_fitted, nonfinite_rows


class LinearProbe:
    """Logistic-regression probe with scikit-learn's contract (``fit`` returns ``self``; ``*_`` attributes;
    ``predict`` or ``score`` before ``fit`` raises :class:`~directpred.eval.inputs.NotFittedError`).

    Non-finite features (NaN or inf, from a diverged model) make the standardisation and the weights NaN and the
    argmax arbitrary: a warning names how many rows are non-finite, and the accuracies (``score``, ``history_``)
    are NaN rather than a plausible-looking number (a warning, not an error, so that a training run's final
    evaluation still writes its summary).

    Args:
        epochs: passes over the training features (50).
        lr: Adam learning rate (3e-4).
        weight_decay: Adam weight decay (1e-3).
        batch_size: minibatch size (128).
        seed: seed of the initialisation and the shuffling.

    Attributes (after ``fit``):
        history_: test accuracy after every epoch (when test features were given to ``fit``).
        best_accuracy_: the best entry of ``history_`` (the authors' reported figure).
        nonfinite_rows_: rows of ``x_train`` holding NaN or inf (0 for a meaningful probe).
    """

    def __init__(
        self, *, epochs: int = 50, lr: float = 3e-4, weight_decay: float = 1e-3, batch_size: int = 128, seed: int = 0
    ) -> None:
        self.epochs, self.lr, self.weight_decay, self.batch_size, self.seed = epochs, lr, weight_decay, batch_size, seed

    def _standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean_) / self.std_

    def fit(
        self,
        x_train: torch.Tensor | Any,
        y_train: torch.Tensor | Any,
        x_test: torch.Tensor | Any | None = None,
        y_test: torch.Tensor | Any | None = None,
    ) -> LinearProbe:
        """Train the probe on ``x_train`` (N, D) and ``y_train`` (N,) (class indices >= 0; tensors or array-likes
        such as numpy arrays or lists); with ``x_test`` and ``y_test`` (class indices >= 0 too), record the test
        accuracy after every epoch in ``history_``. Returns ``self``.

        Raises:
            ValueError: ``epochs`` or ``batch_size`` not an integer >= 1 (``2.0`` included), no training rows,
                features and labels that do not match, or only one of ``x_test`` and ``y_test``.
        """
        for name in ("epochs", "batch_size"):
            check_count(getattr(self, name), name, "LinearProbe", f"eval.linear_{name}")
        if (x_test is None) != (y_test is None):
            raise ValueError("LinearProbe.fit: give both x_test and y_test (for history_), or neither")
        x_train = as_features(x_train, "x_train")
        if len(x_train) == 0:
            raise ValueError("LinearProbe.fit: x_train has no rows")
        y_train = as_labels(y_train, len(x_train), "y_train")
        test_bad = 0
        if x_test is not None:
            x_test = as_features(x_test, "x_test")
            y_test = as_labels(y_test, len(x_test), "y_test")
            test_bad = nonfinite_rows(x_test, "x_test", "LinearProbe.fit", "history_ holds NaN")
        self.nonfinite_rows_ = nonfinite_rows(
            x_train, "x_train", "LinearProbe.fit", "the probe is meaningless; score() and history_ give NaN"
        )
        g = torch.Generator().manual_seed(self.seed)
        self.mean_ = x_train.float().mean(0)
        # StandardScaler: the population std (one training sample gives 0, not NaN). A feature constant on the
        # training set (a dead ReLU channel) gets scale 1, as in scikit-learn; scaled by a clamped 1e-6 instead, a
        # weak test-time activation of it became 1e6 times larger and took over the logits.
        x32 = x_train.float()
        constant = x32.amax(0) == x32.amin(0)
        self.std_ = x32.std(0, correction=0).clamp(min=1e-6).masked_fill(constant, 1.0)
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
            if x_test is not None and y_test is not None:  # (warned once above, not every epoch)
                self.history_.append(math.nan if test_bad or self.nonfinite_rows_ else self.score(x_test, y_test))
        self.best_accuracy_ = max(self.history_) if self.history_ else math.nan
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor | Any) -> torch.Tensor:
        """Predicted class (N,) of every row of ``x`` (N, D), moved to the device of the training features
        (arbitrary for a non-finite row, with a warning).

        Raises:
            NotFittedError: called before :meth:`fit`.
        """
        check_fitted(self, "linear_")
        x = as_features(x, "x")
        nonfinite_rows(x, "x", "LinearProbe.predict", "their predicted classes are meaningless")
        return self._predict(x)

    @torch.no_grad()
    def _predict(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean_.device)
        if x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"LinearProbe: x has {x.shape[1]} columns, the training features {self.mean_.shape[0]}")
        return self.linear_(self._standardise(x)).argmax(1)

    def score(self, x: torch.Tensor | Any, y: torch.Tensor | Any) -> float:
        """Top-1 accuracy in [0, 1] of ``x`` (N, D) against ``y`` (N,); NaN when ``x`` or the training features
        hold a non-finite row (with a warning), as no accuracy can be read from them.

        Raises:
            NotFittedError: called before :meth:`fit`.
            ValueError: ``y`` not class indices >= 0 (an unlabelled -1 would count as a miss).
        """
        check_fitted(self, "linear_")
        x = as_features(x, "x")
        bad = nonfinite_rows(x, "x", "LinearProbe.score", "the score is NaN")
        pred = self._predict(x).cpu()
        hits = pred == as_labels(y, len(pred), "y").cpu()
        return math.nan if bad or self.nonfinite_rows_ else accuracy(hits)
