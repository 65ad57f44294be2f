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

import importlib
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


def _from_checkpoint(state: dict[str, Any], cfg: Config, source_hint: str = "") -> BackboneExport:
    weights = {
        k[len(_PREFIX) :]: v.detach().cpu().contiguous() for k, v in state["model"].items() if k.startswith(_PREFIX)
    }
    if not weights:
        raise CheckpointError("the checkpoint holds no online backbone (no 'online.encoder.backbone.*' weights)")
    size = (
        state.get("image_size")
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
    architecture and recipe, so overrides for it are refused rather than ignored.

    Raises:
        CheckpointError: the file is missing, corrupt, or not a directpred checkpoint/export.
        ConfigError: the run's configuration cannot be read; an override is invalid, or given for an exported
            file; ``checkpoint`` given with a file as ``source``.
    """
    from directpred.config import load_config, read_run_config

    source = Path(source)
    if source.is_dir():
        cfg = load_config(None, overrides, base=read_run_config(source).to_dict())
        ckpt = Path(checkpoint) if checkpoint else source / "checkpoints" / "last.pt"
        state = load_checkpoint(ckpt, require=("model",))
        return _from_checkpoint(state, cfg, f"is {ckpt} a checkpoint of the run {source}?")
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
        return _from_checkpoint(state, cfg, f"the configuration stored in {source} does not describe its weights")
    raise CheckpointError(f"{source} is neither a directpred checkpoint nor an exported backbone")


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

    Raises:
        ModuleNotFoundError: ``onnx`` was asked for but the ``onnx`` or ``onnxscript`` package (the ``onnx`` extra)
            is not installed; raised before anything is written, its message says how to install them.
    """
    from directpred.train.checkpoint import atomic_write_bytes

    if onnx:
        _check_onnx_exporter()
    for option, path in (("--out", out), ("--torchscript", torchscript), ("--onnx", onnx)):
        if path:
            _check_export_target(Path(path), option)
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
        torch.onnx.export(
            exp.build(),
            (example,),
            str(onnx),
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
        )
    return exp


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


def _check_export_target(path: Path, option: str) -> None:
    """Refuse an export target that would overwrite a run's training state: a file in a run's ``checkpoints/``
    folder, or any file holding a training checkpoint (the run could no longer resume)."""
    in_run = path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file()
    if in_run or (path.is_file() and _is_training_checkpoint(path)):
        what = f"a file in the run {path.parent.parent}'s checkpoints/" if in_run else "a training checkpoint"
        raise CheckpointError(
            f"{option} {path} is {what}: the export would overwrite the state the run resumes from; write the export "
            "elsewhere (e.g. RUN_DIR/backbone.pt)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Features of any ImageFolder


SPLITS = ("train", "val", "test")  # split folders of a data set's layout (train/ + test/, ImageNet's train/ + val/)


def read_image_folder(
    path: str | Path,
    *,
    image_size: int,
    decode_size: int = 0,
    split: str | None = None,
    skip_corrupt: bool = False,
    skip_hint: str = "pass skip_corrupt=True",
) -> tuple[ImageArrays, list[str]]:
    """Decode the images of a directory or .tar/.tar.gz to ``image_size`` (shorter side resized, centre crop); with
    ``decode_size`` > ``image_size``, resized to ``decode_size`` first and the centre ``image_size`` square kept, as
    a streamed run's evaluation does (:attr:`BackboneExport.decode_side`). Returns the images and the member names,
    in sorted order. ``skip_hint``: how to skip corrupt images, as the error about them says.

    Layouts: an ImageFolder (``<class>/<image>``: labels by class folder); a flat folder of images (no class folders:
    every label -1, no classes); either inside split folders (``train/``, ``val/``, ``test/``), of which ``split``
    picks one (default: ``test``, else ``val``). The top folders are splits only when all of them are split names
    (an ImageFolder may have a class named ``train``, as CIFAR-100 has). A ``split`` given for a source without split
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
    if splits:
        chosen = split or ("test" if "test" in splits or "val" not in splits else "val")
        if chosen not in splits:
            asked = (
                f"--split {chosen}: {path} has no {prefix}{chosen}/ folder"
                if split
                else (f"{path} has no {prefix}test/ or {prefix}val/ folder (the default split)")
            )
            raise DataError(
                f"{asked}; its split folders: {', '.join(s + '/' for s in splits)}; give --split {splits[-1]}"
            )
        prefix += f"{chosen}/"
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
            f"--split {split}: {path} has no split folders (train/, val/, test/): it is one set of images "
            f"({layout}); drop --split to embed all of them"
        )
    inside = [n[len(prefix) :] for n in images if n.startswith(prefix)]
    items = sorted(prefix + n for n in inside if "/" in n)
    loose = sorted(prefix + n for n in inside if "/" not in n)
    if not items and not loose:
        raise DataError(
            f"{path}: no images under '{prefix or './'}'; --data must be a directory or .tar/.tar.gz archive of "
            "images, in <class>/<image> folders (an ImageFolder) or not"
        )
    if items:
        if loose:
            warnings.warn(
                f"{path}: {len(loose)} image(s) directly under '{prefix or './'}' are in no <class>/ folder and are "
                f"left out (e.g. {loose[0]}); move them into one to embed them",
                stacklevel=2,
            )
        classes = sorted({n[len(prefix) :].split("/", 1)[0] for n in items})
        labelled = [(n, classes.index(n[len(prefix) :].split("/", 1)[0])) for n in items]
    else:  # a flat folder of images: unlabelled, as STL-10's unlabeled split
        classes, labelled = [], [(n, -1) for n in loose]
    side = max(decode_size, image_size)
    decoded, labels, skipped, kept = decode_images(path, labelled, side, skip_corrupt, skip_hint)
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


def save_features(
    out: str | Path, features: np.ndarray, labels: np.ndarray, classes: list[str], names: list[str]
) -> list[Path]:
    """``.npz``: one file with ``features``, ``labels``, ``classes``, ``paths``; otherwise ``out`` holds the
    features and ``<stem>.labels.npy`` the labels beside it. Returns the files written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        np.savez(out, features=features, labels=labels, classes=np.asarray(classes), paths=np.asarray(names))
        return [out]
    if out.suffix != ".npy":
        out = out.with_name(out.name + ".npy")
    labels_file = out.with_name(out.stem + ".labels.npy")
    np.save(out, features)
    np.save(labels_file, labels)
    return [out, labels_file]


__all__ = [
    "BackboneExport",
    "embed",
    "export_backbone",
    "load_backbone",
    "read_backbone",
    "read_image_folder",
    "save_features",
]
