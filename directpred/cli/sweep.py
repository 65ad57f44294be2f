"""``directpred sweep``: run every cell x seed of a sweep file (:mod:`directpred.sweep`) and tabulate them."""

from __future__ import annotations

import argparse
import fcntl
import sys
from pathlib import Path

from directpred.config import ConfigError
from directpred.sweep import load_sweep, parse_devices, write_reports
from directpred.sweep.report import report_names
from directpred.sweep.runner import Plan, SweepInterrupted, execute, plan_run
from directpred.sweep.spec import Sweep


def run(args: argparse.Namespace) -> int:
    """The ``directpred sweep`` command (see ``directpred sweep --help``)."""
    sweep = load_sweep(args.file, args.set)
    out = Path(args.out)
    runs = sweep.runs()
    if args.report:
        if not (out / "runs").is_dir():  # a mistyped --out wrote an empty report there before
            raise ConfigError(
                f"--report: no runs under {out / 'runs'}; give the --out of a sweep that has run, "
                "or run the sweep first (without --report)"
            )
        res = write_reports(sweep, out)
        print((out / "results.md").read_text(), end="")
        return 1 if any(r["status"] == "failed" for r in res["runs"]) else 0
    slots = parse_devices(args.devices, torchrun=args.torchrun or 0, jobs=args.jobs)
    gpus = sorted({int(i) for slot in slots if slot for i in slot.split(",")})
    if gpus and not args.dry_run:  # a dry run may plan for another machine; CPU slots need no check (nor torch)
        from directpred.runtime import check_gpu_indices

        check_gpu_indices(gpus, "--devices")
    if args.dry_run:
        world = args.torchrun or 1
        _print_plans(sweep, [plan_run(sweep, run, out, world) for run in runs], len(slots), args.torchrun or 0)
        return 0
    out.mkdir(parents=True, exist_ok=True)
    lock = open(out / ".sweep.lock", "w")  # noqa: SIM115 (held for the whole sweep)
    try:  # before planning: a sweep finishing in the meantime would leave this one a stale plan
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        print(
            f"directpred: error: another sweep is running in {out}; wait for it or choose another --out",
            file=sys.stderr,
        )
        return 1
    try:
        # refuses mismatched run directories before any run
        plans = [plan_run(sweep, run, out, args.torchrun or 1) for run in runs]
        _print_plans(sweep, plans, len(slots), None)
        failed = execute(sweep, plans, slots=slots, torchrun=args.torchrun or 0)
    except SweepInterrupted as exc:
        write_reports(sweep, out)
        print(
            f"sweep interrupted; run the same command again to finish the missing runs ({out / 'results.md'})",
            file=sys.stderr,
        )
        return 128 + exc.signum  # 130 for SIGINT, 143 for SIGTERM, as directpred train
    finally:
        lock.close()
    write_reports(sweep, out)
    print()
    print((out / "results.md").read_text(), end="")
    print(f"\nreports: {', '.join(report_names(out))}")
    return 1 if failed else 0


def _print_plans(sweep: Sweep, plans: list[Plan], slots: int, torchrun: int | None) -> None:
    """The sweep's opening line; with ``torchrun`` (a dry run: 0 or N), each run's state and command."""
    todo = [p for p in plans if p.action != "done"]
    print(
        f"sweep {sweep.name}: {len(sweep.cells)} cells x {len(sweep.seeds)} seeds = {len(plans)} runs; "
        f"{len(plans) - len(todo)} done, {sum(p.action == 'resume' for p in todo)} to resume, "
        f"{sum(p.action == 'new' for p in todo)} to start; {slots} at a time"
    )
    if torchrun is None:
        return
    for p in plans:
        leftovers = p.action == "new" and p.run_dir.is_dir() and any(f.name != "sweep.log" for f in p.run_dir.iterdir())
        print(
            f"  {p.action:6s} {p.run_dir}"
            + (" (a start killed before its first checkpoint: what its directory holds is cleared)" * leftovers)
            + ("" if p.action == "done" else "\n         " + " ".join(p.command(sweep, torchrun)))
        )


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``sweep`` subcommand to the ``directpred`` parser."""
    p = sub.add_parser(
        "sweep",
        help="run a grid of configs x seeds and tabulate them (a paper table in one command)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run every cell x seed of a sweep file, each as `directpred train` in its own run directory "
        "OUT/runs/<cell>/seed<k>/, then write OUT/results.{md,csv,json,png} and knn_curves.png. "
        "Resumable: finished runs are skipped, interrupted ones resumed from their checkpoint.",
        epilog="examples:\n  directpred sweep sweeps/cpu/cifar10_predictors.yaml --out runs/sweep_cpu\n"
        "  directpred sweep sweeps/paper/table6_stl10_rho_eps.yaml --out runs/t6 --devices 0,1,2,3 --jobs 2\n"
        "  directpred sweep sweeps/cpu/cifar10_predictors.yaml --out runs/sweep_cpu --report",
    )
    p.add_argument("file", help="sweep YAML file (base, set, axes/variants, seeds, paper)")
    p.add_argument("--out", required=True, help="sweep directory (runs/, results.*)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key in every cell (after the sweep file's overrides; repeatable)",
    )
    p.add_argument(
        "--devices",
        default="auto",
        help="cpu, auto (every visible GPU, else cpu) or GPU indices 0,1,...: one run per GPU at a time; "
        "--devices counts the GPUs this process sees (under CUDA_VISIBLE_DEVICES, its entries)",
    )
    p.add_argument("--jobs", type=int, default=1, help="concurrent runs per device (small networks on big GPUs)")
    p.add_argument(
        "--torchrun",
        type=int,
        default=0,
        metavar="N",
        help="launch each run under torchrun --standalone --nproc_per_node=N (N GPUs per run)",
    )
    p.add_argument("--report", action="store_true", help="only rebuild the reports from the run directories")
    p.add_argument("--dry-run", action="store_true", help="validate, show each run's state and command, run nothing")
    p.set_defaults(func=run)
