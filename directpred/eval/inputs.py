"""Checks of what the evaluation estimators are given: features (N, D) and class labels (N,), as tensors or
array-likes (numpy arrays, lists), as scikit-learn estimators take them."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch


class NotFittedError(ValueError, AttributeError):
    """An estimator used before ``fit``: scikit-learn's ``NotFittedError``, with the same two bases (so code that
    catches either, as scikit-learn's callers do, catches it), without importing scikit-learn."""


def check_fitted(estimator: object, attribute: str) -> None:
    """Raise :class:`NotFittedError` unless ``estimator`` has the learned ``attribute`` (set by ``fit``)."""
    if not hasattr(estimator, attribute):
        name = type(estimator).__name__
        raise NotFittedError(f"this {name} is not fitted yet: call fit() first, then predict() or score()")


def check_count(value: Any, name: str, who: str, key: str = "") -> None:
    """Refuse a hyperparameter that is not an integer >= 1 (``epochs``, ``batch_size``, ``k``, ``chunk``): a
    ValueError naming ``who``, ``name`` and the config ``key`` that sets it. A bool is refused, and so is an
    integral float (``2.0``), which passed a value check before and then broke ``range`` or ``topk`` with a
    TypeError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{who}: {name}={value!r} must be an integer >= 1" + (f" ({key})" if key else ""))


def nonfinite_rows(x: torch.Tensor, name: str, who: str, consequence: str) -> int:
    """How many rows of ``x`` (N, D) hold a NaN or an infinity; when any, one warning that says so, names ``x``
    and ``who`` and gives the ``consequence``. Non-finite features (a diverged or overflowed model) give an
    arbitrary argmax, so an accuracy computed from them would look plausible (about 1/C) and mean nothing."""
    bad = int((~torch.isfinite(x)).any(1).sum()) if x.numel() else 0
    if bad:
        warnings.warn(
            f"{who}: {bad} of the {len(x)} rows of {name} are non-finite (NaN or inf): {consequence} "
            "(features of a diverged model?)",
            RuntimeWarning,
            stacklevel=3,
        )
    return bad


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` (N, D) in float32 scaled to unit L2 norm, as ``F.normalize`` does, but also where their norm
    overflows float32 (finite features beyond about 1e18, which a diverging run passes through before it reaches
    inf: ``F.normalize`` turned every such row into zeros, and kNN into a silent chance-level score): each row is
    first divided by its largest magnitude. A zero row stays zero; a non-finite row stays non-finite."""
    x = x.float()
    peak = x.abs().amax(dim=1, keepdim=True) if x.numel() else x.new_ones(len(x), 1)
    return torch.nn.functional.normalize(x / torch.where(peak > 0, peak, torch.ones_like(peak)), dim=1)


def as_features(x: Any, name: str = "features") -> torch.Tensor:
    """``x`` as a floating tensor (N, D) (a tensor is kept on its device and in its floating dtype), detached from
    any autograd graph: features are frozen inputs (straight out of a forward pass they carried the graph, which a
    probe's ``backward`` then ran through a second time, and which a kNN bank kept alive)."""
    t = torch.as_tensor(x).detach()
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N, D), got shape {tuple(t.shape)}")
    return t if t.is_floating_point() else t.float()


def accuracy(hits: torch.Tensor) -> float:
    """The share of true entries of the boolean ``hits`` (N,), computed from the exact count (``hits.float().mean()``
    rounded in float32: 2 of 3 gave 0.6666666865, 66.66666865 % in ``summary.json``); NaN when ``hits`` is empty.

        >>> accuracy(torch.tensor([True, True, False]))
        0.6666666666666666
    """
    return int(hits.sum()) / len(hits) if len(hits) else math.nan


def as_labels(y: Any, n: int, name: str = "labels") -> torch.Tensor:
    """``y`` as a long tensor (n,) of class indices >= 0 (the classes are 0 .. max(labels)). Unlabelled rows (-1)
    are refused, for training and test labels alike: drop them first (in a test set they would count as misses)."""
    t = torch.as_tensor(y)
    if t.ndim != 1 or len(t) != n:
        raise ValueError(
            f"{name} must be a 1-D array of {n} class indices (one per feature row), got shape {tuple(t.shape)}"
        )
    if t.is_floating_point():
        if not bool((t == t.round()).all()):
            raise ValueError(
                f"{name} must be integer class indices, got non-integer values such as {float(t[t != t.round()][0])}"
            )
    elif t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must be integer class indices, got dtype {t.dtype}")
    t = t.long()
    negative = int((t < 0).sum())
    if negative:
        raise ValueError(
            f"{name} must be class indices >= 0, got {int(t.min())} in {negative} of {n} rows (drop unlabelled rows "
            "first)"
        )
    return t
