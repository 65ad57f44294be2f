"""``directpred sweep``: a paper table in one command.

A sweep file (:mod:`directpred.sweep.spec`) names a base config, overrides, cells and seeds; every cell x seed is run
by the ordinary ``directpred train`` command in its own subprocess and run directory (:mod:`directpred.sweep.runner`,
resumable: a rerun finishes only what is missing), and the results are gathered into tables and figures
(:mod:`directpred.sweep.report`).

Examples:
    >>> from directpred.sweep import load_sweep, write_reports  # doctest: +SKIP
    >>> sweep = load_sweep("sweeps/cpu/cifar10_predictors.yaml")  # doctest: +SKIP
    >>> write_reports(sweep, Path("out/sweep"))  # doctest: +SKIP
"""

from __future__ import annotations

from directpred.config import ConfigError
from directpred.sweep.report import write_reports
from directpred.sweep.spec import Sweep, load_sweep

__all__ = ["Sweep", "load_sweep", "parse_devices", "write_reports"]


def parse_devices(text: str, *, torchrun: int = 0, jobs: int = 1) -> list[str | None]:
    """Concurrent run slots: their GPU indices (None: the CPU).

    ``cpu`` -> one slot per job; ``0,1,2,3`` -> one slot per GPU per job, or, with ``torchrun`` = N, one per group of
    N consecutive GPUs; ``auto`` -> every visible GPU, or the CPU if there is none. The indices count the GPUs this
    process sees (as torch numbers them): under ``CUDA_VISIBLE_DEVICES``, its entries, which the runner gives each
    run (:func:`directpred.sweep.runner.visible_devices`).
    """
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: must be >= 1 (concurrent runs per device)")
    if torchrun < 0:
        raise ConfigError(f"--torchrun {torchrun}: must be >= 1 processes per run (0 or absent: no torchrun)")
    if text == "auto":
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        text = ",".join(str(i) for i in range(n)) if n else "cpu"
    if text == "cpu":
        return [None] * jobs
    ids = [t.strip() for t in text.split(",")]
    if not all(t.isdigit() for t in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"--devices {text!r}: give cpu, auto or distinct GPU indices like 0,1,2,3")
    group = max(torchrun, 1)
    if len(ids) % group:
        raise ConfigError(
            f"--devices {text!r} with --torchrun {torchrun}: the number of GPUs must be a multiple of "
            f"the processes per run"
        )
    groups = [",".join(ids[i : i + group]) for i in range(0, len(ids), group)]
    return [g for g in groups for _ in range(jobs)]
