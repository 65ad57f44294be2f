"""The run directory: created (or checked for a resume) before any work, and the settings a resume may change."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from directpred import distributed
from directpred.config import (
    DATA_LOCATION,
    Config,
    ConfigError,
    diff_configs,
    dump_config,
    read_json_object,
    read_run_config,
)
from directpred.train.checkpoint import atomic_write_text, remove_stale_temporaries
from directpred.train.faults import TrainingError

# Settings that may change when a run is resumed: they do not alter what has been computed so far.
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.max_steps",
    "train.progress",
    "train.log_every",
    "train.checkpoint_every",
    "train.checkpoint_every_steps",
    "train.skip_nonfinite",
    "train.device",
    "train.precision",  # as train.device: the steps to come (a resume warns when it differs from the checkpoint's)
    *DATA_LOCATION,
    "data.skip_corrupt",  # the fix a corrupt file's error names; a changed image count is refused by the data check
    "data.decode",  # as train.device: where the steps to come decode (a resume warns when the decoder changes)
    "data.jpeg_decoder",
    "eval.",
    "log.",
    "diag.stop_on_collapse",
)


def prepare_run_dir(run_dir: Path, *, resume: bool) -> None:
    """Check that ``run_dir`` holds a run to resume (or, for a new run, none: at most one killed before its first
    checkpoint, which is started over; never a finished run's ``summary.json`` or a ``config.yaml`` no run wrote) and
    is writable. Writes nothing there yet (:func:`record_command` does, once the run is set up). Rank 0 does it;
    every rank waits for it and stops with an error if it failed."""
    ckpt_dir = run_dir / "checkpoints"
    distributed.on_main(lambda: _prepare(run_dir, ckpt_dir, resume=resume), "prepare the run directory", TrainingError)


def record_command(run_dir: Path, cfg: Config, *, resume: bool, command: str) -> None:
    """Write ``config.yaml`` (new runs) and append the command line to ``command.txt``: called once the run is set
    up (data loaded, model built, checkpoint loaded and checked), so ``command.txt`` lists the commands that trained
    or evaluated in the run directory, not those refused before any work. Every rank first waits for all the others
    to get here (a rank whose setup failed never does, and torchrun ends the group), then rank 0 writes."""

    def write() -> None:
        if not resume:
            atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
        with open(run_dir / "command.txt", "a") as f:
            f.write((command or " ".join(sys.argv)) + "\n")

    distributed.barrier()  # every rank is set up: the command will train
    distributed.on_main(write, "record the run's command", TrainingError)


def _prepare(run_dir: Path, ckpt_dir: Path, *, resume: bool) -> None:
    """Rank 0's part of :func:`prepare_run_dir`."""
    # Kept checkpoints without last.pt: last.pt was lost (it is written before every epoch_XXXX.pt), not a run
    # that stopped before its first checkpoint; a new run there would overwrite the run's metrics and summary.
    kept = sorted(ckpt_dir.glob("epoch_*.pt")) if not (ckpt_dir / "last.pt").is_file() else []
    if kept:
        raise TrainingError(
            f"{run_dir} holds a run's kept checkpoints (the latest: {kept[-1]}) but no checkpoints/last.pt; "
            f"to continue from the latest, copy it to {ckpt_dir / 'last.pt'} and run "
            f"`directpred train --resume {run_dir}`" + ("" if resume else ", or choose another --out")
        )
    summary = run_dir / "summary.json"
    if resume:
        if not (ckpt_dir / "last.pt").is_file():
            if summary.is_file():  # finished, then its checkpoints were removed: starting it again would lose it
                raise TrainingError(
                    f"nothing to resume in {run_dir}: it holds a finished run ({summary}) whose checkpoints/last.pt "
                    f"is gone; to train it again, start a new run with `directpred train {run_dir / 'config.yaml'} "
                    "--out OTHER_DIR` (or remove the directory first)"
                )
            raise TrainingError(
                f"nothing to resume in {run_dir}: no checkpoints/last.pt (the run stopped before its first "
                f"checkpoint); start it again with `directpred train {run_dir / 'config.yaml'} --out {run_dir}`"
            )
    elif (ckpt_dir / "last.pt").is_file():
        raise TrainingError(
            f"{run_dir} already holds a run; continue it with "
            f"`directpred train --resume {run_dir}` or choose another --out"
        )
    elif summary.is_file():  # a run killed before its first checkpoint has none: it may be started over
        raise TrainingError(
            f"{run_dir} already holds a finished run ({summary}; its checkpoints/last.pt is gone) that a new run "
            f"would overwrite; choose another --out, or remove {run_dir} to start over there"
        )
    elif not (run_dir / "command.txt").is_file() and (
        foreign := next((n for n in ("config.yaml", "metrics.jsonl") if (run_dir / n).is_file()), None)
    ):
        # a run writes command.txt with its config.yaml, before its first metrics row: without it, either file is
        # someone else's, which the new run would overwrite (the logger truncates metrics.jsonl)
        raise TrainingError(
            f"{run_dir} holds a {foreign} that no run wrote (no command.txt beside it) and a new run would "
            "overwrite it; choose another --out (an empty or new directory)"
        )
    # Fail before any work rather than at the first checkpoint (also on resume: the disk may be full now).
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / ".write_test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(
            f"cannot write to the run directory {run_dir}: {exc.strerror or exc}; "
            + ("free disk space or fix permissions, then resume" if resume else "choose a writable --out")
        ) from None
    for folder in (ckpt_dir, run_dir):  # left by a writer killed mid-write (checkpoints, summary.json, config.yaml,
        remove_stale_temporaries(folder)  # metrics.jsonl); never read


def fixed_changes(old: Config, new: Config) -> dict[str, tuple[Any, Any]]:
    """The keys that differ between ``old`` and ``new`` beyond :data:`RESUMABLE_CHANGES`, as ``{key: (old, new)}``:
    what makes them different runs, not one run continued."""
    return diff_configs(old, new, beyond=RESUMABLE_CHANGES)


def check_resume_config(saved: Config, new: Config, *, force: bool = False) -> None:
    """Refuse to resume with changes other than :data:`RESUMABLE_CHANGES`, showing the difference."""
    changes = fixed_changes(saved, new)
    if changes and not force:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise TrainingError(
            f"the run would resume with a different configuration ({shown}). Only these may change on resume: "
            + ", ".join(RESUMABLE_CHANGES)
            + ". Start a new run, or pass --force to resume anyway."
        )


def check_checkpoint_config(run_dir: Path, saved: Config, *, force: bool = False) -> None:
    """Refuse a ``config.yaml`` that differs from the configuration the checkpoint was trained with beyond
    :data:`RESUMABLE_CHANGES`: a hand edit of it would otherwise pass :func:`check_resume_config` (which compares
    it with itself plus ``--set``), and the run would continue with settings its earlier steps never had while
    ``config.yaml`` claims them throughout. The checkpoint is memory-mapped, not read; a missing or unreadable one
    is left to the resume to report."""
    try:
        state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # missing, torn, foreign or refused (weights_only): the resume's own loading says which
        return
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        return
    from directpred.train.checkpoint import stored_config

    try:
        trained = stored_config(state, run_dir / "checkpoints" / "last.pt")
    except ConfigError:  # written by another version: the resume itself says what to do
        return
    changes = fixed_changes(trained, saved)
    if changes and not force:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
        raise TrainingError(
            f"{run_dir / 'config.yaml'} differs from the configuration its checkpoint was trained with ({shown}); "
            "config.yaml records what the run trained with: undo the edit and change allowed settings with --set, "
            "start a new run with the new settings, or pass --force to resume anyway (as needed again after a "
            "--force resume that stopped before its first checkpoint)"
        )


def finished_summary(run_dir: Path, cfg: Config) -> dict[str, Any] | None:
    """The ``summary.json`` of the run in ``run_dir`` if it finished with exactly ``cfg``, so that resuming it would
    train and evaluate nothing new; None otherwise. Reads three small files and touches nothing.

    Finished means: ``config.yaml`` is ``cfg`` (a resume with changes removes ``summary.json`` before it rewrites
    ``config.yaml``), the summary's step is the checkpoint's, and the run ended where ``cfg`` ends it (at
    ``train.max_steps`` or after ``train.epochs``) or was stopped on collapse (``diag.stop_on_collapse``). The
    checkpoint is memory-mapped, not read.
    """
    summary_file = run_dir / "summary.json"
    if not summary_file.is_file():  # stopped or killed before its end: not finished
        return None
    try:
        if read_run_config(run_dir) != cfg:
            return None
        state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torn, foreign or refused (weights_only): the resume reports what is wrong
        return None
    summary = read_json_object(summary_file, "the run is resumed as unfinished")
    training_checkpoint = isinstance(state, dict) and all(k in state for k in ("model", "optimizer", "step"))
    if summary is None or not training_checkpoint or summary.get("steps") != state["step"]:
        return None
    ended = (
        summary.get("stopped_early")
        or (0 < cfg.train.max_steps == state["step"])
        or abs(float(summary.get("epochs") or 0) - cfg.train.epochs) < 1e-3
    )
    return summary if ended else None
