"""Run logging: ``metrics.jsonl`` (one JSON object per row) and TensorBoard event files, from rank 0 only."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from directpred import distributed


class RunLogger:
    """Appends rows to ``metrics.jsonl`` and mirrors numeric fields to TensorBoard under ``group/key``.

    Lists of numbers (the diagnostics' spectra) go to TensorBoard as histograms.

    ``start_step`` is the step training continues from (the checkpoint's on resume, 0 for a new run): rows that a
    killed process logged after it are dropped from ``metrics.jsonl`` (atomically) and purged from TensorBoard
    (``purge_step``), because they will be logged again; so each step appears once.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, start_step: int = 0) -> None:
        self.enabled = distributed.is_main()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if not self.enabled:
            return
        if self.path.is_file():
            truncate_metrics(self.path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            tb_dir = Path(run_dir) / "tensorboard"
            earlier = tb_dir.is_dir() and any(tb_dir.glob("events.out.tfevents.*"))
            # TensorBoard drops every earlier event with step >= purge_step when it reads the new file.
            self.writer = SummaryWriter(log_dir=str(tb_dir), purge_step=start_step + 1 if earlier else None)

    def log(self, row: dict[str, Any], *, group: str = "train") -> None:
        """Write one row; ``row['step']`` is the TensorBoard step."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": group, **clean}) + "\n")
        if self.writer is not None:
            step = int(row.get("step", 0))
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{group}/{k}", v, step)
                elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                    self.writer.add_histogram(f"{group}/{k}", np.asarray(v, dtype=np.float64), step)

    def flush(self) -> None:
        """Put TensorBoard's buffered events on disk (called with each checkpoint, so a SIGKILL loses none of the
        events before it)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def truncate_metrics(path: str | Path, step: int) -> int:
    """Atomically drop the rows of a ``metrics.jsonl`` logged after ``step`` (and a torn last line); returns how many
    rows were dropped."""
    from directpred.train.checkpoint import atomic_write_text

    path = Path(path)
    keep, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(row.get("step", 0)) > step:
            dropped += 1
        else:
            keep.append(line + "\n")
    if dropped:
        atomic_write_text(path, "".join(keep))
    return dropped


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl`` (a torn last line from a killed process is ignored)."""
    rows = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
