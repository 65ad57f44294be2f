"""Weighted kNN classifier on cosine similarity (the kNN monitor of InstDisc/SimCLR-style SSL code)."""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from directpred.eval.inputs import (
    accuracy,
    as_features,
    as_labels,
    check_count,
    check_fitted,
    nonfinite_rows,
    unit_rows,
)


def vote_weights(sim: torch.Tensor, temperature: float) -> torch.Tensor:
    """``exp(cos / T)`` of the top-k similarities ``sim`` (n, k), sorted descending along dim 1.

    ``exp(cos / T)`` overflows float32 once ``1 / T`` exceeds about 88 - ln k (T below about 0.012): every vote is
    then ``inf`` and the argmax arbitrary. For ``T < 0.02`` the weights are therefore taken relative to each row's
    nearest neighbour, ``exp((cos - cos_1) / T)``: the same votes up to a per-row factor (the same argmax), finite,
    the largest 1. Larger T (the standard 0.07-0.2) keeps the plain form, bit for bit.
    """
    if temperature >= 0.02:
        return (sim / temperature).exp()
    # clamp: a row of -inf (no neighbour, in the streamed kNN) keeps weights exp(-inf) = 0 instead of NaN
    return ((sim - sim[:, :1].clamp(min=-1.0)) / temperature).exp()


class KNNClassifier:
    """Cosine kNN with temperature-weighted votes: class score ``sum_{i in top-k} exp(cos_i / T) [y_i = c]``.

    Follows scikit-learn's contract: the constructor stores hyperparameters, ``fit`` returns ``self``, learned
    attributes end in ``_``; ``predict`` or ``score`` before ``fit`` raises
    :class:`~directpred.eval.inputs.NotFittedError`.

    Non-finite features (NaN or inf, from a diverged model) make the votes NaN and the argmax arbitrary: a
    warning names how many rows are non-finite, and ``score`` returns NaN rather than a plausible-looking accuracy
    (a warning, not an error, so that a training run's epoch-end kNN does not lose the run).

    Args:
        k: neighbours (200 in the standard monitor).
        temperature: T (0.1).
        chunk: test rows scored at a time (bounds memory to chunk x N_train).

    Examples:
        >>> knn = KNNClassifier(k=5).fit(torch.randn(100, 8), torch.randint(0, 3, (100,)))
        >>> knn.predict(torch.randn(7, 8)).shape
        torch.Size([7])
    """

    def __init__(self, k: int = 200, temperature: float = 0.1, chunk: int = 1024) -> None:
        self.k, self.temperature, self.chunk = k, temperature, chunk

    def fit(self, features: torch.Tensor | Any, labels: torch.Tensor | Any) -> KNNClassifier:
        """Store the normalised training features (N, D) and their labels (N,): class indices >= 0, a tensor or
        an array-like (numpy, list). Returns ``self``.

        Raises:
            ValueError: a hyperparameter out of range (``k`` and ``chunk`` integers >= 1, ``temperature > 0``),
                no training rows, or features and labels that do not match.
        """
        check_count(self.k, "k", "kNN", "eval.knn_k")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"kNN: temperature={self.temperature!r} must be > 0 (eval.knn_t)")
        check_count(self.chunk, "chunk", "kNN")
        features = as_features(features)
        if len(features) == 0:
            raise ValueError("kNN: fit got no training rows")
        self.nonfinite_rows_ = nonfinite_rows(
            features, "the training features", "kNN", "every prediction is meaningless and score() returns NaN"
        )
        self.features_ = unit_rows(features)
        self.labels_ = as_labels(labels, len(features)).to(features.device).clone()  # not the caller's tensor
        self.num_classes_ = int(self.labels_.max()) + 1
        if self.k > len(self.labels_):  # every training image votes: say so rather than print the k asked for
            warnings.warn(
                f"kNN: k={self.k} is more than the {len(self.labels_)} labelled training images; k="
                f"{len(self.labels_)} is used (eval.knn_k)",
                stacklevel=2,
            )
        return self

    def predict_scores(self, features: torch.Tensor | Any) -> torch.Tensor:
        """Class scores (N, C); for ``temperature < 0.02`` relative to each row's nearest neighbour (see
        :func:`vote_weights`). ``features`` (N, D) are moved to the device of the training features.

        Raises:
            NotFittedError: called before :meth:`fit`.
        """
        check_fitted(self, "features_")
        q = as_features(features).to(self.features_.device)
        if q.shape[1] != self.features_.shape[1]:
            raise ValueError(f"kNN: features have {q.shape[1]} columns, the training ones {self.features_.shape[1]}")
        q = unit_rows(q)
        k = min(self.k, self.features_.shape[0])
        out = []
        for start in range(0, q.shape[0], self.chunk):
            sim = q[start : start + self.chunk] @ self.features_.t()  # (n, N_train)
            top_sim, top_idx = sim.topk(k, dim=1)
            weights = vote_weights(top_sim, self.temperature)
            votes = torch.zeros(sim.shape[0], self.num_classes_, device=q.device)
            votes.scatter_add_(1, self.labels_[top_idx], weights)
            out.append(votes)
        return torch.cat(out) if out else torch.zeros(0, self.num_classes_, device=q.device)

    def predict(self, features: torch.Tensor | Any) -> torch.Tensor:
        """Predicted class (N,) of every row of ``features`` (N, D) (arbitrary for a non-finite row, with a
        warning)."""
        check_fitted(self, "features_")
        features = as_features(features)
        nonfinite_rows(features, "the features", "kNN.predict", "their predicted classes are meaningless")
        return self.predict_scores(features).argmax(1)

    def score(self, features: torch.Tensor | Any, labels: torch.Tensor | Any) -> float:
        """Top-1 accuracy in [0, 1] of ``features`` (N, D) against ``labels`` (N,); NaN when these features or the
        training ones hold a non-finite row (with a warning), as no accuracy can be read from them.

        Raises:
            ValueError: ``labels`` that are not class indices >= 0 (an unlabelled -1 would count as a miss), or
                that do not match the features.
        """
        check_fitted(self, "features_")
        features = as_features(features)
        bad = nonfinite_rows(features, "the features", "kNN.score", "the score is NaN")
        pred = self.predict_scores(features).argmax(1).cpu()
        hits = pred == as_labels(labels, len(pred)).cpu()
        return math.nan if bad or self.nonfinite_rows_ else accuracy(hits)
