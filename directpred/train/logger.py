"""Run logging: ``metrics.jsonl`` (one JSON object per row) and the experiment trackers of ``log.backends``
(TensorBoard, Weights & Biases, MLflow: one small adapter each), from rank 0 only.

A tracker package is imported only when asked for (:func:`check_backends` runs before any work, so a missing one
is a one-line :class:`~directpred.config.ConfigError` naming the pip extra).
"""

from __future__ import annotations

import importlib
import json
import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from directpred import distributed
from directpred.config import ConfigError, flatten, install_hint

#: The pip package (and this project's extra) of each tracker.
BACKEND_PACKAGES = {  # tracker -> (package, extra of pyproject.toml; None: a dependency of directpred itself)
    "tensorboard": ("tensorboard", None),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def _import_backend(name: str) -> Any:
    module = {"tensorboard": "torch.utils.tensorboard"}.get(name, name)
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package, extra = BACKEND_PACKAGES[name]
        raise ConfigError(
            f"log.backends includes {name!r}, but {package} cannot be imported ({exc}); install it "
            f"with `{install_hint(extra) if extra else f'pip install {package}'}`, or remove "
            f"{name!r} from log.backends"
        ) from None


def check_backends(backends: Sequence[str]) -> None:
    """Import every tracker of ``backends`` (rank 0 only: the others log nothing) or raise :class:`ConfigError`."""
    if distributed.is_main():
        for name in backends:
            _import_backend(name)


def _tracked(key: str, group: str) -> bool:
    """Whether a row's ``key`` becomes a tracker's series: not ``step`` (the trackers' own axis), and ``epoch`` only
    in the ``train`` group: the online probe's train and test rows of one epoch end share a step with different
    epochs (the epoch trained, the epoch ended), which wrote ``probe/epoch`` twice at that step with two values."""
    return key != "step" and (key != "epoch" or group == "train")


def _numbers(row: dict[str, Any], group: str) -> tuple[dict[str, float], dict[str, list[float]]]:
    """A row's finite scalars and its lists of numbers (spectra), keyed ``group/key`` (see :func:`_tracked`)."""
    scalars: dict[str, float] = {}
    lists: dict[str, list[float]] = {}
    for k, v in row.items():
        if not _tracked(k, group) or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            if math.isfinite(v):
                scalars[f"{group}/{k}"] = v
        elif isinstance(v, list) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            lists[f"{group}/{k}"] = v
    return scalars, lists


class TensorBoardBackend:
    """Event files in ``RUN/tensorboard``; a resumed run purges the events after its checkpoint (``purge_step``)."""

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any] | None) -> None:
        tb = _import_backend("tensorboard")
        tb_dir = run_dir / "tensorboard"
        earlier = tb_dir.is_dir() and any(tb_dir.glob("events.out.tfevents.*"))
        # TensorBoard drops every earlier event with step >= purge_step when it reads the new file.
        self.writer = tb.SummaryWriter(log_dir=str(tb_dir), purge_step=start_step + 1 if earlier else None)

    def log(self, row: dict[str, Any], group: str, step: int) -> None:
        for k, v in row.items():
            if not _tracked(k, group):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"{group}/{k}", v, step)
            elif isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v):
                self.writer.add_histogram(f"{group}/{k}", np.asarray(v, dtype=np.float64), step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


class WandbBackend:
    """A W&B run named after the run directory, its id kept in ``RUN/wandb_id`` so that a resumed run continues it
    (``resume="allow"``; W&B ignores the steps a killed process had already sent). Spectra as ``wandb.Histogram``."""

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any] | None, project: str) -> None:
        self.wandb = _import_backend("wandb")
        id_file = run_dir / "wandb_id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = f"{run_dir.name}-{np.random.default_rng().integers(16**8):08x}"
            id_file.write_text(run_id + "\n")
        self.run = self.wandb.init(
            project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config or {}
        )

    def log(self, row: dict[str, Any], group: str, step: int) -> None:
        scalars, lists = _numbers(row, group)
        data: dict[str, Any] = dict(scalars)
        data.update({k: self.wandb.Histogram(np.asarray(v, dtype=np.float64)) for k, v in lists.items()})
        if data:
            self.run.log(data, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


class MlflowBackend:
    """An MLflow run in experiment ``log.project``, named after the run directory; its id kept in
    ``RUN/mlflow_run_id`` so that a resumed run continues it. The resolved config is logged as parameters once
    (MLflow's parameters cannot change). MLflow has no histograms: spectra are left out.

    MLflow keeps every value sent, so a metric sent twice for a step would show twice in its history. A resumed run
    therefore asks the server for the last step of each metric and sends only later ones: the steps a killed
    process had sent after its checkpoint keep their values, which the redone steps reproduce (resume is exact)."""

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any] | None, project: str) -> None:
        self.mlflow = _import_backend("mlflow")
        id_file = run_dir / "mlflow_run_id"
        self.mlflow.set_experiment(project)
        self.last_step: dict[str, int] = {}  # metric -> the last step the tracking server holds
        if id_file.is_file():
            self.run = self.mlflow.start_run(run_id=id_file.read_text().strip())
            client, run_id = self.mlflow.MlflowClient(), self.run.info.run_id
            for key in client.get_run(run_id).data.metrics:
                self.last_step[key] = max((m.step for m in client.get_metric_history(run_id, key)), default=-1)
        else:
            self.run = self.mlflow.start_run(run_name=run_dir.name)
            id_file.write_text(self.run.info.run_id + "\n")
            if config:
                self.mlflow.log_params({k: str(v) for k, v in flatten(config).items()})

    def log(self, row: dict[str, Any], group: str, step: int) -> None:
        scalars, _ = _numbers(row, group)
        scalars = {k: v for k, v in scalars.items() if step > self.last_step.get(k, -1)}
        if scalars:
            self.mlflow.log_metrics(scalars, step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.mlflow.end_run()


class RunLogger:
    """Appends rows to ``metrics.jsonl`` and mirrors their numbers to the trackers under ``group/key``.

    Lists of numbers (the diagnostics' spectra) go to TensorBoard and W&B as histograms.

    ``start_step`` is the step training continues from (the checkpoint's on resume, 0 for a new run): rows that a
    killed process logged after it are dropped from ``metrics.jsonl`` (atomically) and purged from TensorBoard
    (``purge_step``), because they will be logged again; so each step appears once. ``backends`` are the trackers
    (``log.backends``; default TensorBoard only, or none with ``tensorboard=False``), ``config`` the resolved
    configuration they record as run parameters, ``project`` the W&B project / MLflow experiment.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        start_step: int = 0,
        backends: Sequence[str] | None = None,
        config: dict[str, Any] | None = None,
        project: str = "directpred",
    ) -> None:
        self.enabled = distributed.is_main()
        run_dir = Path(run_dir)
        self.path = run_dir / "metrics.jsonl"
        self.backends: list[Any] = []
        self.writer = None  # TensorBoard's SummaryWriter, if it is one of the backends
        if not self.enabled:
            return
        if self.path.is_file():
            truncate_metrics(self.path, start_step)
        names = list(backends) if backends is not None else (["tensorboard"] if tensorboard else [])
        check_backends(names)
        for name in names:
            if name == "tensorboard":
                tb = TensorBoardBackend(run_dir, start_step, config)
                self.writer = tb.writer
                self.backends.append(tb)
            elif name == "wandb":
                self.backends.append(WandbBackend(run_dir, start_step, config, project))
            elif name == "mlflow":
                self.backends.append(MlflowBackend(run_dir, start_step, config, project))
            else:
                raise ConfigError(f"log.backends: unknown tracker {name!r}; use tensorboard, wandb or mlflow")

    def log(self, row: dict[str, Any], *, group: str = "train") -> None:
        """Write one row; ``row['step']`` is the trackers' step."""
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"kind": group, **clean}) + "\n")
        step = int(row.get("step", 0))
        for backend in self.backends:
            backend.log(row, group, step)

    def drop_rows_at(self, step: int, which: Callable[[dict[str, Any]], bool]) -> None:
        """Drop the rows at ``step`` for which ``which`` is true from ``metrics.jsonl``, as they will be logged again
        (:func:`final_evaluation_row`: a resume that trains no step evaluates again; :func:`probe_test_row`: a run
        extended from an epoch boundary runs that epoch's end again). So each row appears once in ``metrics.jsonl``;
        TensorBoard purges only the events after ``start_step`` (the checkpoint's own step keeps its train row), so
        it shows both evaluations of that step, the later one last."""
        if self.enabled and self.path.is_file():
            truncate_metrics(self.path, step, at_step=which)

    def flush(self) -> None:
        """Put the trackers' buffered events on disk (called with each checkpoint, so a SIGKILL loses none of the
        events before it)."""
        for backend in self.backends:
            backend.flush()

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []


def probe_test_row(row: dict[str, Any]) -> bool:
    """The online probe's test top-1 on the features of an evaluation."""
    return row.get("kind") == "probe" and "probe_test_top1" in row


def epoch_end_row(row: dict[str, Any]) -> bool:
    """A row an epoch end logs at its step: the periodic kNN (``eval``) and the online probe's test top-1."""
    return row.get("kind") == "eval" or probe_test_row(row)


def final_evaluation_row(row: dict[str, Any]) -> bool:
    """A row of the final evaluation: ``final``, and the online probe's test top-1 on its features (a resume that
    trains no step has no new final report, so ``diag_final`` is not one)."""
    return row.get("kind") == "final" or probe_test_row(row)


def truncate_metrics(path: str | Path, step: int, *, at_step: Callable[[dict[str, Any]], bool] | None = None) -> int:
    """Atomically drop the rows of a ``metrics.jsonl`` logged after ``step`` (and a torn last line), and the rows at
    ``step`` for which ``at_step`` is true (rows that will be logged again); returns how many rows were dropped."""
    from directpred.train.checkpoint import atomic_write_text

    path = Path(path)
    keep, dropped = [], 0
    for line in path.read_text(errors="replace").splitlines():
        row = _metrics_row(line)
        if (
            row is None
            or row.get("step", 0) > step
            or (at_step is not None and row.get("step", 0) == step and at_step(row))
        ):
            dropped += 1
        else:
            keep.append(line + "\n")
    if dropped:
        atomic_write_text(path, "".join(keep))
    return dropped


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All rows of a run's ``metrics.jsonl`` (a torn last line from a killed process is ignored)."""
    rows: list[dict[str, Any]] = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return rows
    lines = path.read_text(errors="replace").splitlines()
    bad = []
    for number, line in enumerate(lines, 1):
        row = _metrics_row(line)
        if row is None:
            bad.append(number)
        else:
            rows.append(row)
    if bad and bad != [len(lines)]:  # more than the torn last line of a killed writer: the file was damaged
        warnings.warn(
            f"{path}: skipped {len(bad)} unreadable line(s) (line {', '.join(map(str, bad[:5]))}"
            f"{', ...' if len(bad) > 5 else ''}); the other rows are used",
            stacklevel=2,
        )
    return rows


def _metrics_row(line: str) -> dict[str, Any] | None:
    """A ``metrics.jsonl`` line as its row; None for a torn or damaged line (not a JSON object with an integer
    ``step``)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or type(row.get("step", 0)) is not int:
        return None
    return row
