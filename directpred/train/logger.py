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
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True) -> None:
        self.enabled = distributed.is_main()
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if self.enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


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
