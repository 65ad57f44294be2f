"""Evaluation on streamed data sets (ImageNet): features are computed batch by batch and never all held at once.

* :func:`stream_features`: frozen backbone features of a split, batch by batch (this process's stride of it).
* :func:`knn_stream`: the weighted cosine kNN of :class:`~directpred.eval.knn.KNNClassifier` with the training
  features streamed past the test features: a running top-k per test image (test features, 50,000 x 2,048 for
  ImageNet, are the only ones held); the same scores as the in-memory classifier.
* :class:`ByolLinearEval`: BYOL's linear evaluation protocol (BYOL paper, Appendix C.1): a linear classifier on the
  frozen backbone's features, trained on random resized crops (scale 0.08-1) with horizontal flips, tested on the
  centre crop (resize 256 / centre crop 224 at ImageNet size), SGD with Nesterov momentum and a cosine learning
  rate schedule, no weight decay by default; top-1 and top-5. Every epoch re-embeds freshly augmented images, as
  BYOL does, so nothing of size N is stored.

Over 300 lines: the streamed kNN and the streamed linear protocol share the feature pass and its sharding.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from directpred import distributed
from directpred.config import Config, ConfigError
from directpred.data.augment import ViewRecipe, augment_view, eval_transform
from directpred.data.stream import Reader, StreamData, StreamSource, iterate_split
from directpred.eval.inputs import accuracy, as_features, as_labels, check_count, nonfinite_rows, unit_rows
from directpred.eval.knn import vote_weights


@torch.no_grad()
def stream_features(
    backbone: nn.Module,
    reader: Reader,
    recipe: ViewRecipe,
    *,
    decode_size: int,
    batch_size: int = 256,
    workers: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    skip_corrupt: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features (b, D) float32 on ``device``, labels (b,)) of this process's images of ``reader`` (rows
    ``rank, rank+world, ...``): decoded at ``decode_size``, centre-cropped to ``recipe.size``, normalised."""
    device = torch.device(device)
    was_training = backbone.training
    backbone.eval()
    empty = True
    try:
        for images, labels in iterate_split(
            reader,
            decode_size,
            crop=recipe.size,
            batch_size=batch_size,
            workers=workers,
            rank=distributed.rank(),
            world=distributed.world_size(),
            skip_corrupt=skip_corrupt,
        ):
            x = eval_transform(images.to(device, non_blocking=True), recipe)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                yield backbone(x).float(), labels.to(device)
            empty = False
        if empty:  # no images for this process (fewer than processes): an empty batch gives the feature width
            x = torch.zeros(0, 3, recipe.size, recipe.size, device=device)
            yield backbone(x).float(), torch.zeros(0, dtype=torch.long, device=device)
    finally:
        backbone.train(was_training)


def _gather(t: torch.Tensor) -> torch.Tensor:
    """Every process's ``t`` concatenated in rank blocks (the per-process top-k lists of :func:`knn_stream`); rows a
    process streamed by stride are gathered with :func:`~directpred.distributed.gather_strided` instead."""
    return distributed.gather_cat(t) if distributed.world_size() > 1 else t


@torch.no_grad()
def knn_stream(
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    train_batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
) -> float:
    """Top-1 accuracy in [0, 1] of the weighted cosine kNN (as :class:`~directpred.eval.knn.KNNClassifier`) with
    the training features streamed: only a running top-k (similarity, label) per test image is kept. In a
    multi-process run each process streams its part of the training set and the top-k lists are merged; every
    process must pass all test features. NaN when a test or training feature row is non-finite (with a warning,
    as :meth:`KNNClassifier.score <directpred.eval.knn.KNNClassifier.score>`)."""
    check_count(k, "k", "kNN", "eval.knn_k")  # as KNNClassifier: k=0 or T<=0 returned a number before
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"kNN: temperature={temperature!r} must be > 0 (eval.knn_t)")
    test_features = as_features(test_features, "test_features")
    test_labels = as_labels(test_labels, len(test_features), "test_labels")  # a -1 would have counted as a miss
    bad_test = nonfinite_rows(test_features, "the test features", "kNN", "the score is NaN")
    bad_train = torch.zeros((), dtype=torch.long, device=test_features.device)
    q = unit_rows(test_features)
    best_sim = torch.full((len(q), k), -math.inf, device=q.device)
    best_lab = torch.zeros((len(q), k), dtype=torch.long, device=q.device)
    n_train = 0
    for feats, labels in train_batches:
        n_train += len(labels)
        if len(labels) and int(labels.min()) < 0:  # as KNNClassifier.fit (an index error in scatter_add_ before)
            raise ValueError(
                f"kNN: {int((labels < 0).sum())} training labels are -1 (unlabelled); drop those images first"
            )
        bad_train += (~torch.isfinite(feats)).any(1).sum()
        sim = q @ unit_rows(feats).t()
        lab = labels.long().to(q.device).expand(len(q), -1)
        best_sim, pos = torch.cat([best_sim, sim], 1).topk(k, dim=1)
        best_lab = torch.cat([best_lab, lab], 1).gather(1, pos)
    world = distributed.world_size()
    counts = torch.stack([bad_train, torch.tensor(n_train, device=bad_train.device)])
    if world > 1:
        counts = distributed.all_reduce_sum(counts)  # every process returns the same verdict
    n_bad, n_seen = (int(c) for c in counts.tolist())
    if n_seen < k:  # as KNNClassifier: the missing neighbours' similarity -inf gives them no vote
        warnings.warn(
            f"kNN: k={k} is more than the {n_seen} labelled training images; k={n_seen} is used (eval.knn_k)",
            stacklevel=2,
        )
    if n_bad:
        warnings.warn(
            f"kNN: {n_bad} training feature rows are non-finite (NaN or inf): the score is NaN "
            "(features of a diverged model?)",
            RuntimeWarning,
            stacklevel=2,
        )
    if bad_test or n_bad:
        return math.nan
    if world > 1:  # each process holds the top-k of its part: merge them
        all_sim = _gather(best_sim).view(world, len(q), k).permute(1, 0, 2).reshape(len(q), world * k)
        all_lab = _gather(best_lab).view(world, len(q), k).permute(1, 0, 2).reshape(len(q), world * k)
        best_sim, pos = all_sim.topk(k, dim=1)
        best_lab = all_lab.gather(1, pos)
    votes = torch.zeros(len(q), num_classes, device=q.device)
    votes.scatter_add_(1, best_lab, vote_weights(best_sim, temperature))  # exp(-inf) = 0: fewer than k neighbours
    return accuracy(votes.argmax(1).cpu() == test_labels.cpu())


def probe_recipe(test_recipe: ViewRecipe) -> ViewRecipe:
    """BYOL's linear-evaluation training augmentation: random resized crop + horizontal flip, nothing else, with
    the test recipe's size and normalisation."""
    return replace(
        test_recipe, crop_scale=(0.08, 1.0), flip_p=0.5, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0
    )


class ByolLinearEval:
    """BYOL's linear evaluation on streamed images (see the module docstring).

    Args:
        epochs: passes over the training split (BYOL: 80 on ImageNet).
        lr: base learning rate (BYOL's ``base_learning_rate``): the rate applied is ``lr`` x the global batch
            (``batch_size`` x processes) / 256, as BYOL's code scales it (0.2 -> 0.8 at 1024), decayed by a
            cosine schedule to 0 over all steps.
        momentum: Nesterov momentum (0.9).
        weight_decay: SGD weight decay (BYOL uses none).
        batch_size: per process.
        seed: the data order and crop draws (pure functions of seed, epoch, step).
        workers: DataLoader workers decoding the images.

    Attributes (after ``fit``):
        history_: (top-1, top-5) on the test split after each epoch, in [0, 1] (top-5 NaN with 5 classes or
            fewer).
        top1_, top5_: the final epoch's.
        best_top1_: the best top-1 over epochs (selected on the test split: optimistic).
        peak_lr_: the learning rate applied at the first step (``lr`` scaled by the global batch).
    """

    def __init__(
        self,
        *,
        epochs: int = 80,
        lr: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        batch_size: int = 256,
        seed: int = 0,
        workers: int = 0,
    ) -> None:
        self.epochs, self.lr, self.momentum, self.weight_decay = epochs, lr, momentum, weight_decay
        self.batch_size, self.seed, self.workers = batch_size, seed, workers

    def fit(
        self,
        backbone: nn.Module,
        train: Reader,
        test: Reader,
        test_recipe: ViewRecipe,
        *,
        decode_size: int,
        num_classes: int,
        feature_dim: int,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        skip_corrupt: bool = False,
    ) -> ByolLinearEval:
        """Train the linear layer on ``train``'s augmented images through the frozen ``backbone`` (its mode is
        restored afterwards), scoring ``test`` after every epoch. Returns ``self``.

        Raises:
            ConfigError: (a ValueError) ``batch_size`` times the number of processes exceeds the training images.
        """
        from directpred.data.order import step_generator

        device = torch.device(device)
        rank, world = distributed.rank(), distributed.world_size()
        g = torch.Generator().manual_seed(self.seed)
        self.linear_ = nn.Linear(feature_dim, num_classes).to(device)
        with torch.no_grad():  # seeded init (the same on every process)
            self.linear_.weight.copy_(torch.randn(self.linear_.weight.shape, generator=g) * 0.01)
            self.linear_.bias.zero_()
        opt = torch.optim.SGD(
            self.linear_.parameters(), lr=self.lr, momentum=self.momentum, nesterov=True, weight_decay=self.weight_decay
        )
        source = StreamSource(
            train,
            decode_size,
            batch_size=self.batch_size,
            seed=self.seed + 1,
            rank=rank,
            world=world,
            workers=self.workers,
            skip_corrupt=skip_corrupt,
        )
        if source.steps_per_epoch < 1:  # a ConfigError is a ValueError: the library contract holds
            most = len(train) // world
            fix = (
                f"set it to at most {most} (e.g. --set eval.linear_batch_size={most})"
                if most
                else "run the evaluation with fewer processes"
            )
            raise ConfigError(
                f"eval.linear_batch_size={self.batch_size} is not allowed: BYOL's linear evaluation takes "
                f"{self.batch_size} images per process x {world} process(es) per step, more than the {len(train)} "
                f"training images, so an epoch would have no step; {fix}"
            )
        total = self.epochs * source.steps_per_epoch
        self.peak_lr_ = self.lr * self.batch_size * world / 256  # BYOL's linear scaling of the base rate
        aug = probe_recipe(test_recipe)
        was_training = backbone.training
        backbone.eval()
        try:  # the caller's mode comes back also when an epoch fails (out of memory, an interrupt)
            self.history_: list[tuple[float, float]] = []
            step = 0
            for epoch in range(self.epochs):
                # the labels of the images decoded: a corrupt file replaced under skip_corrupt brings its
                # replacement's
                for images, labels in source.labelled_batches(epoch):
                    for group in opt.param_groups:
                        group["lr"] = self.peak_lr_ * 0.5 * (1 + math.cos(math.pi * step / total))
                    x = augment_view(
                        images.to(device, non_blocking=True),
                        aug,
                        step_generator(self.seed + 1, step),
                        shard=(rank, world),
                    )
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    with (
                        torch.no_grad(),
                        torch.autocast(
                            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                        ),
                    ):
                        feats = backbone(x).float()
                    loss = F.cross_entropy(self.linear_(feats), labels.to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if world > 1:
                        for p in self.linear_.parameters():
                            assert p.grad is not None  # every weight of the linear layer is in the loss
                            p.grad = distributed.all_reduce_mean(p.grad)
                    opt.step()
                    step += 1
                self.history_.append(
                    self.score(
                        backbone,
                        test,
                        test_recipe,
                        decode_size=decode_size,
                        device=device,
                        autocast_dtype=autocast_dtype,
                        channels_last=channels_last,
                        skip_corrupt=skip_corrupt,
                    )
                )
        finally:
            backbone.train(was_training)
        self.top1_, self.top5_ = self.history_[-1]
        self.best_top1_ = max(h[0] for h in self.history_)
        return self

    @torch.no_grad()
    def score(
        self,
        backbone: nn.Module,
        test: Reader,
        test_recipe: ViewRecipe,
        *,
        decode_size: int,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = False,
        skip_corrupt: bool = False,
    ) -> tuple[float, float]:
        """(top-1, top-5) in [0, 1] on the centre crops of ``test`` (all processes' images counted); both NaN, with a
        warning, when a feature row is non-finite; top-5 NaN with 5 classes or fewer (it would be 1 whatever the
        classifier)."""
        device = torch.device(device)
        counts = torch.zeros(4, device=device)  # top-1 hits, top-5 hits, images, non-finite feature rows
        for feats, labels in stream_features(
            backbone,
            test,
            test_recipe,
            decode_size=decode_size,
            batch_size=self.batch_size,
            workers=self.workers,
            device=device,
            autocast_dtype=autocast_dtype,
            channels_last=channels_last,
            skip_corrupt=skip_corrupt,
        ):
            logits = self.linear_(feats)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = top == labels.view(-1, 1)
            bad = (~torch.isfinite(feats)).any(1).sum()
            counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(labels), device=device), bad])
        if distributed.world_size() > 1:
            counts = distributed.all_reduce_sum(counts)
        weights_bad = not all(bool(torch.isfinite(p).all()) for p in self.linear_.parameters())
        if counts[3] or weights_bad:  # NaN training features make the classifier NaN: the same verdict
            what = f"{int(counts[3])} of the {int(counts[2])} test feature rows"
            what = "the classifier's weights" if weights_bad else what
            warnings.warn(
                f"linear evaluation: {what} are non-finite (NaN or inf): top-1 and top-5 are NaN (features of a "
                "diverged model?)",
                RuntimeWarning,
                stacklevel=2,
            )
            return math.nan, math.nan
        top1, top5, n = (int(c) for c in counts[:3].tolist())  # exact counts (float32 division rounded)
        if not n:
            return math.nan, math.nan
        # With 5 classes or fewer every label is in the top 5: no top-5 figure, rather than a trivial 100 %.
        return top1 / n, (top5 / n if self.linear_.out_features > 5 else math.nan)


@torch.no_grad()
def evaluate_stream(
    backbone: nn.Module,
    data: StreamData,
    cfg: Config,
    test_recipe: ViewRecipe,
    device: torch.device,
    *,
    linear: bool = True,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """kNN (streamed) and, with ``linear``, the linear evaluation of ``eval.linear_protocol`` on a streamed data set:
    ``knn_top1``, ``linear_top1`` (final epoch), ``linear_top1_best``, ``linear_top5`` in percent.

    ``eval.linear_protocol=byol`` is :class:`ByolLinearEval`; ``authors`` runs the authors' probe
    (:class:`~directpred.eval.linear_probe.LinearProbe`) on centre-crop features, which are then held in memory
    (fine for a proxy, not for 1.28M images).
    """
    from directpred.eval.linear_probe import LinearProbe

    e = cfg.eval

    def features(reader: Reader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return stream_features(
            backbone,
            reader,
            test_recipe,
            decode_size=data.decode_size,
            batch_size=e.batch_size,
            workers=cfg.data.workers,
            device=device,
            autocast_dtype=autocast_dtype,
            channels_last=channels_last,
            skip_corrupt=cfg.data.skip_corrupt,
        )

    # Each process streams rows rank, rank+world, ...: gathered in data-set order, so that the authors' probe (its
    # seeded shuffle) sees the same rows in the same order whatever the number of processes.
    test = list(features(data.test.reader))
    f_test = distributed.gather_strided(torch.cat([f for f, _ in test]))
    y_test = distributed.gather_strided(torch.cat([y for _, y in test]))
    out: dict[str, float] = {"knn_k_used": min(e.knn_k, len(data.train.reader))}  # fewer images than k: all vote
    train_batches = features(data.train.reader)
    if linear and e.linear_protocol == "authors":  # the features are needed twice: keep them
        train = list(train_batches)
        out["knn_top1"] = 100.0 * knn_stream(
            f_test, y_test, iter(train), num_classes=data.num_classes, k=e.knn_k, temperature=e.knn_t
        )
        f_train = distributed.gather_strided(torch.cat([f for f, _ in train]))
        y_train = distributed.gather_strided(torch.cat([y for _, y in train]))
        with torch.enable_grad():
            probe = LinearProbe(
                epochs=e.linear_epochs,
                lr=e.linear_lr,
                weight_decay=e.linear_weight_decay,
                batch_size=e.linear_batch_size,
                seed=cfg.train.seed,
            ).fit(f_train, y_train, f_test, y_test)
        out["linear_top1"] = 100.0 * probe.history_[-1]
        out["linear_top1_best"] = 100.0 * probe.best_accuracy_
        return out
    out["knn_top1"] = 100.0 * knn_stream(
        f_test, y_test, train_batches, num_classes=data.num_classes, k=e.knn_k, temperature=e.knn_t
    )
    if linear:
        with torch.enable_grad():
            ev = ByolLinearEval(
                epochs=e.linear_epochs,
                lr=e.linear_lr,
                momentum=e.linear_momentum,
                weight_decay=e.linear_weight_decay,
                batch_size=e.linear_batch_size,
                seed=cfg.train.seed,
                workers=cfg.data.workers,
            )
            ev.fit(
                backbone,
                data.train.reader,
                data.test.reader,
                test_recipe,
                decode_size=data.decode_size,
                num_classes=data.num_classes,
                feature_dim=f_test.shape[1],
                device=device,
                autocast_dtype=autocast_dtype,
                channels_last=channels_last,
                skip_corrupt=cfg.data.skip_corrupt,
            )
        out["linear_top1"] = 100.0 * ev.top1_
        out["linear_top1_best"] = 100.0 * ev.best_top1_
        if data.num_classes > 5:  # with fewer, every label is in the top 5: no figure rather than a trivial 100 %
            out["linear_top5"] = 100.0 * ev.top5_
    return out
