"""Run every cell x seed of a sweep, each as its own ``directpred train`` subprocess, resumably.

A run directory ``DIR/runs/<cell>/seed<k>/`` is in one of four states, decided from what is on disk:

* **done**: ``summary.json`` exists (and the run's length is the one asked for): skipped;
* **resume**: ``checkpoints/last.pt`` without a summary (or a finished run asked to train longer):
  ``directpred train --resume RUN_DIR``;
* **new**: no checkpoint: the directory is cleared (its ``sweep.log`` kept) and ``directpred train BASE --out RUN_DIR``
  starts from scratch;
* a run directory whose ``config.yaml`` differs from the sweep's in anything that cannot change on resume is refused
  before any run starts.

The child's output goes to ``RUN_DIR/sweep.log``; a failed run leaves ``RUN_DIR/failed.json``. Children start in
their own session (a Ctrl-C reaches only the sweep, which forwards one SIGTERM: each child checkpoints and stops) and,
on Linux, die with the sweep if it is killed outright, so a rerun never races a leftover child.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from directpred.config import (
    Config,
    ConfigError,
    diff_configs,
    flatten,
    length_schedules,
    read_json_object,
    read_run_config,
)
from directpred.files import run_dir_busy
from directpred.sweep.spec import Run, Sweep, yaml_value

LENGTH_KEYS = ("train.epochs", "train.max_steps")  # a finished run asked for more of these is resumed
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class SweepInterrupted(Exception):
    """The sweep was asked to stop (SIGINT/SIGTERM); the children were stopped at a checkpoint. ``signum``: the
    signal (the command exits with 128 + it, as ``directpred train`` does)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclass
class Plan:
    """What to do with one run: ``action`` is ``done``, ``resume`` or ``new``; ``sets`` go with ``--resume``."""

    run: Run
    run_dir: Path
    action: str
    sets: list[str] = field(default_factory=list)

    def command(self, sweep: Sweep, torchrun: int = 0) -> list[str]:
        """The exact ``directpred train`` command line of this run (under torchrun when ``torchrun`` > 0)."""
        head = [sys.executable, "-m", "directpred"]
        if torchrun:
            head = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={torchrun}",
                "-m",
                "directpred",
            ]
        if self.action == "resume":
            tail = ["--resume", str(self.run_dir)] + [a for s in self.sets for a in ("--set", s)]
        else:
            tail = [str(sweep.base), "--out", str(self.run_dir)] + [a for s in self.run.sets for a in ("--set", s)]
        return head + ["train"] + tail


# eval.* keys whose change gives a finished run no new figure to report: the kNN every N epochs of a run already
# trained (its curve cannot be remade), and eval.untrained (figures added beside the run's, which true -> false
# only leaves unread; false -> true is a re-evaluation, judged apart)
NO_NEW_FIGURES = ("eval.knn_every", "eval.untrained")
# train.precision as asked -> as summary.json records it (the autocast dtype the run resolved; ``auto`` is either)
PRECISION_RECORDED = {"fp32": "fp32", "bf16": "bfloat16", "fp16": "float16"}


def plan_run(sweep: Sweep, run: Run, out: Path, world: int | None = None) -> Plan:
    """Decide from the run directory whether ``run`` is done, to be resumed or to be (re)started.

    Raises:
        ConfigError: the directory holds a run this sweep cannot continue (another configuration, a longer run, a
            finished run in another precision, or a finished run to continue whose checkpoint is gone); the message
            names the directory and the fix.
    """
    run_dir = out / run.rel_dir
    cfg_file, ckpt = run_dir / "config.yaml", run_dir / "checkpoints" / "last.pt"
    if not cfg_file.is_file() or not ckpt.is_file() and not (run_dir / "summary.json").is_file():
        return Plan(run, run_dir, "new")
    try:
        saved = read_run_config(run_dir)
    except ConfigError as exc:
        raise ConfigError(f"{exc}; in this sweep, removing {run_dir} restarts that run") from None
    wanted = sweep.config(run)
    diffs = diff_configs(saved, wanted)
    if (run_dir / "summary.json").is_file():
        todo = finished_run_todo(run_dir, saved, wanted, world)  # raises for a run this sweep cannot use
        if todo is None:
            return Plan(run, run_dir, "done")
        if not ckpt.is_file():  # clearing the directory would delete a finished run's results
            raise ConfigError(
                f"{run_dir} has finished, but {todo}, and its checkpoint {ckpt} is gone, so it can be neither "
                "trained on nor evaluated again; remove that directory to rerun it from scratch, or write this "
                "sweep to another --out"
            )
    else:
        _refuse_fixed_changes(run_dir, saved, wanted)
    return Plan(run, run_dir, "resume", [f"{k}={yaml_value(b)}" for k, (_, b) in diffs.items()])


def _refuse_fixed_changes(run_dir: Path, saved: Config, wanted: Config) -> None:
    # Only here: it imports torch and torchvision (4-8 s on 2 loaded cores), which a sweep of new runs does not need
    # before its first run starts.
    from directpred.train.rundir import fixed_changes

    fixed = fixed_changes(saved, wanted)
    if fixed:
        shown = "; ".join(f"{k}: {a!r} in the run, {b!r} in the sweep" for k, (a, b) in fixed.items())
        raise ConfigError(
            f"{run_dir} was made with a different configuration ({shown}); remove that directory to "
            "rerun it, or write this sweep to another --out"
        )


def finished_run_todo(run_dir: Path, saved: Config, wanted: Config, world: int | None = None) -> str | None:
    """What the finished run in ``run_dir`` (configuration ``saved``) still lacks to stand for ``wanted``, the
    sweep's configuration of it: None when its results are the cell's; else why it is to be resumed (trained
    longer, evaluated by another protocol, trained on past a collapse stop the sweep no longer asks for).

    Raises:
        ConfigError: no resume can make it the cell's run: another configuration beyond what a resume may change,
            more steps than asked for, another precision than ``wanted`` names (``auto`` accepts either), or
            (``world`` given: the processes each run of the sweep has) another number of processes, so another
            global batch (``train.batch_size`` is per process).
    """
    _refuse_fixed_changes(run_dir, saved, wanted)
    summary = read_json_object(run_dir / "summary.json", "the run is resumed") or {}
    diffs = diff_configs(saved, wanted)
    recorded, asked = summary.get("precision"), wanted.train.precision
    if isinstance(recorded, str) and asked in PRECISION_RECORDED and PRECISION_RECORDED[asked] != recorded:
        # A resume of a finished run trains no step in the new precision: its results would be filed under it.
        raise ConfigError(
            f"{run_dir} trained in {recorded} and this sweep asks for train.precision={asked}; remove that "
            "directory to rerun it, write this sweep to another --out, or ask for the precision it ran in"
        )
    ran_with = summary.get("world_size", 1)
    if world is not None and isinstance(ran_with, int) and ran_with != world:
        flag = "without --torchrun" if ran_with == 1 else f"with --torchrun {ran_with}"
        raise ConfigError(
            f"{run_dir} trained with {ran_with} process{'es' * (ran_with != 1)} and this sweep runs {world}: another "
            f"global batch (train.batch_size={wanted.train.batch_size} per process); run the sweep {flag}, remove "
            "that directory to rerun it, or write this sweep to another --out"
        )
    todo = []
    if any(k in LENGTH_KEYS for k in diffs):
        steps, trained = _steps_wanted(wanted, summary)
        if steps is not None and steps < trained:  # resuming evaluates the longer run, reported as this cell
            raise ConfigError(
                f"{run_dir} trained {trained} steps and this sweep asks for {steps} "
                f"({', '.join(f'{k}={yaml_value(b)}' for k, (_, b) in diffs.items() if k in LENGTH_KEYS)}): "
                "a shorter run cannot be made from it; write this sweep to another --out, or remove that "
                "directory"
            )
        schedules = [f"{key}={yaml_value(flatten(wanted.to_dict())[key])}" for key in length_schedules(wanted)]
        if steps == trained and "train.epochs" in diffs and schedules:  # capped by train.max_steps, both
            raise ConfigError(
                f"{run_dir} trained {trained} steps of a {saved.train.epochs:g}-epoch schedule and this sweep asks "
                f"for {trained} steps of a {wanted.train.epochs:g}-epoch one ({', '.join(schedules)} follows the "
                "epochs): another run; remove that directory to rerun it, or write this sweep to another --out"
            )
        if steps != trained:
            todo.append(f"it trained {trained} steps and the sweep asks for {'more' if steps is None else steps}")
    evaluated = [k for k in diffs if k.startswith("eval.") and k not in NO_NEW_FIGURES]
    if wanted.eval.untrained and not saved.eval.untrained:  # the untrained figures are still to be computed
        evaluated.append("eval.untrained")
    if evaluated:  # resumed, which evaluates again, so the report shows what the sweep says
        todo.append(f"it was evaluated with other {', '.join(evaluated)}")
    if summary.get("stopped_early") and not wanted.diag.stop_on_collapse:  # --resume trains it on
        todo.append("it was stopped on collapse and the sweep asks for diag.stop_on_collapse=false")
    return "; ".join(todo) or None


def _steps_wanted(cfg: Config, summary: Mapping[str, object]) -> tuple[int | None, int]:
    """The steps ``cfg`` asks for and those the finished run trained (its ``summary.json``); None when the summary
    does not say how many steps an epoch has (then the run is resumed, as before)."""
    trained, epochs = summary.get("steps"), summary.get("epochs")
    if not isinstance(trained, int) or not isinstance(epochs, (int, float)) or epochs <= 0:
        return None, 0
    wanted = round(cfg.train.epochs * trained / epochs)  # steps per epoch from the run itself
    if cfg.train.max_steps:
        wanted = min(wanted, cfg.train.max_steps)
    return wanted, trained


def _death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive SIGKILL when the sweep dies (Linux ``PR_SET_PDEATHSIG``); libc
    is loaded here, in the parent, so the child only makes one system call between fork and exec."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _prepare_dir(plan: Plan) -> None:
    plan.run_dir.mkdir(parents=True, exist_ok=True)
    (plan.run_dir / "failed.json").unlink(missing_ok=True)
    if plan.action == "new":  # a fresh start: nothing of an earlier attempt may leak in (logs appended, ...)
        for p in plan.run_dir.iterdir():
            if p.name != "sweep.log":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    else:  # resume: a stale summary must not mark a longer run done if this attempt is killed
        (plan.run_dir / "summary.json").unlink(missing_ok=True)


@dataclass
class _Active:
    plan: Plan
    proc: subprocess.Popen
    log: IO[str]
    slot: int
    index: int
    start: float


def _finish_line(plan: Plan) -> str:
    s = json.loads((plan.run_dir / "summary.json").read_text())
    parts = [
        f"{label} {s[k]:.2f}%"
        for k, label in (("knn_top1", "kNN"), ("linear_top1", "linear"), ("linear_top1_best", "best"))
        if s.get(k) is not None
    ]
    if "knn_top1" in s and s["knn_top1"] is None:  # always evaluated: null is NaN, from non-finite features
        parts.insert(0, "kNN nan (non-finite features)")
    flags = [word for key, word in (("collapsed", "collapsed"), ("dim_collapsed", "dim. collapsed")) if s.get(key)]
    return ", ".join(parts) + "".join(f" [{word}]" for word in flags)


def _last_line(log: Path) -> str:
    """The reason a run failed, from its log: the CLI's one-line error (``directpred: ...``) among the last 40 lines
    (not an earlier attempt's), else the last line. Under ``--torchrun`` the log ends with torchrun's summary of the
    failed ranks, framed by ``====`` lines, after the error."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
    except OSError:
        return ""
    ours = [ln for ln in lines[-40:] if ln.startswith("directpred:")]
    return (ours or lines or [""])[-1][:300]


def visible_devices(slot: str | None, environ: Mapping[str, str]) -> str:
    """The ``CUDA_VISIBLE_DEVICES`` of a run on ``slot`` (``--devices`` indices, comma-separated; None: the CPU).

    ``--devices`` counts the GPUs this process sees, as torch numbers them: under the parent's own
    ``CUDA_VISIBLE_DEVICES`` (a Slurm job given GPUs 4-7 has ``4,5,6,7``) index i is its i-th entry, kept as written
    (a UUID ``GPU-...`` or a MIG id stays a string), since the child's mask replaces the parent's; without one, the
    index itself.

    Raises:
        ConfigError: an index beyond the parent's mask, naming it and the indices to use.
    """
    if slot is None:
        return ""  # no GPU: the run takes the CPU
    mask = environ.get("CUDA_VISIBLE_DEVICES")
    if mask is None:
        return slot
    visible = [entry.strip() for entry in mask.split(",") if entry.strip()]
    indices = [int(i) for i in slot.split(",")]
    beyond = [i for i in indices if i >= len(visible)]
    if beyond:
        fix = f"use indices 0 to {len(visible) - 1}" if visible else "use --devices cpu"
        raise ConfigError(
            f"--devices {','.join(map(str, beyond))}: this process sees {len(visible)} GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={mask}); --devices counts the GPUs this process sees (under CUDA_VISIBLE_DEVICES, "
            f"its entries): {fix}"
        )
    return ",".join(visible[i] for i in indices)


def execute(
    sweep: Sweep,
    plans: list[Plan],
    *,
    slots: list[str | None],
    torchrun: int = 0,
    echo: IO[str] | None = None,
) -> list[Plan]:
    """Run the plans that are not done, ``len(slots)`` at a time; returns the plans whose run failed.

    Args:
        slots: one entry per concurrent run: its GPU indices among those this process sees (``"0"``, ``"0,1"``
            under torchrun), or None for the CPU (hidden GPUs); the run's ``CUDA_VISIBLE_DEVICES`` is their entries
            in this process's own mask, if it has one (:func:`visible_devices`).
        torchrun: >0 launches each run under ``torchrun --standalone --nproc_per_node=torchrun``.
        echo: where the progress lines go; the ``sys.stdout`` of the call by default (not the one at import time,
            which a caller may have replaced and closed since).

    Raises:
        SweepInterrupted: on SIGINT/SIGTERM, after the running children were stopped at a checkpoint.
    """
    echo = sys.stdout if echo is None else echo
    devices = [visible_devices(slot, os.environ) for slot in slots]  # refused before any run starts
    todo = [p for p in plans if p.action != "done"]
    total = len(todo)
    failed: list[Plan] = []
    active: list[_Active] = []
    if not todo:
        print("sweep: every run is finished; nothing to run", file=echo, flush=True)
        return []
    free = list(range(len(slots)))
    preexec = _death_signal()
    t_sweep = time.time()

    def stop(signum: int, frame: object) -> None:
        raise SweepInterrupted(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        index = 0
        while todo or active:
            while todo and free:
                # The free slot of the device with the fewest runs (then the lowest): with --devices 0,1 --jobs 2
                # two runs go to GPUs 0 and 1, not both to GPU 0 (the slots are grouped by device).
                busy = Counter(slots[a.slot] for a in active)
                slot = min(free, key=lambda k: (busy[slots[k]], k))
                plan = todo.pop(0)
                index += 1
                busy_why = run_dir_busy(plan.run_dir)
                if busy_why:  # a `directpred train` of it runs beside the sweep: not cleared, not started
                    failed.append(plan)
                    print(
                        f"[{index}/{total}] FAILED {plan.run.cell} seed {plan.run.seed}: not started: {busy_why}",
                        file=echo,
                        flush=True,
                    )
                    continue
                free.remove(slot)
                _prepare_dir(plan)
                env = {
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
                    "CUDA_VISIBLE_DEVICES": devices[slot],
                }
                cmd = plan.command(sweep, torchrun)
                log = open(plan.run_dir / "sweep.log", "a")  # noqa: SIM115 (closed when the run ends)
                log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {plan.action}: {' '.join(cmd)}\n")
                log.flush()
                proc = subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, preexec_fn=preexec
                )
                where = "cpu" if slots[slot] is None else f"GPU {slots[slot]}"
                if slots[slot] is not None and devices[slot] != slots[slot]:
                    where += f" = CUDA_VISIBLE_DEVICES={devices[slot]}"
                print(
                    f"[{index}/{total}] start  {plan.run.cell} seed {plan.run.seed} ({plan.action}, {where})",
                    file=echo,
                    flush=True,
                )
                active.append(_Active(plan, proc, log, slot, index, time.time()))
            time.sleep(0.1)
            for a in [a for a in active if a.proc.poll() is not None]:
                active.remove(a)
                free.append(a.slot)
                free.sort()
                a.log.close()
                took = time.time() - a.start
                head = f"[{a.index}/{total}] {{}} {a.plan.run.cell} seed {a.plan.run.seed} in {took:.1f} s"
                if (a.plan.run_dir / "summary.json").is_file():  # trained, evaluated, written: done (as the report
                    # and the next sweep judge it), even if something after the summary failed (a tracker's close)
                    line = head.format("done  ") + ": " + _finish_line(a.plan)
                    if a.proc.returncode != 0:
                        line += (
                            f" (its summary was written, then it exited with {a.proc.returncode}: "
                            f"{_last_line(a.plan.run_dir / 'sweep.log')})"
                        )
                    print(line, file=echo, flush=True)
                    continue
                failed.append(a.plan)
                log_path = a.plan.run_dir / "sweep.log"
                (a.plan.run_dir / "failed.json").write_text(
                    json.dumps({"returncode": a.proc.returncode, "log": "sweep.log", "last_line": _last_line(log_path)})
                    + "\n"
                )
                print(
                    head.format("FAILED") + f" (exit {a.proc.returncode}): {_last_line(log_path)}\n"
                    f"        log: {log_path}",
                    file=echo,
                    flush=True,
                )
    except SweepInterrupted as exc:
        print(f"\nsweep: {exc}: stopping {len(active)} running run(s) at a checkpoint ...", file=echo, flush=True)
        for a in active:
            a.proc.send_signal(signal.SIGTERM)
        for a in active:
            try:
                a.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()
            a.log.close()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(
        f"sweep: {total - len(failed)}/{total} run(s) finished, {len(failed)} failed, {time.time() - t_sweep:.0f} s",
        file=echo,
        flush=True,
    )
    return failed
