"""The evaluation protocol of a trained method: kNN monitor and linear probe on the online backbone's features."""

from __future__ import annotations

from typing import Any

import torch

from directpred import distributed
from directpred.backbones import resolve_channels_last
from directpred.config import Config
from directpred.data.datasets import DataBundle
from directpred.data.stream import StreamData
from directpred.data.views import view_recipes
from directpred.eval.features import extract_features
from directpred.eval.knn import KNNClassifier
from directpred.eval.linear_probe import LinearProbe
from directpred.methods import Siamese


@torch.no_grad()
def evaluate(
    method: Siamese,
    data: DataBundle | StreamData,
    cfg: Config,
    device: torch.device,
    *,
    linear: bool = True,
    autocast_dtype: torch.dtype | None = None,
    features: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """kNN (and optionally the linear probe) of the online backbone's frozen features.

    Returns ``knn_top1`` and, with ``linear``, ``linear_top1`` (final probe epoch, the headline) and
    ``linear_top1_best`` (best over probe epochs, the authors' reported figure), all in percent. A streamed data set
    is evaluated by :func:`directpred.eval.stream_eval.evaluate_stream` (also ``linear_top5`` under the byol
    protocol).

    ``features``, a dict, receives the test split's features and labels (``test``, ``test_labels``) of an in-memory
    data set, for the online probe (:class:`directpred.train.callbacks.OnlineProbeCallback`).
    """
    _, test_recipe = view_recipes(cfg, data)
    backbone = method.encoder.backbone
    distributed.broadcast_buffers(backbone)  # every rank embeds with rank 0's BatchNorm statistics
    if isinstance(data, StreamData):
        from directpred.eval.stream_eval import evaluate_stream

        return evaluate_stream(
            backbone,
            data,
            cfg,
            test_recipe,
            device,
            linear=linear,
            autocast_dtype=autocast_dtype,
            channels_last=resolve_channels_last(cfg.train.channels_last, backbone, device, training=False),
        )
    kw: dict[str, Any] = dict(
        batch_size=cfg.eval.batch_size,
        device=device,
        autocast_dtype=autocast_dtype,
        channels_last=resolve_channels_last(cfg.train.channels_last, backbone, device, training=False),
    )
    f_train = extract_features(backbone, data.train.images, test_recipe, **kw)
    f_test = extract_features(backbone, data.test.images, test_recipe, **kw)
    labelled = data.train.labels >= 0
    f_train, y_train = f_train[labelled.to(f_train.device)], data.train.labels[labelled]
    out: dict[str, float] = {}
    knn = KNNClassifier(k=cfg.eval.knn_k, temperature=cfg.eval.knn_t).fit(f_train, y_train.to(f_train.device))
    out["knn_top1"] = 100.0 * knn.score(f_test, data.test.labels)
    out["knn_k_used"] = min(cfg.eval.knn_k, len(y_train))  # fewer labelled images than k: all of them vote
    if features is not None:
        features.update(test=f_test, test_labels=data.test.labels)
    if linear:
        with torch.enable_grad():
            probe = LinearProbe(
                epochs=cfg.eval.linear_epochs,
                lr=cfg.eval.linear_lr,
                weight_decay=cfg.eval.linear_weight_decay,
                batch_size=cfg.eval.linear_batch_size,
                seed=cfg.train.seed,
            ).fit(f_train, y_train, f_test, data.test.labels)
        out["linear_top1"] = 100.0 * probe.history_[-1]
        out["linear_top1_best"] = 100.0 * probe.best_accuracy_
    return out
