"""Evaluation of frozen representations: feature extraction, kNN monitor, linear probe."""

from directpred.eval.features import extract_features
from directpred.eval.inputs import NotFittedError
from directpred.eval.knn import KNNClassifier
from directpred.eval.linear_probe import LinearProbe

__all__ = ["extract_features", "KNNClassifier", "LinearProbe", "NotFittedError"]
