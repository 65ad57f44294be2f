"""Taking the result out of a run: the online backbone as a plain state dict, TorchScript or ONNX, and features.

An exported file (``directpred export RUN_DIR --out backbone.pt``) is a dict that ``torch.load(weights_only=True)``
reads::

    {"format": "directpred-backbone", "version": 1,
     "state_dict": {...},          # the online backbone, keys of a torchvision ResNet (conv1, bn1, layer1..4; no fc)
     "arch": "resnet18", "width": 16, "cifar_stem": True, "out_dim": 128,
     "image_size": 32, "mean": [...] or None, "std": [...] or None,   # the test-time transform of the run
     "step": 390, "config": {...},                                      # provenance
     "decode_size": 0}   # streamed runs: test images resized to it, centre-cropped to image_size (0: image_size)

``state_dict`` loads strictly into ``directpred.backbones.resnet(arch, width=..., cifar_stem=...)`` (a torchvision
``ResNet`` whose ``fc`` is the identity); with ``width=64, cifar_stem=False`` that is exactly
``torchvision.models.resnet18()`` with ``fc = nn.Identity()``.
"""

from __future__ import annotations

import errno
import importlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from directpred.backbones import resnet
from directpred.config import EXTRAS, Config, ConfigError, install_hint
from directpred.data.augment import ViewRecipe, eval_transform
from directpred.data.datasets import IMAGE_EXTENSIONS, DataError, ImageArrays, decode_images, list_members
from directpred.data.stream import crop_offset
from directpred.data.views import eval_recipe
from directpred.train.checkpoint import CheckpointError, load_checkpoint, stored_config

FORMAT, VERSION = "directpred-backbone", 1
_PREFIX = "online.encoder.backbone."


@dataclass
class BackboneExport:
    """What an exported file holds (see the module docstring)."""

    state_dict: dict[str, torch.Tensor]
    arch: str
    width: int
    cifar_stem: bool
    out_dim: int
    image_size: int
    mean: list[float] | None
    std: list[float] | None
    step: int
    config: dict[str, Any]
    decode_size: int = 0  # 0: image_size (in-memory runs, and files exported before it was recorded)

    @property
    def recipe(self) -> ViewRecipe:
        """The test-time transform of the run (what :func:`directpred.data.augment.eval_transform` applies)."""
        return ViewRecipe(size=self.image_size, mean=_rgb(self.mean), std=_rgb(self.std))

    @property
    def held_out(self) -> tuple[str, ...]:
        """The split folders the run's kNN and linear probe took their test images from, in the order its loader
        looks for them (the first with class folders wins): a streamed run's ``val/``, else ``test/``
        (:data:`directpred.data.stream.SPLIT_NAMES`); an in-memory run's ``test/`` (its loader reads no ``val/``),
        ``val/`` only as the fallback for data laid out otherwise. :func:`read_image_folder`'s default split."""
        stream = bool(self.config.get("data", {}).get("stream")) if isinstance(self.config, dict) else False
        return ("val", "test") if stream else ("test", "val")

    @property
    def decode_side(self) -> int:
        """The side the run's test images were decoded to (shorter side resized) before their centre
        ``image_size`` crop: ``data.decode_size`` of a streamed run (ImageNet's 256 for 224), else ``image_size``."""
        return self.decode_size or self.image_size

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def build(self) -> nn.Module:
        """The backbone with these weights, in eval mode, on the CPU.

        Raises:
            CheckpointError: the weights do not fit the architecture the file names.
        """
        net = resnet(self.arch, width=self.width, cifar_stem=self.cifar_stem)
        _load_weights(net, self.state_dict, f"{self.arch} (width={self.width}, cifar_stem={self.cifar_stem})")
        return net.eval()


def _load_weights(net: nn.Module, weights: dict[str, torch.Tensor], what: str, hint: str = "") -> None:
    """``net.load_state_dict(weights)`` (strict), with an error that says which architecture did not fit and
    summarises the keys (torch's own message lists every one of them, a page for another architecture)."""
    try:
        res = net.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # tensors of other shapes (another width)
        raise CheckpointError(
            f"the backbone weights do not fit a {what}{hint}: {' '.join(str(e).split())[:300]}..."
        ) from e
    wrong = [
        (kind, keys) for kind, keys in (("missing", res.missing_keys), ("unexpected", res.unexpected_keys)) if keys
    ]
    if wrong:
        detail = "; ".join(
            f"{len(k)} {kind} keys ({', '.join(k[:3])}{', ...' if len(k) > 3 else ''})" for kind, k in wrong
        )
        raise CheckpointError(f"the backbone weights do not fit a {what}{hint}: {detail}")


def _rgb(v: list[float] | None) -> tuple[float, float, float] | None:
    """A per-channel (R, G, B) triple from its JSON list; None (no normalisation) for None or []."""
    if not v:
        return None
    r, g, b = v
    return r, g, b


def _from_checkpoint(
    state: dict[str, Any], cfg: Config, source_hint: str = "", *, size_override: bool = False
) -> BackboneExport:
    """The export of a training checkpoint ``state`` rebuilt with ``cfg``. The image size is the one the checkpoint
    records, unless ``size_override`` (``data.image_size=N``, N > 0, given as an override): then ``cfg``'s, as
    ``directpred eval --set data.image_size=N`` evaluates at N."""
    weights = {
        k[len(_PREFIX) :]: v.detach().cpu().contiguous() for k, v in state["model"].items() if k.startswith(_PREFIX)
    }
    if not weights:
        raise CheckpointError("the checkpoint holds no online backbone (no 'online.encoder.backbone.*' weights)")
    size = (
        (cfg.data.image_size if size_override else 0)
        or state.get("image_size")
        or cfg.data.image_size
        or {"cifar10": 32, "cifar100": 32, "stl10": 96}.get(cfg.data.dataset, 0)
    )
    if not size:
        raise ConfigError(
            "this checkpoint predates the recorded image size and data.image_size is 0; give the run's image size "
            "N: read_backbone(..., overrides=['data.image_size=N']) in Python; for export and embed, which have no "
            "--set, set data.image_size in the run's config.yaml and give the run directory"
        )
    r = eval_recipe(cfg, size)
    net = resnet(cfg.backbone.name, width=cfg.backbone.width, cifar_stem=cfg.backbone.cifar_stem)
    # here, not only in build(): export_backbone would otherwise write a file that no network loads
    _load_weights(
        net,
        weights,
        f"{cfg.backbone.name} (width={cfg.backbone.width}, cifar_stem={cfg.backbone.cifar_stem})",
        f", the run's backbone; {source_hint}",
    )
    return BackboneExport(
        weights,
        cfg.backbone.name,
        cfg.backbone.width,
        cfg.backbone.cifar_stem,
        int(net.out_dim),
        int(size),
        list(r.mean) if r.mean else None,
        list(r.std) if r.std else None,
        int(state.get("step", 0)),
        cfg.to_dict(),
        # the streamed path decodes test images at decode_size and crops (eval/stream_eval.py); in memory, at size
        int(cfg.data.decode_size) if cfg.data.stream and cfg.data.decode_size != size else 0,
    )


def read_backbone(
    source: str | Path, *, checkpoint: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> BackboneExport:
    """The online backbone of a run directory (``checkpoints/last.pt`` unless ``checkpoint``), a checkpoint file,
    or a file written by :func:`export_backbone`.

    ``overrides`` (``KEY=VALUE`` strings, as ``--set`` takes them) change the configuration that rebuilds the
    backbone and its evaluation recipe from a run directory or a checkpoint; an exported file records its
    architecture and recipe, so overrides for it are refused rather than ignored. ``data.image_size=N`` (N > 0)
    wins over the image size the checkpoint records, as ``directpred eval --set data.image_size=N`` evaluates at N
    (``data.image_size=0``: the recorded size).

    A ``checkpoint`` of a run directory must have been trained with that run's configuration (beyond what a resume
    may change), the rule of ``directpred eval RUN --checkpoint``: another run's weights would be exported with this
    run's normalisation, image size and augmentation.

    Raises:
        CheckpointError: ``source`` does not exist; the file is missing, corrupt, or not a directpred
            checkpoint/export.
        ConfigError: the run's configuration cannot be read; an override is invalid, or given for an exported
            file; ``checkpoint`` given with a file as ``source``, or trained with another configuration than the
            run directory's.
    """
    from directpred.config import load_config, parse_override, read_run_config

    source = Path(source)
    if not source.exists():  # "no checkpoint at nope" before: as if a run directory had lost its checkpoint
        raise CheckpointError(
            f"{source} does not exist; give a run directory (made by `directpred train`), a checkpoint file (e.g. "
            "RUN_DIR/checkpoints/last.pt) or an exported backbone (made by `directpred export`)"
        )
    size_override = any(parse_override(o)[0] == "data.image_size" for o in overrides)
    if source.is_dir():
        saved = read_run_config(source)
        cfg = load_config(None, overrides, base=saved.to_dict())
        ckpt = Path(checkpoint) if checkpoint else source / "checkpoints" / "last.pt"
        state = load_checkpoint(ckpt, require=("model",))
        if checkpoint:
            _check_checkpoint_of_run(ckpt, state, saved, source)
        return _from_checkpoint(state, cfg, f"is {ckpt} a checkpoint of the run {source}?", size_override=size_override)
    if checkpoint is not None:
        raise ConfigError(
            f"checkpoint {checkpoint} (--checkpoint) picks a checkpoint of a run directory, but {source} is a file; "
            f"give {checkpoint} itself as the source"
        )
    state = load_checkpoint(source)
    if state.get("format") == FORMAT:
        if overrides:
            raise ConfigError(
                f"overrides {list(overrides)} cannot apply to {source}, an exported backbone: it records its "
                "architecture and evaluation recipe, not a configuration to rebuild them from. Drop the overrides, "
                "or give the run directory or checkpoint it was exported from"
            )
        if state.get("version") != VERSION:
            raise CheckpointError(
                f"{source} is an exported backbone of format version {state.get('version')!r}; this directpred "
                f"reads version {VERSION} (export it again with this version, or use the directpred that wrote it)"
            )
        optional = ("decode_size",)  # recorded since version 1 files were first written
        missing = [k for k in BackboneExport.__dataclass_fields__ if k not in state and k not in optional]
        if missing:
            raise CheckpointError(f"{source} is an exported backbone without {missing}; export the run again")
        fields = {k: state[k] for k in BackboneExport.__dataclass_fields__ if k in state}
        return BackboneExport(**fields)
    if "model" in state and "config" in state:
        cfg = load_config(None, overrides, base=stored_config(state, source).to_dict())
        return _from_checkpoint(
            state,
            cfg,
            f"the configuration stored in {source} does not describe its weights",
            size_override=size_override,
        )
    raise CheckpointError(f"{source} is neither a directpred checkpoint nor an exported backbone")


def checkpoint_config_differences(state: dict[str, Any], saved: Config) -> str | None:
    """How the configuration a checkpoint ``state`` records differs from ``saved`` (a run's ``config.yaml``) beyond
    what a resume may change (``key: A in the run, B in the checkpoint``, the first five), or None: the same, or
    nothing to compare (an exported backbone, a checkpoint without a configuration or from another version). The
    rule ``directpred eval RUN --checkpoint`` and ``export``/``embed RUN --checkpoint`` apply: another run's weights
    would be evaluated or exported with this run's recipe (normalisation, image size, augmentation)."""
    from directpred.config import load_config
    from directpred.train.rundir import fixed_changes

    if not isinstance(state.get("config"), dict):
        return None
    try:
        trained = load_config(None, [], base=state["config"])
    except ConfigError:  # written by another version of directpred: nothing to compare
        return None
    changes = fixed_changes(saved, trained)
    if not changes:
        return None
    shown = "; ".join(f"{k}: {a!r} in the run, {b!r} in the checkpoint" for k, (a, b) in list(changes.items())[:5])
    return shown + ("; ..." if len(changes) > 5 else "")


def _check_checkpoint_of_run(ckpt: Path, state: dict[str, Any], saved: Config, run_dir: Path) -> None:
    """Refuse a ``checkpoint`` trained with another configuration than ``run_dir``'s ``config.yaml`` (``saved``):
    :func:`checkpoint_config_differences`; the export's config would claim another run's weights."""
    shown = checkpoint_config_differences(state, saved)
    if shown:
        raise ConfigError(
            f"checkpoint {ckpt} (--checkpoint) was trained with another configuration than "
            f"{run_dir / 'config.yaml'} ({shown}); give {ckpt} itself as the source (it is rebuilt with the "
            "configuration stored in it), or its own run directory with --checkpoint"
        )


def load_backbone(source: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """A ready feature extractor from a run directory, a checkpoint or an exported file: the online backbone in
    eval mode, images (B, 3, S, S) normalised as ``backbone.recipe`` says -> features (B, D).

    The returned module carries ``recipe`` (a :class:`~directpred.data.augment.ViewRecipe`: size, mean, std) and
    ``decode_size``, so ``backbone(eval_transform(uint8_images, backbone.recipe))`` gives the run's evaluation
    features of images decoded as the run decoded its test images: shorter side resized to ``decode_size``, the
    centre ``recipe.size`` square kept (:func:`read_image_folder` with ``decode_size`` does that).

    Examples:
        >>> net = directpred.load_backbone("runs/qs")  # doctest: +SKIP
        >>> feats = net(eval_transform(images, net.recipe))  # doctest: +SKIP
    """
    exp = read_backbone(source)
    net = exp.build().to(device)
    net.recipe = exp.recipe  # type: ignore[assignment]  # Module.__setattr__ takes any value; torch's hint: tensors
    net.decode_size = exp.decode_side  # type: ignore[assignment]
    return net


def export_backbone(
    source: str | Path,
    out: str | Path,
    *,
    checkpoint: str | Path | None = None,
    torchscript: str | Path | None = None,
    onnx: str | Path | None = None,
) -> BackboneExport:
    """Write the online backbone of ``source`` (see :func:`read_backbone`) to ``out``, and optionally as a traced
    TorchScript module and an ONNX graph (both take normalised images (B, 3, S, S) and return (B, D)).

    Every file is written atomically (a temporary file renamed over the target): an interrupted export leaves the
    previous file, if any. The ONNX file is self-contained: the weights are inside it, no ``.onnx.data`` sidecar
    (a graph copied alone would not load without it).

    Raises:
        ModuleNotFoundError: ``onnx`` was asked for but the ``onnx`` or ``onnxscript`` package (the ``onnx`` extra)
            is not installed; raised before anything is written, its message says how to install them.
        CheckpointError: a target would overwrite a file of a run directory (its ``config.yaml``, ``summary.json``,
            ``metrics.jsonl``, ``command.txt``, ``eval.json``, a file in ``checkpoints/``...) or a training
            checkpoint, or names a directory (ends in a path separator); refused before anything is read or written.
    """
    from directpred.train.checkpoint import atomic_write_bytes

    if onnx:
        _check_onnx_exporter()
    targets = [
        (option, path) for option, path in (("--out", out), ("--torchscript", torchscript), ("--onnx", onnx)) if path
    ]
    for option, path in targets:
        _check_export_target(path, option)
    for i, (option, path) in enumerate(targets):  # one file for two formats kept only the last one written
        for other, other_path in targets[i + 1 :]:
            if os.path.realpath(path) == os.path.realpath(other_path):
                raise CheckpointError(
                    f"{option} and {other} name the same file, {path}: the second format would replace the first; "
                    "give each its own file (e.g. backbone.pt, backbone.ts, backbone.onnx)"
                )
    exp = read_backbone(source, checkpoint=checkpoint)
    atomic_write_bytes(out, lambda f: torch.save(exp.to_dict(), f), retry="run the command again")
    example = torch.zeros(2, 3, exp.image_size, exp.image_size)
    if torchscript:
        net = exp.build()
        with warnings.catch_warnings():  # torch.jit is deprecated upstream but still the portable C++/mobile format
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(net, example)
            atomic_write_bytes(torchscript, lambda f: torch.jit.save(traced, f), retry="run the command again")
    if onnx:
        graph = _onnx_bytes(exp.build(), example)
        atomic_write_bytes(onnx, lambda f: f.write(graph), retry="run the command again")
    return exp


def _onnx_bytes(net: nn.Module, example: torch.Tensor) -> bytes:
    """The ONNX graph of ``net`` (input ``images`` (batch, 3, S, S), output ``features`` (batch, D)) as one
    self-contained file's bytes, weights inside. ``torch.onnx.export`` to a path writes the weights to a
    ``.onnx.data`` file beside it by default (``external_data=True``) and writes in place; built in memory here
    (``f=None`` returns the program) and serialised whole, the caller writes it atomically. A backbone is far below
    protobuf's 2 GiB limit for one file."""
    program = torch.onnx.export(
        net,
        (example,),
        None,  # in memory: no file (and no .onnx.data sidecar) written by the exporter
        input_names=["images"],
        output_names=["features"],
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,  # the default since torch 2.9; explicit for torch 2.6-2.8, whose default exporter needs a file
        verbose=False,  # no progress lines on stdout
    )
    assert program is not None  # dynamo=True returns the ONNXProgram
    return bytes(program.model_proto.SerializeToString())


def _check_onnx_exporter() -> None:
    """Raise :class:`ModuleNotFoundError` naming the install command when ``torch.onnx.export`` cannot run: it needs
    the ``onnx`` and ``onnxscript`` packages (the ``onnx`` extra)."""
    for package in EXTRAS["onnx"].split():
        try:
            importlib.import_module(package)
        except ImportError as exc:
            missing = "is not installed" if exc.name == package else f"cannot be imported ({exc})"
            raise ModuleNotFoundError(
                f"export_backbone(onnx=...) needs the {package} package, which {missing}: {install_hint('onnx')}",
                name=package,
            ) from exc


def _is_training_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a training checkpoint (a run's state: model, optimiser, step), read lazily (mmap)."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception:  # not a torch file, or one weights_only cannot read: not a training checkpoint of ours
        return False
    return isinstance(state, dict) and {"model", "optimizer", "step"} <= state.keys()


# The files of a run directory that `directpred train` (and eval, the sweep runner) write and read back: an export
# written over one of them would replace the run's configuration, logs or results.
RUN_FILES = (
    "config.yaml",
    "command.txt",
    "metrics.jsonl",
    "summary.json",
    "eval.json",
    "eval_untrained.json",
    "failed.json",
    "sweep.log",
)
RUN_FOLDERS = ("checkpoints", "tensorboard")  # every file in them is the run's


def _run_file(path: Path) -> tuple[Path, str] | None:
    """``(run directory, what)`` when ``path`` is a file a run directory owns (:data:`RUN_FILES` in it, anything in
    its :data:`RUN_FOLDERS`), else None. A run directory is a folder with a ``config.yaml``; folders on the way are
    resolved (a symlink to a run is still the run), the file's own name is not (a rename replaces a link, not what
    it points to)."""
    where = Path(os.path.realpath(path.parent)) / path.name
    if where.name in RUN_FILES and (where.parent / "config.yaml").is_file():
        return where.parent, where.name
    folder = where.parent
    if folder.name in RUN_FOLDERS and (folder.parent / "config.yaml").is_file():
        return folder.parent, f"{folder.name}/"
    return None


def _check_export_target(
    target: str | Path, option: str, *, what: str = "the export", example: str = "backbone.pt"
) -> None:
    """Refuse an export target that would overwrite a run's files: its training state (a file in its
    ``checkpoints/`` folder, or any file holding a training checkpoint: the run could no longer resume) or another
    file the run owns (``config.yaml``, ``summary.json``, ``metrics.jsonl``, ``command.txt``...); and a target that
    ends in a path separator (a directory: the export would be written to a file named like it). ``what`` is written
    there and ``example`` is the file name the fix suggests (``eval --json`` writes a record, not a backbone)."""
    text = os.fspath(target)
    path = Path(text)
    if text.endswith(("/", os.sep)) and not path.is_dir():  # an existing directory: atomic_write_bytes names it
        raise CheckpointError(
            f"{option} {text} ends in a path separator, so it names a directory, not a file; give the path of a file "
            f"to write, e.g. {path / example}"
        )
    owned = _run_file(path)
    if owned is not None and owned[1] == "checkpoints/":
        raise CheckpointError(
            f"{option} {path} is a file in the run {owned[0]}'s checkpoints/: {what} would overwrite the state the run "
            f"resumes from; write {what} elsewhere (e.g. {owned[0] / example})"
        )
    if owned is not None:
        raise CheckpointError(
            f"{option} {path} is the run {owned[0]}'s {owned[1]}, a file the run writes and reads back: {what} would "
            f"replace it; write {what} elsewhere (e.g. {owned[0] / example})"
        )
    if path.is_file() and _is_training_checkpoint(path):
        raise CheckpointError(
            f"{option} {path} is a training checkpoint: {what} would overwrite the state the run resumes from; "
            f"write {what} elsewhere (e.g. RUN_DIR/{example})"
        )


# ----------------------------------------------------------------------------------------------------------------
# Features of any ImageFolder


# Split folders of a data set's layout: train/ + test/ (CIFAR), ImageNet's train/ + val/ (+ a test/ of unlabelled
# images), STL-10's train/ + test/ + unlabeled/ (unlabelled images at any depth, as the training loader reads them).
SPLITS = ("train", "val", "test", "unlabeled")
HELD_OUT = ("val", "test")  # the streamed reader's held-out split (directpred.data.stream.SPLIT_NAMES): val/ first


def read_image_folder(
    path: str | Path,
    *,
    image_size: int,
    decode_size: int = 0,
    split: str | None = None,
    held_out: tuple[str, ...] = HELD_OUT,
    skip_corrupt: bool = False,
    skip_hint: str = "pass skip_corrupt=True",
) -> tuple[ImageArrays, list[str]]:
    """Decode the images of a directory or .tar/.tar.gz to ``image_size`` (shorter side resized, centre crop); with
    ``decode_size`` > ``image_size``, resized to ``decode_size`` first and the centre ``image_size`` square kept, as
    a streamed run's evaluation does (:attr:`BackboneExport.decode_side`). Returns the images and the member names,
    in sorted order. ``skip_hint``: how to skip corrupt images, as the error about them says.

    Layouts: an ImageFolder (``<class>/<image>``: labels by class folder); a flat folder of images (no class folders:
    every label -1, no classes); either inside split folders (``train/``, ``val/``, ``test/``, ``unlabeled/``), of
    which ``split`` picks one. ``unlabeled/`` (STL-10's) holds unlabelled images at any depth: all label -1, as the
    training loader takes them. The default split is the held-out one a run evaluates on: the first folder of
    ``held_out`` that holds class folders (default ``("val", "test")``, the streamed reader's rule; an in-memory run's
    is ``("test", "val")``, :attr:`BackboneExport.held_out`): a ``test/`` of unlabelled images (ImageNet's) is passed
    over, as the training loaders pass it over. The top folders are splits only when all of them are split names (an
    ImageFolder may have a class named ``train``, as CIFAR-100 has). A ``split`` given for a source without split
    folders is refused (:class:`DataError` naming the layout found), rather than ignored.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"--data {str(path)!r} does not exist")
    images = [n for n in list_members(path) if n.lower().endswith(IMAGE_EXTENSIONS)]
    tops = {n.split("/", 1)[0] for n in images if "/" in n}
    prefix = ""
    if (
        len(tops) == 1
        and next(iter(tops)) not in SPLITS
        and not any(n.count("/") <= 1 for n in images)  # images in the one folder: it is a class, not a wrapper
    ):
        prefix = next(iter(tops)) + "/"  # one wrapping folder (archive.tar.gz -> name/...)
        tops = {n[len(prefix) :].split("/", 1)[0] for n in images if n[len(prefix) :].count("/") >= 1}
    # Split folders only when every top folder is one: CIFAR-100 has a class named 'train', beside 'apple' and 'bus'.
    splits = [s for s in SPLITS if s in tops] if tops <= set(SPLITS) else []
    unlabelled = False
    if splits:
        # A split with class folders: an image below a folder inside it (test/<class>/<image>).
        labelled = {
            s for s in splits if any(n.startswith(f"{prefix}{s}/") and n[len(prefix) :].count("/") >= 2 for n in images)
        }
        labelled -= {"unlabeled"}
        chosen = split or next((s for s in held_out if s in labelled), None)
        if chosen is None or chosen not in splits:
            if split:
                asked = f"--split {split}: {path} has no {prefix}{split}/ folder"
            else:
                asked = (
                    f"{path} has no {' or '.join(prefix + s + '/' for s in held_out)} folder (the default split)"
                    if not any(s in splits for s in held_out)
                    else f"{path} has no {' or '.join(prefix + s + '/' for s in held_out)} folder of class folders "
                    "(the default split: the held-out images a run evaluates on"
                    + "".join(
                        f"; {prefix}{s}/ holds images without class folders, which no run evaluates on"
                        for s in held_out
                        if s in splits
                    )
                    + ")"
                )
            present = [s for s in held_out if s in splits]  # (unlabelled) held-out images: what the user may want
            hint = present[0] if present else ([s for s in splits if s != "unlabeled"] or splits)[-1]
            raise DataError(f"{asked}; its split folders: {', '.join(s + '/' for s in splits)}; give --split {hint}")
        prefix += f"{chosen}/"
        unlabelled = chosen == "unlabeled"
    elif split is not None:
        layout = "<class>/<image>" if tops else "images without class folders"
        named = sorted(tops & set(SPLITS))
        if named:  # a class folder named like a split: say why it is not taken for one
            shown = [t + "/" for t in sorted(tops)][:4] + ([f"... ({len(tops)} in all)"] if len(tops) > 4 else [])
            layout += (
                f" whose class folders {', '.join(shown)} are not all split names, so "
                f"{', '.join(t + '/' for t in named)} {'is a class' if len(named) == 1 else 'are classes'}"
            )
        raise DataError(
            f"--split {split}: {path} has no split folders ({', '.join(s + '/' for s in SPLITS)}): it is one set "
            f"of images ({layout}); drop --split to embed all of them"
        )
    inside = [n[len(prefix) :] for n in images if n.startswith(prefix)]
    items = sorted(prefix + n for n in inside if "/" in n)
    loose = sorted(prefix + n for n in inside if "/" not in n)
    if not items and not loose:
        raise DataError(
            f"{path}: no images under '{prefix or './'}'; --data must be a directory or .tar/.tar.gz archive of "
            "images, in <class>/<image> folders (an ImageFolder) or not"
        )
    if unlabelled:  # STL-10's unlabeled/: every image, at any depth, label -1 (directpred.data.datasets)
        classes, labelled_items = [], [(n, -1) for n in sorted(items + loose)]
    elif items:
        if loose:
            warnings.warn(
                f"{path}: {len(loose)} image(s) directly under '{prefix or './'}' are in no <class>/ folder and are "
                f"left out (e.g. {loose[0]}); move them into one to embed them",
                stacklevel=2,
            )
        classes = sorted({n[len(prefix) :].split("/", 1)[0] for n in items})
        labelled_items = [(n, classes.index(n[len(prefix) :].split("/", 1)[0])) for n in items]
    else:  # a flat folder of images: unlabelled
        classes, labelled_items = [], [(n, -1) for n in loose]
    side = max(decode_size, image_size)
    decoded, labels, skipped, kept = decode_images(path, labelled_items, side, skip_corrupt, skip_hint)
    if side != image_size:  # the streamed path's test crop (directpred.data.stream.decode_to_tensor)
        o = crop_offset(side, image_size)
        decoded = np.ascontiguousarray(decoded[:, o : o + image_size, o : o + image_size])
    return ImageArrays(torch.from_numpy(decoded), torch.from_numpy(labels), classes, skipped), kept


@torch.no_grad()
def embed(
    backbone: nn.Module,
    images: torch.Tensor,
    recipe: ViewRecipe,
    *,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Features (N, D) of uint8 images (N, H, W, 3) under the deterministic test-time transform, on the CPU.

    The backbone runs in eval mode; the caller's train/eval mode comes back afterwards (also when a batch fails), as
    :func:`directpred.eval.extract_features` does. No images (N = 0) give (0, D): the backbone runs on one empty
    batch for its feature width.
    """
    was_training = backbone.training
    backbone.eval()
    out = []
    try:
        # At least one (maybe empty) batch: with no images it still gives the feature width D.
        for start in range(0, max(len(images), 1), batch_size):
            x = eval_transform(images[start : start + batch_size].to(device), recipe)
            out.append(backbone(x).float().cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(out)


def features_target_problem(out: str | Path) -> str | None:
    """What is wrong with ``out`` as :func:`save_features`'s target, or None: an existing directory, or a path ending
    in a separator (a directory to be), would have given ``<dir>.npy`` beside it. The message names a file to give."""
    text = os.fspath(out)
    path = Path(text)
    what = (
        "is a directory"
        if path.is_dir()
        else "ends in a path separator, so it names a directory"
        if text.endswith(("/", os.sep))
        else None
    )
    if what is None:
        return None
    return (
        f"{text} {what}, not a file; give another path there: a file to write, e.g. {path / 'features.npy'} (the "
        f"features, with {path / 'features.labels.npy'} beside it) or {path / 'features.npz'}"
    )


def save_features(
    out: str | Path, features: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str]
) -> list[Path]:
    """``.npz``: one file with ``features``, ``labels``, ``classes``, ``paths``; otherwise ``out`` holds the
    features and ``<stem>.labels.npy`` the labels beside it. Returns the files written.

    Each file is written atomically (a temporary file renamed over it): a failed or interrupted write leaves the
    previous file, if any. The features are written and renamed while the labels' temporary file is open, and the
    labels renamed after them: a failure writing the features (the large file) leaves both previous files as they
    were, never new features beside old labels.

    Raises:
        IsADirectoryError: ``out`` is a directory or ends in a path separator (:func:`features_target_problem`);
            nothing is written.
        CheckpointError: a file cannot be written (disk full, permissions); its previous content is kept.
    """
    from directpred.train.checkpoint import atomic_write_bytes

    problem = features_target_problem(out)
    if problem is not None:  # refused: it wrote <dir>.npy beside the directory
        raise IsADirectoryError(errno.EISDIR, problem, os.fspath(out))
    out = Path(out)
    retry = "run the command again"
    if out.suffix == ".npz":

        def write_npz(f: Any) -> None:
            np.savez(f, features=features, labels=labels, classes=np.asarray(classes), paths=np.asarray(names))

        atomic_write_bytes(out, write_npz, retry=retry)
        return [out]
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    labels_file = out.with_name(out.stem + ".labels.npy")

    def write_labels(f: Any) -> None:
        np.save(f, labels)
        atomic_write_bytes(out, lambda g: np.save(g, features), retry=retry)

    atomic_write_bytes(labels_file, write_labels, retry=retry)
    return [out, labels_file]


__all__ = [
    "BackboneExport",
    "checkpoint_config_differences",
    "embed",
    "export_backbone",
    "features_target_problem",
    "load_backbone",
    "read_backbone",
    "read_image_folder",
    "save_features",
]
