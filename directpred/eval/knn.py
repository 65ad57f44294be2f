"""Weighted kNN classifier on cosine similarity (the kNN monitor of InstDisc/SimCLR-style SSL code)."""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


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
    attributes end in ``_``.

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

    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> KNNClassifier:
        self.features_ = F.normalize(features.float(), dim=1)
        self.labels_ = labels.long().to(features.device)
        self.num_classes_ = int(self.labels_.max()) + 1
        if self.k > len(self.labels_):  # every training image votes: say so rather than print the k asked for
            warnings.warn(
                f"kNN: k={self.k} is more than the {len(self.labels_)} labelled training images; k="
                f"{len(self.labels_)} is used (eval.knn_k)",
                stacklevel=2,
            )
        return self

    def predict_scores(self, features: torch.Tensor) -> torch.Tensor:
        """Class scores (N, C); for ``temperature < 0.02`` relative to each row's nearest neighbour (see
        :func:`vote_weights`)."""
        q = F.normalize(features.float(), dim=1)
        k = min(self.k, self.features_.shape[0])
        out = []
        for start in range(0, q.shape[0], self.chunk):
            sim = q[start : start + self.chunk] @ self.features_.t()  # (n, N_train)
            top_sim, top_idx = sim.topk(k, dim=1)
            weights = vote_weights(top_sim, self.temperature)
            votes = torch.zeros(sim.shape[0], self.num_classes_, device=q.device)
            votes.scatter_add_(1, self.labels_[top_idx], weights)
            out.append(votes)
        return torch.cat(out)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.predict_scores(features).argmax(1)

    def score(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy in [0, 1]."""
        return float((self.predict(features).cpu() == labels.cpu()).float().mean())
