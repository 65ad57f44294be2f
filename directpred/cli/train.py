"""``directpred train``: a run directory per run; YAML config + ``--set key=value`` overrides; ``--resume``.

Where training's signal handlers are installed and its exceptions mapped to exit codes (the sweep runner has its own,
which pass SIGTERM on to these commands): the first SIGINT/SIGTERM asks the trainer to stop after the current step
(checkpoint written, exit code 128 + signal, with the resume command), a second one stops at once, unless it
comes within ``SAME_STOP_SECONDS`` of the first: Slurm and torchrun each deliver the same stop.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from directpred.cli.eval import print_results
from directpred.config import ConfigError

if TYPE_CHECKING:
    from directpred.train.loop import Trainer

EPILOG = """examples:
  directpred train configs/cpu/quickstart.yaml --out runs/qs
  directpred train configs/cpu/quickstart.yaml --set predictor.name=linear --set train.epochs=3
  directpred train --resume runs/qs
  torchrun --standalone --nproc_per_node=2 -m directpred train configs/cpu/quickstart.yaml --out runs/ddp
"""


#: Seconds after the first stop signal in which another one is the same stop delivered twice, not a second stop.
#: Slurm (``scancel``, a time limit, preemption) signals every process of a job step, and torchrun (or the sweep
#: runner) passes its own SIGTERM on to the same processes a few milliseconds later.
SAME_STOP_SECONDS = 2.0


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer) -> Iterator[None]:
    """While training: the first SIGINT/SIGTERM asks ``trainer`` to stop after the current step (it writes the
    checkpoint and raises ``TrainingInterrupted``), or in the final evaluation stops that at once (its checkpoint is
    written); a second one stops at once (``KeyboardInterrupt``), unless it comes within :data:`SAME_STOP_SECONDS`
    of the first (one stop that reached the process twice). Before the trainer is set up (loading and decoding the
    data can take minutes), the first stops at once too: nothing is trained to checkpoint yet."""
    first: list[float] = []

    def handle(signum: int, frame: object) -> None:
        if not trainer.ready and not first:
            raise KeyboardInterrupt
        if first:
            if time.monotonic() - first[0] < SAME_STOP_SECONDS:
                return
            raise KeyboardInterrupt
        first.append(time.monotonic())
        trainer.request_stop(signum)
        if trainer.evaluating:  # the final checkpoint is written: the evaluation stops now, a resume redoes it
            from directpred.train.faults import TrainingInterrupted

            ckpt = trainer.ckpt_dir / "last.pt"
            raise TrainingInterrupted(signum, trainer.step, ckpt, trainer.run_dir, world=trainer.world, evaluating=True)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handle)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def command_line(argv: list[str], env: Mapping[str, str] | None = None) -> str:
    """The command as the user can type it again (``command.txt``): ``python -m directpred`` rather than the path of
    ``directpred/__main__.py`` that ``sys.argv[0]`` holds then (also in sweeps), and arguments quoted where the
    shell needs it (``--set "log.backends=[tensorboard, wandb]"``). Under torchrun (``env``, default
    ``os.environ``, holds its ``WORLD_SIZE`` and ``LOCAL_WORLD_SIZE``) the torchrun command of as many processes:
    one process typing the bare line would train on a fraction of the global batch, or be refused on resume (on
    several machines, with ``HOST:PORT`` for the rendezvous the user gave).

        >>> command_line(["/x/directpred/__main__.py", "train", "c.yaml"], {"WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"})
        'torchrun --standalone --nproc_per_node=2 -m directpred train c.yaml'
    """
    env = os.environ if env is None else env
    module = Path(argv[0]).name == "__main__.py"
    head = "python -m directpred" if module else shlex.quote(argv[0])
    world, local = int(env.get("WORLD_SIZE", "1") or 1), int(env.get("LOCAL_WORLD_SIZE", "0") or 0)
    if world > 1 and local > 0:
        launch = (
            f"--standalone --nproc_per_node={local}"
            if world == local
            else f"--nnodes={world // local} --nproc_per_node={local} --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT"
        )  # several machines: the rendezvous host and port are the user's to give again
        head = f"torchrun {launch} " + ("-m directpred" if module else f"--no-python {shlex.quote(argv[0])}")
    return " ".join([head, *map(shlex.quote, argv[1:])])


def run(args: argparse.Namespace) -> int:
    """``directpred train``: a new run, or ``--resume``; SIGINT/SIGTERM stop it after a step (exit 128+signal)."""
    from directpred import distributed
    from directpred.config import dump_config, load_config, read_run_config
    from directpred.files import run_dir_lock
    from directpred.runtime import resolve_device
    from directpred.train.checkpoint import atomic_write_text
    from directpred.train.faults import TrainingInterrupted
    from directpred.train.loop import Trainer
    from directpred.train.rundir import check_checkpoint_config, check_resume_config

    distributed.die_with_launcher()  # under torchrun: no orphaned worker if the launcher is killed outright
    if args.resume:
        run_dir = Path(args.resume)
        cfg_file = run_dir / "config.yaml"
        if args.config:
            raise ConfigError(
                "give either a CONFIG file or --resume RUN_DIR, not both (use --set to change "
                "allowed settings such as train.epochs on resume)"
            )
        if args.out:  # a resume continues in RUN_DIR: --out was ignored before
            raise ConfigError(
                f"--out {args.out} with --resume: a resumed run continues in its own directory {run_dir}; "
                "drop --out (to train a variant elsewhere, start a new run from "
                f"{cfg_file} with --out)"
            )
        saved = read_run_config(run_dir)
        cfg = load_config(None, args.set, base=saved.to_dict())
        check_checkpoint_config(run_dir, saved, force=args.force)  # config.yaml edited by hand
        check_resume_config(saved, cfg, force=args.force)
        trainer = Trainer(cfg, run_dir, resume=True, command=command_line(sys.argv), accept_changed_images=args.force)
    else:
        if not args.config:
            raise ConfigError(
                "directpred train needs a CONFIG file (e.g. configs/cpu/quickstart.yaml) or --resume RUN_DIR"
            )
        if args.force:  # --force only relaxes the resume check: it was ignored before
            raise ConfigError("--force applies only with --resume RUN_DIR (to accept config changes on resume)")
        if args.out is not None and not args.out.strip():  # an unset shell variable: not the timestamped default
            raise ConfigError("--out is empty; give the run directory (or leave --out out for runs/<config>-<time>)")
        cfg = load_config(args.config, args.set)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.out) if args.out else Path("runs") / f"{Path(args.config).stem}-{stamp}"
        trainer = Trainer(cfg, run_dir, command=command_line(sys.argv))
    # Join the process group before the lock (torchrun): a lock process 0 cannot take then stops every process with
    # its reason. Before, the others waited for it in the group's rendezvous, where no signal handler runs, until
    # torchrun's SIGKILL 30 s after its SIGTERM.
    distributed.init_from_env(resolve_device(cfg.train.device))
    try:
        with contextlib.ExitStack() as held:
            refused = None
            try:
                held.enter_context(run_dir_lock(run_dir, create=not args.resume))
            except ConfigError as exc:
                refused = str(exc)
            refused = distributed.broadcast_object(refused)  # process 0's verdict, on every process
            if refused is not None:
                raise ConfigError(refused)
            held.enter_context(stop_on_signals(trainer))
            if args.resume and cfg != saved:
                # The changed config.yaml is written only once the checkpoint has loaded into the model it
                # describes: a resume that fails (no checkpoint, a corrupt one, --force of a new shape) leaves it.
                trainer.setup()
                if distributed.is_main():
                    # summary.json describes config.yaml: a finished run resumed with changes is finished again
                    # only when this resume writes its new summary.
                    (run_dir / "summary.json").unlink(missing_ok=True)
                    atomic_write_text(cfg_file, dump_config(cfg))
            summary = trainer.fit()
    except TrainingInterrupted as exc:
        if distributed.is_main():
            print(f"\n{exc}", file=sys.stderr)
        return 128 + exc.signum if exc.signum else 1
    if distributed.is_main():
        if summary.get("already_finished"):
            train_on = (
                "it was stopped on collapse; train on with --set diag.stop_on_collapse=false"
                if summary.get("stopped_early")
                # a run train.max_steps ended trains on only when that limit grows (or goes: 0)
                else "train longer with --set train.max_steps=N (0: no limit)"
                if cfg.train.max_steps and summary.get("steps") == cfg.train.max_steps
                else "train longer with --set train.epochs=N"
            )
            print(
                f"run {run_dir} had already finished with this configuration: nothing trained, evaluated or written "
                f"({train_on}; evaluate again with `directpred eval {run_dir}` or --set eval.KEY=VALUE). Its results:"
            )
        print_results(
            summary,
            f"\nrun {run_dir}: {summary['epochs']:g} epochs, {summary['steps']} steps, "
            f"{summary['images_per_second'] or 0:.0f} images/s, "
            f"{summary['wall_seconds']:.0f} s wall",
            cfg.eval,
        )
        for line in verdict_lines(summary):
            print(line)
        print(f"  summary: {run_dir / 'summary.json'}")
    if distributed.shutdown():  # everything is written: skip the finalisation that can abort a gloo process
        distributed.exit_process(0)
    return 0


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """The end-of-run lines for a run the diagnostics flagged (none for a healthy one): the step and the rule, so
    a warning printed long before the accuracies is not missed."""
    flags = (
        ("collapsed", "collapse_step", "COLLAPSED (collapse rule)"),
        ("dim_collapsed", "dim_collapse_step", "dimensional collapse (warning)"),
    )
    return [
        f"  diagnostics:         {what} at step {summary.get(step)}; see docs/diagnostics.md"
        for flag, step, what in flags
        if summary.get(flag)
    ]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (a run directory per run)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="Pre-train with a YAML config, then report kNN and linear-probe accuracy. "
        "The run directory gets config.yaml, metrics.jsonl, TensorBoard events, "
        "checkpoints/ and summary.json.",
    )
    p.add_argument("config", nargs="?", help="YAML config (see configs/); its keys override the defaults")
    p.add_argument("--out", help="run directory (default: runs/<config name>-<timestamp>)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config key, e.g. --set predictor.rho=0.5 (repeatable; value parsed as YAML)",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from checkpoints/last.pt")
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: accept config changes that are not normally allowed on resume, and images that differ "
        "from the checkpoint's though their count, classes and size match (a corrupt file replaced)",
    )
    p.set_defaults(func=run)
