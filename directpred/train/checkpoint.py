"""Atomic checkpoints: a partial file is never loaded and a valid one is never overwritten by a broken one."""

from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from directpred.config import Config, ConfigError, config_from_dict, flatten, strict_json
from directpred.files import fsync_dir

TMP_SUFFIX = ".tmp"  # temporaries are ".<name>.<random>.tmp" beside the file they replace


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message says which file and why."""


def atomic_write_bytes(path: str | Path, write: Callable[[BinaryIO], object], *, retry: str | None = None) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over ``path``.

    If anything fails (disk full, permissions, an exception in ``write``), ``path`` keeps its previous content
    and the temporary file is removed. ``retry``: what the error tells the user to do once the disk or permissions
    are fixed, e.g. ``"run the command again"``; None for a training run's file (resume the run).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:  # the folder is missing, not a folder, read-only, or the disk is full
        raise CheckpointError(_write_failure(path, exc, retry)) from exc
    try:
        # mkstemp's 0600 would hide config.yaml, summary.json and the checkpoints from collaborators on a shared
        # filesystem: the mode open() gives (as metrics.jsonl has), also to a file an older version wrote 0600.
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise CheckpointError(_write_failure(path, exc, retry)) from exc
        raise


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` sets it to read it, which a
    thread creating a file at that moment would see)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_in_the_way(exc: OSError) -> Path | None:
    """The regular file that made ``exc`` (a FileExistsError or NotADirectoryError) fail: ``exc.filename`` itself or
    the nearest of its parent folders that is a file, where a directory was to be made or looked in; None when there
    is none (e.g. a mkdir without ``exist_ok`` of a directory that exists)."""
    if not exc.filename:
        return None
    path = Path(os.fsdecode(exc.filename))
    return next((p for p in (path, *path.parents) if p.is_file()), None)


def _write_failure(path: Path, exc: OSError, retry: str | None = None) -> str:
    """The message of a failed atomic write of ``path``: a directory there is named as such; with a previous file,
    it is kept and the run can resume from it; without one (e.g. a run's first checkpoint), there is nothing to
    resume and the command is rerun. ``retry``: the caller's own advice instead (a command that is no run)."""
    if isinstance(exc, IsADirectoryError) or path.is_dir():
        return (
            f"cannot write {path}: it is a directory, not a file; give the path of a file to write (or remove "
            "the directory), then run the command again"
        )
    in_the_way = file_in_the_way(exc) if isinstance(exc, (FileExistsError, NotADirectoryError)) else None
    if in_the_way is not None:
        return (
            f"cannot write {path}: {in_the_way} is a file, not a directory; give another path (or move the file "
            "away), then run the command again"
        )
    if retry is not None:
        kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
        return f"cannot write {path}: {exc.strerror or exc}; {kept}. Free disk space or fix permissions, then {retry}."
    if os.path.exists(path):
        return (
            f"cannot write {path}: {exc.strerror or exc}; the previous file is kept. "
            "Free disk space or fix permissions, then resume."
        )
    return (
        f"cannot write {path}: {exc.strerror or exc}; nothing was written (there is no previous file, so nothing "
        "to resume). Free disk space or fix permissions, then run the same command again."
    )


def atomic_write_text(path: str | Path, text: str, *, retry: str | None = None) -> None:
    """Atomically replace a text file (``retry``: as :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()), retry=retry)


def atomic_write_json(path: str | Path, obj: Any, *, retry: str | None = None) -> None:
    """Atomically replace a JSON file; NaN and infinities are written as ``null`` (strict JSON). ``retry``: as
    :func:`atomic_write_bytes`."""
    atomic_write_text(path, strict_json(obj, indent=2, sort_keys=True) + "\n", retry=retry)


def _assert_finite(state: dict[str, Any], where: str = "") -> None:
    for key, value in state.items():
        if isinstance(value, dict):
            _assert_finite(value, f"{where}{key}.")
        elif isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(
                f"refusing to write a checkpoint holding NaN/inf in '{where}{key}'; the last good checkpoint is kept"
            )


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` ``state`` atomically; refuses (CheckpointError) if the model weights hold NaN or inf."""
    _assert_finite(state.get("model", {}), "model.")
    atomic_write_bytes(path, lambda f: torch.save(state, f))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries that a killed writer (SIGKILL, power loss) left in ``folder``; returns them.

    They are never loaded (only the final names are), but each holds a whole checkpoint's worth of disk.
    Call it only while no other process writes into ``folder``.
    """
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError:
            pass
    return removed


def recovery_hint(path: Path) -> str:
    """What to do about ``path``, a checkpoint found empty or damaged: for a run's ``checkpoints/last.pt``, copy the
    latest kept ``epoch_XXXX.pt`` that exists over it and resume, or (none kept) start the run again, each with its
    command; for another checkpoint of a run, the run's other checkpoints."""
    folder = path.parent
    if folder.name != "checkpoints":
        return "replace it with an intact copy"
    run = folder.parent
    kept = sorted(p for p in folder.glob("epoch_*.pt") if p.name != path.name and p.is_file())
    if path.name != "last.pt":
        others = kept + ([folder / "last.pt"] if (folder / "last.pt").is_file() else [])
        if not others:
            return "the run keeps no other checkpoint; replace it with an intact copy"
        return f"use another checkpoint of the run: {', '.join(str(p) for p in others[-5:])}"
    if not kept:
        # a finished run's summary.json goes too: a new run is refused where one is (it would overwrite it)
        summary = f" {run / 'summary.json'}" if (run / "summary.json").is_file() else ""
        return (
            "the run keeps no earlier checkpoint (checkpoints/epoch_*.pt), so it must start again: "
            f"`rm {path}{summary} && directpred train {run / 'config.yaml'} --out {run}`"
        )
    shown = ", ".join(p.name for p in kept[-5:]) + (f" ({len(kept)} in all)" if len(kept) > 5 else "")
    return (
        f"the run keeps earlier checkpoints ({shown}); copy the latest to checkpoints/last.pt and resume: "
        f"`cp {kept[-1]} {path} && directpred train --resume {run}`"
    )


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, require: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (or an exported backbone), with a clear error when it is
    missing or corrupt, or lacks one of the entries ``require`` (e.g. ``("model", "step")``: a training checkpoint,
    not an exported backbone).

    Only tensors and plain data (dicts, lists, numbers, strings) are unpickled (``torch.load(weights_only=True)``):
    a file that would construct any other object, e.g. one crafted to run code while loading, is refused before
    anything in it runs. Everything directpred saves is plain data.

    Raises:
        CheckpointError: the file is missing, no checkpoint file at all (a text file, an image: named as such),
            damaged (cut short, changed bytes), or holds objects other than plain data.
    """
    path = Path(path)
    if path.is_dir():  # "no checkpoint at runs" read as if the file were missing
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint file; give a file such as {path / 'checkpoints' / 'last.pt'}"
        )
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    earlier = recovery_hint(path)
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes), not a checkpoint; {earlier}")
    foreign = foreign_file_kind(path)
    if foreign is not None:  # not torn: no torch.save ever wrote it (the hint to an earlier checkpoint would mislead)
        in_run = path.parent.name == "checkpoints"
        raise CheckpointError(
            f"{path} is not a checkpoint file ({foreign}); expected a .pt written by `directpred train` (a run's "
            "checkpoints/last.pt or epoch_XXXX.pt) or `directpred export`"
            + (f"; if something overwrote a run's checkpoint, {earlier}" if in_run else "")
        )
    changed = _zip_crc_failure(path)  # torch.load never checks the members' CRC-32: changed tensor bytes load
    if changed is not None:
        raise CheckpointError(f"{path} is a damaged checkpoint, cut short or with changed bytes ({changed}); {earlier}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a corrupt or foreign file
        # An unknown opcode means bytes that are no pickle at all (random or overwritten data), not a crafted one.
        if "Weights only load failed" in str(exc) and "Unsupported operand" not in str(exc):
            raise CheckpointError(
                f"refusing to load {path}: it holds objects other than tensors and plain data "
                f"({_unsafe_reason(str(exc))}), which directpred never writes; it may have been "
                "crafted to run code. Nothing in it was executed. Load only checkpoints you "
                "trust"
            ) from None
        reason = _unsafe_reason(str(exc)) if "Unsupported operand" in str(exc) else f"{type(exc).__name__}: {exc}"
        reason = " ".join(reason.split()).split(". ")[0].rstrip(": .")  # one line; torch's first sentence
        raise CheckpointError(
            f"{path} is a damaged checkpoint, cut short or with changed bytes ({reason}); {earlier}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a directpred checkpoint (it holds a {type(state).__name__})")
    missing = [key for key in require if key not in state]
    if missing:
        what = (
            "an exported backbone (`directpred export`)"
            if state.get("format") == "directpred-backbone"  # directpred.export.FORMAT (export imports this module)
            else f"not a training checkpoint (no {', '.join(map(repr, missing))})"
        )
        raise CheckpointError(f"{path} is {what}; give a training run's checkpoints/last.pt or epoch_XXXX.pt")
    return state


def _zip_crc_failure(path: Path) -> str | None:
    """Why the zip archive ``path`` (torch.save's format) fails its own checksums: the member whose bytes no longer
    match the CRC-32 recorded when it was written, or the member header found damaged while reading them all; None
    when every member matches, or when ``path`` is no zip archive, or one too damaged to list (cut short), which
    :func:`torch.load` then refuses with its own reason. Reads the whole file once."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return None  # torch.save's legacy pickle format: no checksums to check
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None
    with archive:
        for info in archive.infolist():
            if info.CRC == 0 and info.file_size > 0:
                # written without checksums (torch.serialization.set_crc32_options(False)): nothing to check
                continue
            try:
                with archive.open(info) as member:  # reading to the end checks the member's CRC-32
                    while member.read(1 << 24):
                        pass
            except zipfile.BadZipFile as exc:
                if "CRC" in str(exc):
                    return f"the bytes of {info.filename} do not match the CRC-32 recorded when it was written"
                return f"BadZipFile: {' '.join(str(exc).split())}"
            except (OSError, ValueError, EOFError, zlib.error) as exc:
                return f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return None


_MAGIC = (
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x1f\x8b", "a gzip file"),
    (b"\x93NUMPY", "a NumPy .npy array"),
)


def foreign_file_kind(path: str | Path) -> str | None:
    """What ``path`` is when it cannot be a ``torch.save`` file at all (a text file, an image, a NumPy file);
    None when it may be one (a zip archive holding a ``data.pkl``, the format since PyTorch 1.6, a legacy pickle, or
    a zip too damaged to list: a torn write), so that a load failure there means a damaged checkpoint.

    Examples:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".yaml") as f:
        ...     _ = f.write(b"train: {epochs: 1}"); f.flush()
        ...     foreign_file_kind(f.name)
        'a text file beginning "train: {epochs: 1}"'
    """
    with open(path, "rb") as f:
        head = f.read(512)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None  # a zip archive cut short: a torn checkpoint
        if any(name.endswith("/constants.pkl") for name in names) and any("/code/" in name for name in names):
            return "a TorchScript module, as `directpred export --torchscript` writes; give the export's --out file"
        if any(name.endswith("data.pkl") for name in names):
            return None
        return "a zip archive without the data.pkl of torch.save" + (
            ", a NumPy .npz" if names and all(n.endswith(".npy") for n in names) else ""
        )
    if head.startswith(b"\x80"):  # pickle protocol >= 2: torch.save's legacy format
        return None
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    try:
        text: str | None = head.decode("utf-8")
    except UnicodeDecodeError as exc:  # text whose last character the 512 bytes cut in two is still text
        text = head[: exc.start].decode("utf-8") if len(head) == 512 and exc.start >= 509 else None
    if text is not None and "\x00" not in text:
        first = next((line.strip() for line in text.splitlines() if line.strip()), "")
        return f'a text file beginning "{first[:40]}{"..." if len(first) > 40 else ""}"'
    return "binary data that is neither a zip archive (torch.save's format) nor a pickle"


def stored_config(state: dict[str, Any], path: str | Path) -> Config:
    """The validated configuration a training checkpoint (``path``, loaded as ``state``) stores under ``config``.

    Raises:
        ConfigError: this version refuses a key or value of it (the checkpoint was written by another version of
            directpred); the message names the file, the key, and the version that wrote it.
    """
    try:
        return config_from_dict(state["config"])
    except ConfigError as exc:
        commit = f" (git commit {str(state['git_commit'])[:12]})" if state.get("git_commit") else ""
        raise ConfigError(
            f"{path}: the configuration stored in this checkpoint does not load here ({exc}); it was written by "
            f"another version of directpred{commit}: run the command with that version"
        ) from None


def load_model_state(model: torch.nn.Module, weights: dict[str, Any], path: str | Path) -> None:
    """``model.load_state_dict(weights)``, where a checkpoint made for a differently shaped model (another
    ``backbone.*``, ``projector.*`` or ``predictor.*``) is a :class:`CheckpointError` naming the first mismatch."""
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        if "Error(s) in loading state_dict" not in str(exc):
            raise
        problems = [" ".join(line.split()) for line in str(exc).splitlines()[1:] if line.strip()]
        first = (problems[0] if problems else "the parameters differ").rstrip(".")
        first = first if len(first) <= 200 else first[:200] + "..."
        raise CheckpointError(
            f"{path} does not fit the configured model ({first}{'; and more' if len(problems) > 1 else ''}): it was "
            "written with another backbone/projector/predictor configuration; use the configuration of the run that "
            "wrote it (no --set or --force of backbone.*, projector.*, predictor.*)"
        ) from None


# The settings that decide the optimiser's parameter groups (directpred.train.optim.param_groups): W_p trainable or
# not (predictor.name, predictor.freq), its bias, and LARS's separate groups for biases and BatchNorm (optim.name).
PARAM_GROUP_KEYS = ("predictor.name", "predictor.freq", "predictor.bias", "optim.name")


def check_param_groups(
    optimizer: torch.optim.Optimizer,
    saved: dict[str, Any],
    path: str | Path,
    *,
    saved_config: dict[str, Any] | None,
    config: dict[str, Any],
) -> None:
    """Refuse the optimiser state ``saved`` (from the checkpoint ``path``, written with ``saved_config``) when its
    parameter groups are not those of ``optimizer`` (built from ``config``): a :class:`CheckpointError` naming the
    changed settings, where torch would raise a bare ValueError (another number of groups or of tensors in a group)."""

    def layout(groups: list[dict[str, Any]]) -> list[tuple[str, int]]:
        return [(str(g.get("name", "?")), len(g["params"])) for g in groups]

    have, want = layout(saved["param_groups"]), layout(optimizer.param_groups)
    if have == want:
        return
    old, new = flatten(saved_config or {}), flatten(config)
    changed = "; ".join(
        f"{k}: {old[k]!r} -> {new.get(k)!r}" for k in PARAM_GROUP_KEYS if k in old and old[k] != new.get(k)
    )
    shown = ", ".join(f"{name} ({n})" for name, n in have), ", ".join(f"{name} ({n})" for name, n in want)
    raise CheckpointError(
        f"{path} does not fit the configured optimiser ({changed or 'its parameter groups differ'}): it holds the "
        f"parameter groups (tensors) {shown[0]}, the configuration builds {shown[1]}. The optimiser's parameter "
        f"groups are decided by {', '.join(PARAM_GROUP_KEYS[:-1])} and {PARAM_GROUP_KEYS[-1]}, which cannot change "
        "on resume (not even with --force); start a new run with the new settings"
    )


def _unsafe_reason(message: str) -> str:
    """The line of torch's weights-only error that names what it refused, e.g. 'Trying to load unsupported GLOBAL
    posix.system whose module posix is blocked', cut to that first sentence: torch goes on to suggest allowlisting
    the class (``torch.serialization.add_safe_globals``), which would defeat the refusal."""
    for line in message.splitlines()[1:]:
        if "unsupported" in line.lower() and "compatible with your use case" not in line:
            line = line.strip().removeprefix("WeightsUnpickler error: ")
            return line.split(". ")[0].strip().rstrip(".")
    return "unsupported pickle content"
