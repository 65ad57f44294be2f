"""The ``directpred`` command line (also ``python -m directpred``).

Subcommands: ``train`` (a run directory per run; YAML config + ``--set key=value`` overrides; ``--resume``),
``eval`` (kNN + linear probe of a run's checkpoint), ``export`` and ``embed`` (the trained backbone and its
features), ``sweep`` (configs x seeds, each a ``train`` subprocess, into one table), ``theory`` (the paper's learning
dynamics), and the diagnostics commands ``plot`` and ``diagnose``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings

from directpred.config import ConfigError, install_hint

EPILOG = """examples:
  directpred train configs/cpu/quickstart.yaml --out runs/qs
  directpred train configs/cpu/quickstart.yaml --set predictor.name=linear --set train.epochs=3
  directpred train --resume runs/qs
  directpred eval runs/qs
  directpred export runs/qs --out backbone.pt
  directpred embed runs/qs --data my_images/ --out features.npy
  directpred sweep sweeps/cpu/cifar10_predictors.yaml --out runs/sweep_cpu
  torchrun --standalone --nproc_per_node=2 -m directpred train configs/cpu/quickstart.yaml --out runs/ddp
"""


# Packages of the optional extras (pyproject.toml) -> the extra that installs them.
OPTIONAL_PACKAGES = {"matplotlib": "plot", "onnx": "onnx", "onnxscript": "onnx", "torchcodec": "torchcodec"}


class _StderrHandler(logging.Handler):
    """Writes records to the current ``sys.stderr``, above the progress bar when one is shown (``tqdm.write``)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _Formatter(logging.Formatter):
    """The message alone; warnings and errors prefixed with their level (``WARNING: ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        msg = super().format(record)
        return msg if record.levelno < logging.WARNING else f"{record.levelname}: {msg}"


# Commands that take part in a torchrun process group; the others would do the same work in every process.
DISTRIBUTED_COMMANDS = ("train", "eval")


def launcher_rank() -> int:
    """This process's rank as torchrun (or a Slurm-style launcher setting ``RANK``) gives it, known before the
    process group is joined; 0 outside a launcher."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def launcher_world_size() -> int:
    """The number of processes torchrun started (``WORLD_SIZE``); 1 outside a launcher."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


class _OtherProcessFilter(logging.Filter):
    """On a process other than 0 of a launcher's group: drops what process 0 shows as well (the library's log
    messages below ERROR and the Python warnings other than RuntimeWarning: a config value without effect, a data
    set's ignored files, ...), so that N processes do not print every line N times; keeps, prefixed with the
    process, the RuntimeWarnings that can be this process's own (a corrupt image of its shard replaced, a step
    skipped for its non-finite loss)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        category = getattr(record, "category", None)
        if category is None or not issubclass(category, RuntimeWarning):
            return False
        record.msg = f"process {self.rank}: {record.msg}"
        return True


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` for the command line: the warning as a log record (``WARNING: Category: message``,
    above the progress bar) instead of Python's two-line ``file:line:`` form."""
    logging.getLogger("directpred.warnings").warning("%s: %s", category.__name__, message, extra={"category": category})


def configure_logging(verbosity: int = 0, rank: int = 0) -> None:
    """Show the package's log messages (loggers ``directpred.*``) on stderr: INFO and above, WARNING and above with
    ``verbosity < 0`` (``--quiet``), DEBUG with ``verbosity > 0`` (``-v``). Idempotent (one handler however often it
    is called); records still propagate to the root logger's handlers, so a program that configures logging itself
    should not call this. Python warnings (``warnings.warn``) are shown through the same handler. A process of
    ``rank`` > 0 in a torchrun group shows only what can be its own (errors; RuntimeWarnings, prefixed with its
    rank), unless ``verbosity > 0``."""
    logger = logging.getLogger("directpred")
    for h in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(h)
    handler = _StderrHandler()
    handler.setFormatter(_Formatter("%(message)s"))
    if rank > 0 and verbosity <= 0:
        handler.addFilter(_OtherProcessFilter(rank))
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    warnings.showwarning = _show_warning  # Python warnings (skipped steps, corrupt images, ...) shown the same way


def build_parser() -> argparse.ArgumentParser:
    """The ``directpred`` parser: every subcommand module's ``register``."""
    from directpred.cli import diagnose, embed, export, plot, shards, sweep, theory, train
    from directpred.cli import eval as eval_

    parser = argparse.ArgumentParser(
        prog="directpred",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description="BYOL/SimSiam with DirectPred (Tian, Chen, Ganguli, ICML 2021): train, evaluate, diagnose, "
        "and simulate the paper's learning dynamics.",
    )
    verbosity = parser.add_mutually_exclusive_group()
    verbosity.add_argument(
        "-q", "--quiet", action="store_true", help="show only warnings and errors of the library (before the COMMAND)"
    )
    verbosity.add_argument("-v", "--verbose", action="store_true", help="also show debug messages (before the COMMAND)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, eval_, export, embed, shards, sweep, theory, plot, diagnose):
        module.register(sub)
    return parser


def worker_message(exc: BaseException) -> str:
    """The message of ``exc``; for one a DataLoader worker raised, which the main process re-raises as "Caught
    DataError in DataLoader worker process 0. Original Traceback ...", the worker's own message only."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if "Original Traceback (most recent call last):" in text and marker in text:
        where = text.split(".", 1)[0].removeprefix(f"Caught {type(exc).__name__} ")  # "in DataLoader worker process 0"
        return f"{text.rsplit(marker, 1)[1].strip()} ({where})"
    return text


# Path options (and positional paths) of the subcommands: an empty one (`--out "$DIR"` with DIR unset) is refused.
PATH_OPTIONS = ("out", "resume", "json", "checkpoint", "torchscript", "onnx", "data")
POSITIONAL_PATHS = ("run_dir", "config", "folder", "target", "source", "file")


def _refuse_empty_paths(args: argparse.Namespace) -> None:
    """Raise :class:`ConfigError` for a path given as an empty string: ``--resume ""`` trained a new run, ``--out ""``
    wrote into the current directory (or fell back to a default), unseen. ``train --out`` says more itself."""
    for name in PATH_OPTIONS + POSITIONAL_PATHS:
        value = getattr(args, name, None)
        if not isinstance(value, str) or value.strip() or (args.command, name) == ("train", "out"):
            continue
        option = name.upper() if name in POSITIONAL_PATHS else f"--{name}"
        raise ConfigError(f"{option} is empty (an unset shell variable?); give the path, or leave {option} out")


def relayed_line(rank: int, what: str) -> str:
    """The one line a process other than 0 prints when it stops because process 0 could not do ``what``."""
    return f"directpred: process {rank} stops too: process 0 could not {what} (process 0 prints why)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``directpred`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rank = launcher_rank()
    configure_logging(-1 if args.quiet else 1 if args.verbose else 0, rank)
    if launcher_world_size() > 1 and args.command not in DISTRIBUTED_COMMANDS:
        if rank == 0:  # every process reads the same command line: one message
            print(
                f"directpred: config error: `directpred {args.command}` does not run under torchrun (it would do "
                f"the same work in each of the {launcher_world_size()} processes): run it as a single process, "
                f"without torchrun (only {' and '.join(DISTRIBUTED_COMMANDS)} use several processes)",
                file=sys.stderr,
            )
        return 2
    try:
        _refuse_empty_paths(args)
        return int(args.func(args) or 0)
    except BrokenPipeError:  # stdout piped into `head` or the like, which closed it: nothing left to say, as cat does
        import os

        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, a shell's code for a command ended by a closed pipe
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops training after a step), or any command's first
        print(
            f"\ndirectpred {args.command}: interrupted; what it was doing is lost (a training run resumes from its "
            "last checkpoint: directpred train --resume RUN_DIR)",
            file=sys.stderr,
        )
        return 130
    except ConfigError as exc:
        from directpred.distributed import relayed_failure

        if rank > 0 and (what := relayed_failure(exc)):  # process 0 printed the error itself
            print(relayed_line(rank, what), file=sys.stderr)
            return 2
        print(f"directpred: config error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in OPTIONAL_PACKAGES:
            extra = OPTIONAL_PACKAGES[exc.name.split(".")[0]]
            print(
                f"directpred: error: `directpred {args.command}` needs {exc.name.split('.')[0]}, which is not "
                f"installed: {install_hint(extra)}",
                file=sys.stderr,
            )
            return 1
        raise
    except Exception as exc:
        import urllib.error

        from directpred.data.datasets import DataError, DownloadError
        from directpred.distributed import peer_failure, relayed_failure
        from directpred.train.checkpoint import CheckpointError, file_in_the_way
        from directpred.train.faults import TrainingError

        # numpy's and the CPU's allocation failures (MemoryError; a simulation's n1 = n2 = 100000, say) and CUDA's
        # (torch.OutOfMemoryError, a RuntimeError)
        if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
            print(
                f"directpred: error: out of memory in `directpred {args.command}` ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); use smaller sizes (a smaller batch, data subset "
                "or simulated n), or a machine with more memory",
                file=sys.stderr,
            )
            return 1
        if isinstance(exc, (DownloadError, urllib.error.URLError)):  # a network failure, never a disk problem
            print(f"directpred: network error: {exc}", file=sys.stderr)
            return 1
        if rank > 0 and (what := relayed_failure(exc)):  # process 0 printed the error itself
            print(relayed_line(rank, what), file=sys.stderr)
            return 1
        if launcher_world_size() > 1 and peer_failure(exc):  # another process failed or was stopped first
            print(
                f"directpred: process {rank} stops too: another process of the group failed or was stopped (it "
                f"prints why) [{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}]",
                file=sys.stderr,
            )
            return 1
        if isinstance(exc, (DataError, CheckpointError, TrainingError, FloatingPointError)):
            print(f"directpred: error: {worker_message(exc)}", file=sys.stderr)
            return 1
        # an --out inside a file: "File exists (afile)" named neither the file nor the fix
        if isinstance(exc, (FileExistsError, NotADirectoryError)) and (in_the_way := file_in_the_way(exc)):
            inside = f" ({exc.filename} would be inside it)" if str(in_the_way) != str(exc.filename) else ""
            print(
                f"directpred {args.command}: error: {in_the_way} is a file, not a directory{inside}: give another "
                "path (a directory, or one to create), or move the file away, and run the command again",
                file=sys.stderr,
            )
            return 1
        if isinstance(exc, OSError) and args.command == "train":  # a full disk while logging: checkpoints are atomic
            print(
                f"directpred: error: {exc.strerror or exc} ({exc.filename or 'output'}); the last checkpoint, "
                "if the run has one, is intact: free space or fix permissions, then resume with `directpred train "
                "--resume RUN_DIR` (before the first checkpoint: run the same command again)",
                file=sys.stderr,
            )
            return 1
        if isinstance(exc, OSError):  # another command's input or output path (an --out that is a directory, ...)
            print(
                f"directpred {args.command}: error: {exc.strerror or exc} ({exc.filename or 'output'}): give "
                "another path there, or fix its permissions or free space, and run the command again",
                file=sys.stderr,
            )
            return 1
        raise
