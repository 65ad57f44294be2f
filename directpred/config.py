"""Typed run configuration: dataclass defaults, YAML overrides, strict ``--set key=value``.

The defaults reproduce the paper's CIFAR-10/STL-10 recipe (paper.md §5-6): ResNet-18, batch 128, SGD lr 0.03,
momentum 0.9, weight decay 4e-4, EMA 0.996, 100 epochs, DirectPred with rho=0.3, eps=0.1, freq=1.

Each field's docstring (the string literal below it) is its meaning in the configuration reference, which
:mod:`directpred.config_doc` generates from this module (``python -m directpred.config_doc``).

A YAML file only overrides these defaults. Every key is checked: an unknown key, a value of the wrong type or an
impossible value raises :class:`ConfigError` naming the key and what is allowed, before any work starts.

Over 300 lines: every section's dataclass with its documented defaults, and the one strict merge and
validation that names the key.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import math
import os
import re
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

# The optional extras of pyproject.toml and the packages each installs (a test keeps the two in step).
EXTRAS = {
    "plot": "matplotlib",
    "onnx": "onnx onnxscript",
    "wandb": "wandb",
    "mlflow": "mlflow",
    "torchcodec": "torchcodec",
}


def install_hint(extra: str) -> str:
    """How to install an optional extra: its packages by name, or the extra from a clone of this repository
    (``pip install 'directpred[plot]'`` would look for directpred on PyPI)."""
    return f"pip install {EXTRAS[extra]} (or, in a clone of directpred, pip install -e '.[{extra}]')"


class ConfigError(ValueError):
    """A configuration key is unknown, has the wrong type, or an impossible value."""


@dataclass
class MethodConfig:
    """The self-supervised method: BYOL (EMA target) or SimSiam (stop-gradient of the online branch)."""

    name: Literal["byol", "simsiam"] = "byol"
    """`byol`: EMA target; `simsiam`: the target is the online branch under a stop-gradient."""
    ema: float = 0.996
    """gamma_a, the target momentum (BYOL); 1 - gamma_a = alpha*beta in the paper's notation."""
    ema_schedule: Literal["constant", "cosine"] = "constant"
    """`cosine`: gamma_a rises to 1 over training (BYOL paper)."""
    symmetric_loss: bool = True
    """Both views predict each other; false: only view 1 predicts view 2."""
    stop_gradient: bool = True
    """False is the Theorem 2 ablation (SimSiam only): the network collapses."""
    target_init: Literal["copy", "random"] = "copy"
    """`copy`: the target starts as a copy of the online network; `random`: independent initialisation, as in the
    authors' code (the paper configs use it)."""
    isoloss: bool = False
    """IsoLoss (Halvagal et al. 2023): the loss's gradient reaches the projection f as if W_p were the identity,
    p = StopGrad(W_p f) + f - StopGrad(f), so that every eigenmode learns at the same rate; the loss value is
    unchanged. Needs a predictor without trainable parameters: refused for linear, mlp, and
    directpred/directcopy/optimal with freq > 1 (SGD steps between settings); partitioned directpred takes any freq."""


@dataclass
class PredictorConfig:
    """The predictor W_p. See :mod:`directpred.heads` for the maths of each choice."""

    name: Literal["directpred", "directcopy", "optimal", "linear", "mlp", "none"] = "directpred"
    """`directpred`: W_p from the eigendecomposition of F^ (Eq. 18); `directcopy`: W_p = F^/||F^|| + eps I;
    `optimal`: least-squares W_p (Table 1); `linear`: one SGD-trained layer; `mlp`: Linear-BN-ReLU-Linear;
    `none`: W_p = I (collapses)."""
    # linear / mlp
    bias: bool = False
    """Bias of the one-layer `linear` predictor (Tables 2/3)."""
    mlp_bias: bool = True
    """Biases of the two-layer `mlp` predictor's linear layers (the authors' `has_bias`; Table 3's two-layer "no bias"
    columns set false)."""
    symmetric: bool = False
    """The paper's "sym W_p" (Table 3): symmetric init, symmetrised update; `mlp`: tied layers."""
    hidden_dim: int = 512
    """Hidden units of the `mlp` predictor."""
    # directpred / directcopy: the running estimate F^ of E[f f^T] (Eq. 19) and the map to W_p (Eq. 18)
    rho: float = 0.3
    """Moving-average rate of F^ (Eq. 19), in [0, 1): F^ <- rho F^ + (1 - rho) z^T z / B."""
    eps: float = 0.1
    """Boost of small eigenvalues (Eq. 18); DirectCopy: the eps of F^/||F^|| + eps I."""
    freq: int = 1
    """Set W_p every `freq` steps; >1: SGD steps on W_p in between (the hybrid, Table 8); with `partitions` the cells'
    W_p are held in between (no trainable weight)."""
    eps_mode: Literal["code", "paper"] = "code"
    """`code` (the authors' code): p_j = sqrt(s_j/s_max) + eps; `paper` (Eq. 18): p_j = sqrt(s_j) + eps s_max."""
    c: float = 0.0
    """The c_j variant p_j = sqrt(max(s_j - c, 0)) (Table 7), in code mode on s_j/s_max (so c < 1) and floored at 0.01
    as in the authors' code; 0 disables it."""
    zero_mean: bool = False
    """Covariance instead of correlation (the paper reports it hurts)."""
    average: Literal["ema", "cumulative"] = "ema"
    """`ema`: moving average with rate `rho`; `cumulative`: simple average of all batch terms."""
    partitions: int = 0
    """Feature-dependent W_p from this many random hyperplanes, drawn from `train.seed` (directpred only); 0: one
    global F^."""
    ridge: float = 1e-4
    """`optimal`: W_p = S (F^ + lambda I)^-1 with lambda = ridge * tr(F^) / d."""
    update_at: Literal["forward", "after_step"] = "forward"
    """`forward`: fold the batch into F^ and set W_p before predicting (W_p from F^ up to this step); `after_step`:
    the authors' order, predict with the current W_p, fold and set after the optimiser step (F^ up to the last
    step)."""


# The predictor options each predictor.name reads, besides update_at (Siamese reads it for every predictor: with a
# trained one there is nothing to fold, so both orders give the same run, and the paper sweeps set the authors'
# order for all their cells). Another option at a value other than its default draws a warning: the run ignores it,
# though config.yaml records it. A test checks this table against what directpred.heads' builders read.
PREDICTOR_OPTIONS: dict[str, tuple[str, ...]] = {
    "directpred": ("rho", "eps", "freq", "eps_mode", "c", "zero_mean", "average", "partitions"),
    "directcopy": ("rho", "eps", "freq", "zero_mean", "average"),
    "optimal": ("rho", "freq", "ridge", "average"),
    "linear": ("bias", "symmetric"),
    "mlp": ("hidden_dim", "mlp_bias", "symmetric"),
    "none": (),
}


@dataclass
class BackboneConfig:
    """A torchvision ResNet without its classifier."""

    name: Literal["resnet18", "resnet34", "resnet50"] = "resnet18"
    """Torchvision architecture, `fc` removed."""
    width: int = 64
    """Base channels; 64 is the standard ResNet, CPU recipes use 16-32."""
    cifar_stem: bool = True
    """3x3 stride-1 first convolution and no max-pool (for 32x32 images)."""


@dataclass
class ProjectorConfig:
    """Projector Linear-BN-ReLU-Linear (authors' defaults 512 -> 512 -> 128)."""

    hidden_dim: int = 512
    """Projector hidden units."""
    out_dim: int = 128
    """Projector output size d: the predictor's input and output size (F^ and W_p are d x d)."""
    bn_affine: bool = False
    """Affine BatchNorm in the projector and MLP predictor (the authors' code uses `BatchNorm1d(affine=False)`)."""


@dataclass
class DataConfig:
    """Where images come from and how they are augmented."""

    dataset: Literal["cifar10", "cifar100", "stl10", "folder"] = "cifar10"
    """A torchvision dataset (`stl10` pre-trains on train+unlabeled) or `folder`: the ImageFolder data of `path`."""
    path: str | None = None
    """An ImageFolder directory or .tar/.tar.gz with train/ and test/ (and optionally unlabeled/, pre-training
    only): the data of `folder`, or an explicit local copy of cifar10/cifar100/stl10 used instead of torchvision.
    Must exist. Relative in a config file: to its folder."""
    local_copy: str | None = None
    """cifar10/cifar100/stl10: a local copy (layout as `path`) used when it exists, else torchvision (`root`,
    `download`); e.g. the mirror beside the repository. Relative in a config file: to its folder."""
    root: str = "~/.cache/directpred/torchvision"
    """Torchvision datasets live here. Relative in a config file: to its folder."""
    download: bool = False
    """Let torchvision download cifar10/cifar100/stl10 into `root` when no copy exists."""
    cache_dir: str = "~/.cache/directpred"
    """Decoded archives and image arrays. Relative in a config file: to its folder."""
    augment: Literal["cifar", "stl10", "imagenet", "auto"] = "auto"
    """Augmentation recipe; `auto`: by dataset and image size."""
    image_size: int = 0
    """Training and test image size; 0: the dataset's own size."""
    train_subset: int = 0
    """A class-balanced subset of this many training images (at least one per class); 0: all."""
    test_subset: int = 0
    """A class-balanced subset of this many test images (quick evaluations; at least one per class); 0: all."""
    workers: int = 0
    """DataLoader worker processes decoding a streamed data set (`data.stream`); 0: in this process."""
    skip_corrupt: bool = False
    """Warn and skip unreadable images instead of failing (streamed: replace each by the next decodable one)."""
    stream: bool = False
    """Read and decode images lazily, batch by batch, in DataLoader workers (ImageNet scale) instead of decoding the
    whole set into memory; `data.path` is an ImageFolder tree (train/, val/ or test/) or a folder of tar shards
    (`directpred shards`). Needs `data.image_size`."""
    decode_size: int = 0
    """Streamed: side of the square the workers decode to (shorter side resized, centre kept); the views are random
    resized crops of it at `data.image_size` and the test images its centre crop. 0: `data.image_size`."""
    decode: Literal["auto", "cpu", "cuda"] = "cpu"
    """Streamed: `cuda` decodes JPEGs on the GPU (nvJPEG) in batches and workers only read files; `auto`: cuda on
    CUDA runs."""
    jpeg_decoder: Literal["auto", "torchcodec", "torchvision"] = "auto"
    """Streamed with `data.decode=cuda`: the batched JPEG decoder, TorchCodec (`pip install torchcodec`, the
    successor of torchvision's image decoders, which torchvision 0.29 deprecates) or `torchvision.io`; `auto`:
    TorchCodec when it imports. Either gives the same images up to rounding."""


@dataclass
class OptimConfig:
    """Optimiser of backbone + projector; the predictor gets its own parameter group."""

    name: Literal["sgd", "lars"] = "sgd"
    """SGD with momentum (the paper) or LARS (BYOL, large batches)."""
    lr: float = 0.03
    """Base learning rate alpha (not scaled with the batch size)."""
    momentum: float = 0.9
    """SGD/LARS momentum."""
    weight_decay: float = 4e-4
    """eta-bar = alpha * eta in the paper's notation."""
    alpha_p: float = 1.0
    """The predictor's learning rate relative to the trunk (paper: alpha_p); 0 freezes it."""
    predictor_weight_decay: float = -1.0
    """Weight decay of the predictor's parameter group (Table 5); <0: same as `weight_decay`."""
    schedule: Literal["constant", "warmup_cosine"] = "constant"
    """Learning-rate schedule; the paper uses a constant lr."""
    warmup_epochs: float = 0.0
    """Linear warmup length in epochs (also with the constant schedule); less than `train.epochs`, and in steps
    (`round(warmup_epochs x steps per epoch)`) less than the run's steps."""
    lars_eta: float = 0.001
    """LARS trust coefficient."""


@dataclass
class TrainConfig:
    """Length, batch, precision, checkpoints and logging of a training run."""

    epochs: int = 100
    """Pre-training epochs (the last partial batch of an epoch is dropped); the length the lr and EMA schedules run
    over (raised on resume, a cosine schedule is stretched under the steps to come, with a warning)."""
    batch_size: int = 128
    """Per process; the global batch is batch_size * world_size."""
    seed: int = 0
    """Data order, augmentation draws, `data.train_subset`/`test_subset` picks, the linear probe and the hyperplanes
    of `predictor.partitions`; and the initialisation, because `directpred train` (`Trainer.setup`) and `directpred
    eval --untrained` call `torch.manual_seed(train.seed)` before they build the network: `build_method(cfg)` itself
    draws the weights from torch's global generator and does not read this seed."""
    device: str = "auto"
    """`auto`, `cpu`, `cuda` or `cuda:N`."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Autocast precision; `auto`: bf16 where the hardware runs it fast (the predictor's statistics stay fp32)."""
    channels_last: Literal["auto"] | bool = "auto"
    """Channels-last memory format (faster convolutions); `auto`: on, except on a CPU for networks with a strided
    1x1 convolution of < 8 input channels (`backbone.width < 8`), where oneDNN's backward is broken; `true` there is
    refused (directpred/backbones/memory_format.py)."""
    compile: bool = False
    """`torch.compile` the online encoder."""
    sync_bn: bool = False
    """SyncBatchNorm in multi-process runs, in the online branch and BYOL's target (CUDA only; refused for CPU
    processes)."""
    checkpoint_every: int = 10
    """Epochs between kept checkpoints/epoch_XXXX.pt (last.pt is written every epoch)."""
    checkpoint_every_steps: int = 0
    """Also refresh last.pt every this many steps (preemptible machines); 0: only every epoch."""
    log_every: int = 20
    """Steps between metrics.jsonl / TensorBoard rows."""
    progress: bool = True
    """Tqdm progress bar."""
    max_steps: int = 0
    """Stop after this many optimiser steps (smoke tests, or a run to go on later exactly: the schedules still run
    over train.epochs); 0: no limit."""
    skip_nonfinite: int = 0
    """Steps whose loss or gradient is NaN/inf that may be skipped (no optimiser, EMA or statistics update) instead
    of stopping the run, in total over the run (resumes included); 0: stop at the first."""


@dataclass
class EvalConfig:
    """kNN monitor during training and the offline linear probe at the end."""

    knn_every: int = 1
    """Epochs between kNN evaluations; 0: only at the end."""
    knn_k: int = 200
    """Neighbours (cosine similarity, votes weighted by exp(sim / T))."""
    knn_t: float = 0.1
    """kNN temperature T."""
    linear: bool = True
    """Run the linear probe when training ends."""
    linear_epochs: int = 50
    """Epochs of the authors' probe: standardised features, logistic regression, Adam."""
    linear_lr: float = 3e-4
    """Adam learning rate of the probe; with `eval.linear_protocol=byol` SGD's base rate, which must then be set (the
    default is refused there): the rate applied is it x the global probe batch / 256, as BYOL's code scales it (the
    ImageNet configs use BYOL's 0.2, so 0.8 at 128 per process x 8; weight decay 0, 80 epochs)."""
    linear_weight_decay: float = 1e-3
    """Adam weight decay of the probe."""
    linear_batch_size: int = 128
    """Probe minibatch."""
    linear_protocol: Literal["authors", "byol"] = "authors"
    """`authors`: standardised frozen features, logistic regression, Adam (CIFAR/STL-10); `byol`: BYOL's ImageNet
    protocol on streamed images: random resized crop + flip for training, centre crop for testing, a linear layer
    on frozen features by SGD with Nesterov momentum (`eval.linear_momentum`) and a cosine schedule, top-1 and
    top-5."""
    linear_momentum: float = 0.9
    """BYOL protocol: Nesterov momentum."""
    batch_size: int = 512
    """Feature extraction batch."""
    online_probe: bool = False
    """Train a linear classifier on the detached backbone features of every training batch's first view during
    pre-training (its own SGD optimiser; the training itself is unchanged): its train top-1 is logged every
    `train.log_every` steps and its test top-1 with every kNN evaluation (`probe` rows). The offline probe
    (`eval.linear`) stays the headline."""
    online_probe_lr: float = 0.1
    """SGD learning rate (momentum 0.9, no weight decay) of the online probe."""
    untrained: bool = False
    """Also evaluate the network training started from (its initialisation, rebuilt from `train.seed`) at the end, by
    the same protocol: `untrained_*` figures in `summary.json`, the gain printed and tabulated by sweeps (paired by
    seed). Training is unchanged (its own random draws are kept apart). `directpred eval RUN --untrained` does the
    same for a finished run."""


@dataclass
class DiagConfig:
    """Training diagnostics: predictor spectrum, eigenspace alignment, collapse and dimensional-collapse warnings."""

    every: int = 50
    """Steps between diagnostics; 0 disables them (the final report on the final state is always made)."""
    stop_on_collapse: bool = False
    """End the run (and evaluate) when the collapse rule fires (not the dimensional-collapse warning, which only
    warns)."""
    rho: float = 0.3
    """Moving-average rate of the F^ estimate kept for predictors that do not keep one."""


@dataclass
class LogConfig:
    """Where a run's metrics go besides `metrics.jsonl` (always written): TensorBoard, Weights & Biases, MLflow."""

    backends: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=lambda: ["tensorboard"])
    """Experiment trackers, from rank 0: `tensorboard` (in the run directory), `wandb` (pip install
    wandb; online or offline as wandb is set up, e.g. `WANDB_MODE=offline`), `mlflow` (pip install
    mlflow; the store of `MLFLOW_TRACKING_URI`, else MLflow's default in the working directory:
    `./mlruns` before MLflow 3, `sqlite:///mlflow.db` from 3.0); `[]`: metrics.jsonl only. Each
    gets the rows of metrics.jsonl under `kind/key` (spectra as histograms where the tracker has them), the resolved
    config as run parameters and the run directory's name as the run name; a resumed run continues the same tracker
    run (its id is kept in the run directory)."""
    project: str = "directpred"
    """The W&B project and the MLflow experiment the runs go to."""


@dataclass
class Config:
    """A complete run configuration."""

    method: MethodConfig = field(default_factory=MethodConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    diag: DiagConfig = field(default_factory=DiagConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (what ``config.yaml`` holds)."""
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------------------------
# Strict merging


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if isinstance(tp, types.UnionType) or get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


_SCIENTIFIC = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def _wrong_type(key: str, value: Any, expected: str, hint: str = "") -> ConfigError:
    """The error for ``value`` of the wrong type at ``key``, with ``hint`` (how to write what was meant) appended and
    kept as the error's ``hint`` (an optional key's union passes it on)."""
    exc = ConfigError(f"{key}: {value!r} has the wrong type; expected {expected}" + (f": {hint}" if hint else ""))
    exc.hint = hint  # type: ignore[attr-defined]
    return exc


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; int is accepted where float is expected, and so is a number in
    exponent notation that YAML left a string (``4e-4``)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        hints = []
        for arg in get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError as exc:
                hints += [getattr(exc, "hint", "")] if getattr(exc, "hint", "") else []
        raise _wrong_type(key, value, _type_name(tp), hints[0] if hints else "")
    if origin is list:
        (item,) = get_args(tp) or (Any,)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]  # a scalar where a list is expected (--set log.backends=wandb): a one-element list
        if isinstance(value, list):
            return value if item is Any else [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
        raise ConfigError(f"{key}: {value!r} has the wrong type; expected a list")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        number = float(value) if isinstance(value, str) and _SCIENTIFIC.match(value.strip()) else value
        if isinstance(number, float) and number.is_integer() and abs(number) < 2**63:  # 2.0, 1e3: say the int
            raise _wrong_type(key, value, "int", f"write {int(number)}")
    elif tp is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            value = float(value)  # YAML 1.1 (PyYAML) reads 4e-4 and 1e3, without a dot, as strings
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)
            except OverflowError:  # an int beyond the float range
                number = math.inf
            if not math.isfinite(number):  # YAML reads .inf and .nan; no setting here means anything with them
                raise ConfigError(f"{key}: {value!r} is not a finite number")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, bool, datetime.date)):  # YAML read a name (2024, 2024-01-01, yes) as such
            article = "an" if type(value).__name__[0] in "aeiou" else "a"
            raise _wrong_type(
                key,
                value,
                "str",
                f"YAML read the value as {article} {type(value).__name__}; quote it for a string "
                f"(--set \"{key}='...'\" or {key}: '...' in a file)",
            )
    raise ConfigError(f"{key}: {value!r} has the wrong type; expected {_type_name(tp)}")


def merge_into(obj: Any, updates: dict[str, Any], prefix: str = "", *, root: Any = None) -> None:
    """Strictly merge a nested dict into the dataclass ``obj`` in place (unknown keys and wrong types raise
    :class:`ConfigError` naming the key; a key of another section is suggested, ``train.lr`` -> ``optim.lr``). Also
    used by ``directpred theory simulate``. ``root``: the whole configuration when ``obj`` is one of its sections."""
    root = obj if root is None else root
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{prefix}{key}"
        if key not in names:
            elsewhere = [k for k in _leaf_keys(root) if k.rsplit(".", 1)[-1] == str(key)]
            close = [prefix + c for c in difflib.get_close_matches(str(key), names, n=1)]
            hint = " or ".join(f"'{k}'" for k in elsewhere or close)
            raise ConfigError(
                f"unknown config key '{full}'.{f' Did you mean {hint}?' if hint else ''} Allowed keys here: "
                + ", ".join(names)
            )
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                keys = ", ".join(f.name for f in dataclasses.fields(current))
                raise ConfigError(f"{full}: expected a mapping of its keys ({keys})")
            merge_into(current, value, f"{full}.", root=root)
        else:
            setattr(obj, key, _coerce(full, value, hints[key]))


def _leaf_keys(obj: Any, prefix: str = "") -> list[str]:
    """The dotted names of every setting of the dataclass ``obj`` (its sections' keys, not the sections)."""
    keys = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        keys += _leaf_keys(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return keys


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``'a.b=value'``; the value is parsed as YAML (so ``3`` is an int, ``true`` a bool, ``null`` None).

    Examples:
        >>> parse_override("predictor.rho=0.5"), parse_override("train.channels_last=false")
        (('predictor.rho', 0.5), ('train.channels_last', False))
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. predictor.rho=0.5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml_text(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse the value ({yaml_error(exc)})") from None
    _refuse_yaml11_surprises(text, raw.strip(), value)
    return key, value


def _refuse_yaml11_surprises(text: str, raw: str, value: Any) -> None:
    """YAML 1.1 (PyYAML) reads some plain values otherwise than a command line means them, silently: ``010`` is 8
    (octal), ``1:30`` is 90 (base 60), and `` #`` starts a comment (``data.path=imgs #2`` is ``imgs``). Refused,
    with the spelling that says what was meant; a quoted value is taken as written."""
    if raw[:1] in ("'", '"'):
        return
    if " #" in raw or "\t#" in raw:
        raise ConfigError(
            f"override {text!r}: ' #' starts a YAML comment, so the value would be read as {value!r}; quote the "
            f"value to keep the '#' (--set \"{text.split('=', 1)[0]}='{raw}'\"), or drop the comment"
        )
    if isinstance(value, int) and not isinstance(value, bool):
        digits = raw.lstrip("+-").replace("_", "")
        if ":" in raw:
            raise ConfigError(
                f"override {text!r}: YAML reads {raw} as a base-60 number ({value}); write the number itself, or "
                "quote the value for a string"
            )
        if len(digits) > 1 and digits[0] == "0" and digits[1:2].isdigit():
            raise ConfigError(
                f"override {text!r}: a leading 0 makes YAML read {raw} as an octal number ({value}); write "
                f"{'-' if raw.startswith('-') else ''}{int(digits)} (or quote the value for a string)"
            )


def nest(key: str, value: Any) -> dict[str, Any]:
    """A dotted key and its value as nested dicts.

    Examples:
        >>> nest("predictor.rho", 0.5)
        {'predictor': {'rho': 0.5}}
    """
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), base: dict[str, Any] | None = None
) -> Config:
    """Build a validated :class:`Config` from defaults, an optional YAML file and ``key=value`` overrides.

    Args:
        path: YAML file whose keys override the defaults (may be None). Relative ``data.path`` and
            ``data.local_copy`` in it are resolved against the file's folder.
        overrides: strings like ``"predictor.rho=0.5"``, applied after the file; relative data paths in them are
            resolved against the current directory.
        base: a nested dict applied before the file (e.g. a run directory's resolved ``config.yaml``).

    Raises:
        ConfigError: on an unknown key, a wrong type or an impossible value.
        TypeError: ``overrides`` is a single string or a mapping instead of a list of ``"key=value"`` strings.

    Examples:
        >>> load_config(None, ["predictor.rho=0.5"]).predictor.rho
        0.5
        >>> load_config(None, ["predictor.rh=0.5"])
        Traceback (most recent call last):
        ...
        directpred.config.ConfigError: unknown config key 'predictor.rh'. Did you mean 'predictor.rho'? ...
        >>> load_config(None, ["predictor.rho=1.5"])
        Traceback (most recent call last):
        ...
        directpred.config.ConfigError: predictor.rho=1.5 is not allowed: the moving-average rate must lie in [0, 1)
    """
    _check_overrides_type(overrides)
    cfg = Config()
    if base:
        merge_into(cfg, base, "")
    if path is not None:
        path = Path(path)
        data = read_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (method, predictor, ...)")
        if "base" in data and ("variants" in data or "axes" in data or "seeds" in data):
            raise ConfigError(  # "unknown config key 'base'" before
                f"{path} is a sweep file (base, variants/axes, seeds), not a config; run it with "
                f"`directpred sweep {path} --out DIR`"
            )
        merge_into(cfg, data, "")
        # A config file names its data relative to itself, so it works from any current directory.
        _absolute_data_paths(cfg, path.parent, [k for k in DATA_PATH_KEYS if k in (data.get("data") or {})])
    for text in overrides:
        key, value = parse_override(text)
        merge_into(cfg, nest(key, value), "")
        if key.startswith("data."):  # a --set path is relative to the current directory
            _absolute_data_paths(cfg, Path.cwd(), [key.split(".", 1)[1]])
    validate(cfg)
    return cfg


def _check_overrides_type(overrides: object) -> None:
    """Refuse a single string (iterated character by character, "override 'p' must look like key=value") or a
    mapping (iterated by key) given as ``overrides``, naming the form that works."""
    if isinstance(overrides, (str, bytes)):
        raise TypeError(
            f'overrides must be a list of "key=value" strings, not a single string: write [{overrides!r}] for '
            f"overrides={overrides!r}"
        )
    if isinstance(overrides, Mapping):
        pairs = list(flatten(dict(overrides)).items())
        raise TypeError(
            f'overrides must be a list of "key=value" strings, not a {type(overrides).__name__}: write '
            f"{[f'{k}={v}' for k, v in pairs]}"
        )


# data.* keys that name files or folders; stored absolute in a run's config.yaml
DATA_PATH_KEYS = ("path", "local_copy", "root", "cache_dir")
#: Keys that say where the data lies or how it is read, not which images: the same figures with any of them changed
#: (a moved copy, an archive of the folder, another cache or worker count). Resumes, sweeps' --set and
#: `directpred eval` take them as such.
DATA_LOCATION = ("data.workers", "data.cache_dir", "data.root", "data.path", "data.local_copy", "data.download")


def absolute_data_path(value: str, base: Path) -> str:
    """A relative data path made absolute against ``base`` (``~`` and absolute paths and ``""`` are kept: the first
    two are absolute once expanded). The one rule for :data:`DATA_PATH_KEYS` in config files, ``--set`` and sweep
    files."""
    if value and not value.startswith("~") and not Path(value).is_absolute():
        return os.path.normpath(os.path.abspath(base / value))
    return value


def _absolute_data_paths(cfg: Config, base: Path, keys: list[str]) -> None:
    """Make the relative ``data.<key>`` of :data:`DATA_PATH_KEYS` among ``keys`` absolute against ``base``."""
    for key in keys:
        if key in DATA_PATH_KEYS and getattr(cfg.data, key):
            setattr(cfg.data, key, absolute_data_path(getattr(cfg.data, key), base))


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def validate(cfg: Config) -> None:
    """Reject impossible values with a message naming the key and what is allowed."""
    p, m, o, t, d, e, b = cfg.predictor, cfg.method, cfg.optim, cfg.train, cfg.data, cfg.eval, cfg.backbone
    _check(0.0 <= p.rho < 1.0, "predictor.rho", p.rho, "the moving-average rate must lie in [0, 1)")
    _check(p.eps >= 0.0, "predictor.eps", p.eps, "must be >= 0")
    _check(p.freq >= 1, "predictor.freq", p.freq, "must be an integer >= 1 (1 = set W_p every step)")
    _check(
        p.eps_mode != "code" or p.c < 1.0,
        "predictor.c",
        p.c,
        "must be < 1 with predictor.eps_mode=code, where c is subtracted from s_j/s_max <= 1: c >= 1 traps every mode "
        "at the floor (W_p = (0.01 + eps) I, the identity predictor); Table 7 uses -0.1..0.1",
    )
    _check(p.hidden_dim >= 1, "predictor.hidden_dim", p.hidden_dim, "must be >= 1")
    _check(p.partitions >= 0, "predictor.partitions", p.partitions, "must be >= 0 (0 = one global F^)")
    _check(
        p.partitions == 0 or p.name == "directpred",
        "predictor.partitions",
        p.partitions,
        "feature-dependent W_p is implemented for predictor.name=directpred only",
    )
    _check(
        p.partitions == 0 or p.average == "ema",
        "predictor.partitions",
        p.partitions,
        "partitions use the ema average (predictor.average=ema)",
    )
    _check(
        not p.bias or p.name == "linear",
        "predictor.bias",
        p.bias,
        f"is the one-layer linear predictor's bias; predictor.name={p.name} has none"
        + (" (the two-layer predictor's biases are predictor.mlp_bias)" if p.name == "mlp" else ""),
    )
    _check(
        not (p.partitions and p.zero_mean),
        "predictor.zero_mean",
        p.zero_mean,
        "the partition cells' F^ are correlations (as in the authors' partition mode); use zero_mean=false with "
        "predictor.partitions",
    )
    _check(p.ridge >= 0.0, "predictor.ridge", p.ridge, "must be >= 0 (relative to the mean eigenvalue tr(F^)/d)")
    for f in dataclasses.fields(PredictorConfig):  # after the checks above, whose refusals say more (bias, partitions)
        value = getattr(p, f.name)
        if f.name in ("name", "update_at") or f.name in PREDICTOR_OPTIONS[p.name] or value == f.default:
            continue
        # A warning, not a refusal: a sweep-wide --set predictor.rho=0.5 over mixed predictors, or a run directory
        # written before this check, is legitimate; the run just must not look as if the value had been used.
        users = [n for n, keys in PREDICTOR_OPTIONS.items() if f.name in keys]
        default = str(f.default).lower() if isinstance(f.default, bool) else f.default  # as --set writes it
        warnings.warn(
            f"predictor.{f.name}={value!r} has no effect: predictor.name={p.name} does not use it (only "
            f"{', '.join(users)} do{'es' if len(users) == 1 else ''}); config.yaml records it as given (its default "
            f"is predictor.{f.name}={default})",
            UserWarning,
            stacklevel=2,
        )
    _check(0.0 <= m.ema <= 1.0, "method.ema", m.ema, "the target momentum must lie in [0, 1]")
    if m.name == "simsiam":  # as for the predictor's options: a warning, a sweep may set them over both methods
        unused = [
            f"method.{k}={getattr(m, k)}"
            for k in ("ema", "ema_schedule", "target_init")
            if getattr(m, k) != getattr(MethodConfig, k)
        ]
        if unused:
            warnings.warn(
                f"{', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no effect: method.name=simsiam has no "
                "EMA target (its target is the online branch under a stop-gradient); config.yaml records "
                f"{'it' if len(unused) == 1 else 'them'} as given",
                UserWarning,
                stacklevel=2,
            )
    _check(
        m.stop_gradient or m.name == "simsiam",
        "method.stop_gradient",
        m.stop_gradient,
        "the no-stop-gradient ablation (Theorem 2) needs method.name=simsiam: BYOL's EMA target gets no gradient",
    )
    trained = p.name in ("linear", "mlp") or p.freq > 1 and p.partitions == 0 and p.name != "none"
    _check(
        not (m.isoloss and trained),
        "method.isoloss",
        m.isoloss,
        f"IsoLoss passes no gradient to W_p, so it needs a predictor without trainable parameters, set in closed "
        f"form; predictor.name={p.name}, predictor.freq={p.freq} has trainable ones; use predictor.name=directpred, "
        "directcopy or optimal with predictor.freq=1, predictor.name=directpred with predictor.partitions > 0 (any "
        "freq), predictor.name=none, or method.isoloss=false",
    )
    _check(b.width >= 1, "backbone.width", b.width, "base channel count must be >= 1 (64 is standard)")
    _check(cfg.projector.hidden_dim >= 1, "projector.hidden_dim", cfg.projector.hidden_dim, "must be >= 1")
    _check(cfg.projector.out_dim >= 1, "projector.out_dim", cfg.projector.out_dim, "must be >= 1 (the size d of F^)")
    _check(o.lr > 0, "optim.lr", o.lr, "must be > 0")
    _check(0.0 <= o.momentum < 1.0, "optim.momentum", o.momentum, "must lie in [0, 1)")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "must be >= 0")
    _check(o.alpha_p >= 0, "optim.alpha_p", o.alpha_p, "must be >= 0 (0 freezes the predictor)")
    _check(o.warmup_epochs >= 0, "optim.warmup_epochs", o.warmup_epochs, "must be >= 0")
    _check(o.lars_eta > 0, "optim.lars_eta", o.lars_eta, "the LARS trust coefficient must be > 0 (e.g. 0.001)")
    _check(t.epochs >= 1, "train.epochs", t.epochs, "must be >= 1")
    _check(0 <= t.seed < 2**32, "train.seed", t.seed, "must lie in [0, 2**32) (it seeds torch generators)")
    _check(t.batch_size >= 2, "train.batch_size", t.batch_size, "must be >= 2 (BatchNorm needs two samples)")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1 epoch")
    _check(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", t.checkpoint_every_steps, "must be >= 0")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "must be >= 1")
    _check(t.max_steps >= 0, "train.max_steps", t.max_steps, "must be >= 0 (0 = no limit)")
    _check(
        t.skip_nonfinite >= 0,
        "train.skip_nonfinite",
        t.skip_nonfinite,
        "must be >= 0 (0 = stop at the first non-finite loss or gradient; N = skip up to N such steps)",
    )
    _check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
        "train.device",
        t.device,
        "use auto, cpu, cuda or cuda:N",
    )
    _check(d.train_subset >= 0, "data.train_subset", d.train_subset, "must be >= 0 (0 = all)")
    _check(d.test_subset >= 0, "data.test_subset", d.test_subset, "must be >= 0 (0 = all)")
    # An image side beyond 8192 px is a typo (99999999999999999999 overflowed in the decoder, and every image was
    # then reported corrupt); below 8 px no augmentation or stride-2 stage has anything to work on.
    _check(
        d.image_size == 0 or 8 <= d.image_size <= 8192,
        "data.image_size",
        d.image_size,
        "must be 0 (the dataset's size) or a side of 8 to 8192 pixels (32 for CIFAR, 96 for STL-10, 224 for ImageNet)",
    )
    _check(d.workers >= 0, "data.workers", d.workers, "must be >= 0")
    _check(bool(d.root), "data.root", d.root, "must name a folder (torchvision's datasets live there)")
    _check(bool(d.cache_dir), "data.cache_dir", d.cache_dir, "must name a folder (decoded archives go there)")
    _check(
        0 <= d.decode_size <= 8192, "data.decode_size", d.decode_size, "must be 0 (= data.image_size) to 8192 pixels"
    )
    _check(
        not d.stream or d.image_size > 0,
        "data.image_size",
        d.image_size,
        "a streamed data set (data.stream=true) needs data.image_size > 0 (e.g. 224, with data.decode_size=256)",
    )
    _check(
        not d.stream or not d.decode_size or d.decode_size >= d.image_size,
        "data.decode_size",
        d.decode_size,
        f"must be >= data.image_size={d.image_size} (the views and test crops are cut from it)",
    )
    _check(
        not d.stream or d.dataset == "folder",
        "data.stream",
        d.stream,
        "streaming reads data.dataset=folder (an ImageFolder tree or tar shards at data.path)",
    )
    _check(
        not d.stream or not (d.train_subset or d.test_subset),
        "data.train_subset",
        d.train_subset,
        "subsets are not supported with data.stream=true; make a smaller folder or shards instead",
    )
    _check(
        e.linear_protocol != "byol" or d.stream,
        "eval.linear_protocol",
        e.linear_protocol,
        "the byol protocol streams augmented images: it needs data.stream=true",
    )
    # The eval.linear_* defaults are the authors' Adam probe's; BYOL's SGD probe under them (lr 3e-4) barely moves.
    _check(
        e.linear_protocol != "byol" or e.linear_lr != EvalConfig.linear_lr,
        "eval.linear_lr",
        e.linear_lr,
        "it is the default of the authors' Adam probe, not a learning rate for eval.linear_protocol=byol (SGD with "
        "Nesterov momentum); set BYOL's values, as configs/imagenet/*.yaml do: --set eval.linear_lr=0.2 --set "
        "eval.linear_weight_decay=0 --set eval.linear_batch_size=128 --set eval.linear_epochs=80 (the batch is per "
        "process: 1024 on 8 GPUs)",
    )
    if e.linear_protocol == "byol":  # the rate is refused above; the others are legitimate values, so a warning
        kept = [
            f"eval.{key}={getattr(e, key)} (BYOL: {byol})"
            for key, byol in (("linear_weight_decay", 0), ("linear_epochs", 80))
            if getattr(e, key) == getattr(EvalConfig, key)
        ]
        if kept:
            warnings.warn(
                f"eval.linear_protocol=byol runs with {' and '.join(kept)}: the default{'s' if len(kept) > 1 else ''}"
                " of the authors' Adam probe, not BYOL's values; set them (configs/imagenet/*.yaml do) unless you "
                "mean these",
                UserWarning,
                stacklevel=2,
            )
    _check(0.0 <= e.linear_momentum < 1.0, "eval.linear_momentum", e.linear_momentum, "must lie in [0, 1)")
    _check(
        d.dataset != "folder" or bool(d.path),
        "data.path",
        d.path,
        "data.dataset=folder needs data.path: an ImageFolder directory or a .tar/.tar.gz with train/ and test/, "
        "or a directory of tar shards (directpred shards)",
    )
    if d.path:
        _check(
            path_exists(d.path),
            "data.path",
            d.path,
            "the path does not exist; point it at an ImageFolder directory, a .tar/.tar.gz archive or a directory "
            "of tar shards"
            + (
                ""
                if d.dataset == "folder"
                else f", or leave it unset to use torchvision's {d.dataset} (data.root, data.download)"
            ),
        )
    _check(e.knn_every >= 0, "eval.knn_every", e.knn_every, "must be >= 0 (0 = only at the end)")
    _check(e.knn_k >= 1, "eval.knn_k", e.knn_k, "must be >= 1")
    _check(e.knn_t > 0, "eval.knn_t", e.knn_t, "the temperature must be > 0")
    _check(e.linear_epochs >= 1, "eval.linear_epochs", e.linear_epochs, "must be >= 1")
    _check(e.linear_lr > 0, "eval.linear_lr", e.linear_lr, "must be > 0")
    _check(e.linear_weight_decay >= 0, "eval.linear_weight_decay", e.linear_weight_decay, "must be >= 0")
    _check(e.online_probe_lr > 0, "eval.online_probe_lr", e.online_probe_lr, "must be > 0")
    _check(e.linear_batch_size >= 1, "eval.linear_batch_size", e.linear_batch_size, "must be >= 1")
    _check(e.batch_size >= 1, "eval.batch_size", e.batch_size, "must be >= 1")
    _check(
        len(set(cfg.log.backends)) == len(cfg.log.backends), "log.backends", cfg.log.backends, "name each tracker once"
    )
    _check(bool(cfg.log.project), "log.project", cfg.log.project, "must not be empty")
    _check(cfg.diag.every >= 0, "diag.every", cfg.diag.every, "must be >= 0 (0 disables diagnostics)")
    _check(0.0 <= cfg.diag.rho < 1.0, "diag.rho", cfg.diag.rho, "must lie in [0, 1)")


def length_schedules(cfg: Config) -> list[str]:
    """The schedules of ``cfg`` that follow the run's length (``train.epochs``), by key: ``optim.schedule``
    (warmup_cosine) and, for BYOL, ``method.ema_schedule`` (cosine). Another ``train.epochs`` changes them at every
    step, even where ``train.max_steps`` stops two runs at the same step."""
    return [
        key
        for key, on in (
            ("optim.schedule", cfg.optim.schedule == "warmup_cosine"),
            ("method.ema_schedule", cfg.method.name == "byol" and cfg.method.ema_schedule == "cosine"),
        )
        if on
    ]


def check_schedule(cfg: Config, *, steps_per_epoch: int | None = None) -> None:
    """Refuse a learning-rate warm-up that does not end before training does: the learning rate would never reach
    ``optim.lr`` (with ``warmup_cosine`` the cosine part would never start). ``train.max_steps`` does not make it
    legitimate: the schedules run over ``train.epochs`` whatever the step limit.

    With ``steps_per_epoch`` (known once the data is), also in steps, as the trainer counts them: a warm-up of
    ``round(optim.warmup_epochs x steps_per_epoch)`` steps must end before the ``train.epochs x steps_per_epoch``
    steps do (``warmup_epochs=0.95`` of a 1-epoch run at 10 steps per epoch is 10 warm-up steps out of 10).

    A check of training alone, made where a run starts (:class:`directpred.train.loop.Trainer`, every cell of a
    sweep; on resume after ``--set``, so raising ``train.epochs`` there fixes it), not in :func:`validate`: a finished
    run's ``config.yaml`` written before it still evaluates, exports and embeds.

    Examples:
        >>> check_schedule(load_config(None, ["optim.warmup_epochs=10", "train.epochs=5"]))
        Traceback (most recent call last):
        ...
        directpred.config.ConfigError: optim.warmup_epochs=10.0 is not allowed: ...
    """
    o, t = cfg.optim, cfg.train
    example = f"e.g. --set optim.warmup_epochs={t.epochs / 10:g}"
    if o.warmup_epochs >= t.epochs:
        peak = (
            f"reaches optim.lr={o.lr:g} only in the last step"
            if o.warmup_epochs == t.epochs
            else f"never reaches optim.lr={o.lr:g} (at most {t.epochs / o.warmup_epochs:.3g} x it, in the last step)"
        )
        _check(
            False,
            "optim.warmup_epochs",
            o.warmup_epochs,
            f"the linear warm-up must end before train.epochs={t.epochs} ends, else the learning rate {peak}; set "
            f"optim.warmup_epochs below {t.epochs} ({example}) or raise train.epochs",
        )
    if steps_per_epoch is None:
        return
    # The trainer's own step counts (train/loop.py): rounding can stretch a warm-up just short of the run to all of
    # it, never beyond (that would need warmup_epochs > train.epochs, refused above).
    warmup_steps, total_steps = round(o.warmup_epochs * steps_per_epoch), t.epochs * steps_per_epoch
    _check(
        warmup_steps == 0 or warmup_steps < total_steps,
        "optim.warmup_epochs",
        o.warmup_epochs,
        f"the linear warm-up of {warmup_steps} steps (round({o.warmup_epochs:g} x {steps_per_epoch} steps per "
        f"epoch)) must end before the run's {total_steps} steps (train.epochs={t.epochs}) end, else the learning "
        f"rate reaches optim.lr={o.lr:g} only in the last step; set optim.warmup_epochs to at most "
        f"{(total_steps - 1) / steps_per_epoch:g} ({total_steps - 1} steps; {example}) or raise train.epochs",
    )


def path_exists(path: str) -> bool:
    """Whether ``path`` (``~`` expanded) exists; False for names the OS cannot even look up."""
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError, RuntimeError):  # a NUL byte, a name too long, an unknown ~user
        return False


def yaml_error(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line, where and what (PyYAML's own message quotes the text over several lines).

    Examples:
        >>> try:
        ...     yaml.safe_load("train: {epochs: 1\\n  x: [")
        ... except yaml.YAMLError as exc:
        ...     yaml_error(exc)
        "line 2, column 4: expected ',' or '}', but got ':'"
    """
    mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)
    if problem is None:
        return " ".join(str(exc).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping names one key twice, which PyYAML would resolve silently by keeping the last value."""

    def __init__(self, key: Any, line: int, first_line: int, blocks: bool) -> None:
        self.key, self.line, self.first_line = key, line, first_line
        fix = "merge the two blocks" if blocks else "keep one of them"
        super().__init__(f"line {line}: key {key!r} appears twice (first at line {first_line}); {fix}")


class UniqueKeyLoader(yaml.SafeLoader):
    """:class:`yaml.SafeLoader` that raises :class:`DuplicateKeyError` where a mapping repeats a key (two
    ``predictor:`` blocks: PyYAML keeps only the last, silently). A key given by a merge (``<<: *anchor``) may be
    overridden, as YAML intends.

    Examples:
        >>> yaml.load("predictor: {rho: 0.5}\\ntrain: {epochs: 1}\\npredictor: {freq: 5}", UniqueKeyLoader)
        Traceback (most recent call last):
        ...
        directpred.config.DuplicateKeyError: line 3: key 'predictor' appears twice (first at line 1); merge ...
    """

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        # Called on every mapping before its merge keys are expanded (once by construct_mapping, or earlier by the
        # flattening of a mapping that merges it); checked once, while it holds only the keys written in it.
        checked = self.__dict__.setdefault("_checked", set())
        if id(node) not in checked:
            checked.add(id(node))
            seen: dict[Any, tuple[yaml.Node, yaml.Node]] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node)
                if key in seen:
                    first_key, first_value = seen[key]
                    blocks = isinstance(value_node, yaml.MappingNode) and isinstance(first_value, yaml.MappingNode)
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1, first_key.start_mark.line + 1, blocks)
                seen[key] = (key_node, value_node)
        super().flatten_mapping(node)


def load_yaml_text(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing a mapping that repeats a key (:class:`DuplicateKeyError`)."""
    return yaml.load(text, UniqueKeyLoader)  # a SafeLoader subclass: plain data only


def read_yaml(path: Path, what: str = "config file") -> Any:
    """The parsed content of a YAML file; :class:`ConfigError` naming it when it is missing, a folder (a run
    directory: the ``--resume`` hint), not text (e.g. a checkpoint) or not YAML."""
    if path.is_dir():
        run = (path / "config.yaml").is_file()
        hint = f"; to continue the run in it: directpred train --resume {path}" if run else ""
        raise ConfigError(f"{what} {str(path)!r} is a directory, not a YAML file{hint}")
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        return load_yaml_text(path.read_text())
    except DuplicateKeyError as exc:
        raise ConfigError(f"{path} {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({yaml_error(exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not a YAML text file ({exc})") from None


def strict_json(obj: Any, **kw: Any) -> str:
    """``json.dumps(obj, **kw)`` with NaN and infinities written as ``null``, so that the text is strict JSON (RFC
    8259), which ``jq``, JavaScript and most non-Python readers require; Python's default writes bare ``NaN``."""

    def finite(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v

    return json.dumps(finite(obj), allow_nan=False, **kw)


def read_json_object(path: Path, consequence: str) -> dict[str, Any] | None:
    """The JSON object in ``path`` (a run's ``summary.json``, a sweep's ``failed.json``); None, with a warning naming
    the file and ``consequence``, when it cannot be read or holds no object (e.g. edited by hand)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        warnings.warn(f"{path}: unreadable ({exc}); {consequence}", stacklevel=3)
        return None
    if not isinstance(data, dict):
        warnings.warn(f"{path}: unreadable (a {type(data).__name__}, not an object); {consequence}", stacklevel=3)
        return None
    return data


def run_holding(file: str | Path) -> Path | None:
    """The run directory (one with a ``config.yaml``) that holds ``file`` in it or in a folder of it (a checkpoint
    under ``RUN/checkpoints/``); None when neither its folder nor that folder's parent is one."""
    for folder in list(Path(file).parents)[:2]:
        if (folder / "config.yaml").is_file():
            return folder
    return None


def read_run_config(run_dir: str | Path) -> Config:
    """The validated configuration of a run directory: its ``config.yaml``, written by ``directpred train``.

    Raises:
        ConfigError: the file is missing, empty, not YAML, not a mapping, or holds a key or value this version
            refuses; the message names the file and the fix.
    """
    cfg_file = Path(run_dir) / "config.yaml"
    if Path(run_dir).is_file():  # e.g. RUN/checkpoints/last.pt: "no such directory" said it did not exist
        run = run_holding(run_dir)
        raise ConfigError(
            f"{run_dir} is a file, not a run directory; give the run directory made by `directpred train`"
            + (f" that holds it ({run})" if run is not None else "")
        )
    if not Path(run_dir).is_dir():
        raise ConfigError(f"{run_dir}: no such directory; give a run directory made by `directpred train`")
    if not cfg_file.is_file():
        ckpt_dir = Path(run_dir) / "checkpoints"
        if ckpt_dir.is_dir() and not any(ckpt_dir.iterdir()):  # made by a run that stopped while it was set up
            raise ConfigError(
                f"{run_dir}: no config.yaml there: the run started in it stopped before it was set up (config.yaml "
                "is written once the data is loaded and the model built), so there is nothing to resume or read; "
                f"start it again with `directpred train CONFIG --out {run_dir}`"
            )
        raise ConfigError(f"{run_dir}: no config.yaml there; give a run directory made by `directpred train`")
    damaged = "restore it (the checkpoint holds a copy under 'config') or start a new run"
    try:
        data = read_yaml(cfg_file, "run config")
    except ConfigError as exc:  # not YAML, or not text
        raise ConfigError(f"{exc}; {damaged}") from None
    if not isinstance(data, dict) or not data:
        found = "it is empty" if data is None or data == {} else f"it holds a {type(data).__name__}"
        raise ConfigError(f"{cfg_file}: {found}, not the run's config (a mapping of sections); {damaged}")
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(
            f"{cfg_file}: {exc} (in the run's saved config, perhaps written by another version of directpred: "
            "edit the file, or start a new run)"
        ) from None


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a :class:`Config` from :meth:`Config.to_dict` output (e.g. a run's ``config.yaml``)."""
    cfg = Config()
    merge_into(cfg, data, "")
    validate(cfg)
    return cfg


def dump_config(cfg: Config) -> str:
    """YAML text of the resolved configuration."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as dotted keys: ``{'a': {'b': 1}}`` -> ``{'a.b': 1}``.

    Examples:
        >>> flatten({"train": {"epochs": 2, "seed": 0}, "x": 1})
        {'train.epochs': 2, 'train.seed': 0, 'x': 1}
    """
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_configs(old: Config, new: Config, *, beyond: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ, as ``{'a.b': (old, new)}``; with ``beyond``, only those it does not name (a key
    itself, or a section as ``'eval.'``)."""
    a, b = flatten(old.to_dict()), flatten(new.to_dict())
    return {
        k: (a[k], b[k])
        for k in a
        if a[k] != b[k] and not any(k == p or (p.endswith(".") and k.startswith(p)) for p in beyond)
    }
