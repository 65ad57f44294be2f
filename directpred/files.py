"""File-system helpers below every other layer: durable folder entries (:func:`fsync_dir`) and the lock on a run
directory (``flock`` on the directory itself: :func:`run_dir_lock`), so that two processes never write one run.

Torch-free, for the data cache, the checkpoints, the sweep runner and ``directpred train``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from directpred.config import ConfigError

logger = logging.getLogger(__name__)

# The descriptors of the run-directory locks this process holds. A forked child (a DataLoader worker) shares their
# open file description, so it would hold the lock as long as it lives, after this process ends or releases it (a
# resume right after a kill was refused); the child closes its copies at once.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def fsync_dir(path: Path) -> None:
    """fsync a folder, making the names created or renamed in it durable (where the system allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _flock(fd: int, run_dir: Path) -> bool:
    """Take the exclusive lock on ``fd`` (``run_dir`` opened): False when another process holds it. A file system
    without flock (NFS, Lustre without ``-o flock``) is no other process: True, noted in the debug log."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        logger.debug("%s: cannot lock the run directory (%s); going on without the lock", run_dir, exc)
    return True


def _busy_message(run_dir: Path) -> str:
    return (
        f"{run_dir} is being written by another directpred process (a run or a resume of it); wait for it to end or "
        "stop it, or give another --out"
    )


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, *, create: bool) -> Iterator[None]:
    """Hold an exclusive lock (``flock``) on ``run_dir`` while this command writes it: a second ``directpred train``
    into it, or ``--resume`` of it, started while the first still runs, is refused instead of both appending to
    ``metrics.jsonl`` and writing ``last.pt``. Process 0 of a torchrun job holds it (the others write nothing there);
    ``create`` makes a new run's directory first (removed again if the command ends with it empty). The lock goes
    with the process, however it ends. Where the file system cannot lock a directory (NFS, Lustre without
    ``-o flock``) the command goes on unlocked, with a note in the debug log (``directpred -v``).

    Raises:
        ConfigError: another process holds the lock.
    """
    fd, made = None, False
    if int(os.environ.get("RANK", "0")) == 0:
        try:
            if create and not run_dir.exists():
                run_dir.mkdir(parents=True)
                made = True
            fd = os.open(run_dir, os.O_RDONLY)
        except OSError:  # not a directory, or not there to resume: the run directory's own checks say so
            fd = None
    try:
        if fd is not None:
            if not _flock(fd, run_dir):
                raise ConfigError(_busy_message(run_dir))
            _HELD.add(fd)
        yield
    finally:
        if fd is not None:
            _HELD.discard(fd)
            os.close(fd)
        if made:  # a run refused before it wrote anything (a bad device, say) leaves no empty directory behind
            with contextlib.suppress(OSError):
                run_dir.rmdir()


def run_dir_busy(run_dir: Path) -> str | None:
    """Why ``run_dir`` must not be touched now (another process holds its lock: :func:`run_dir_lock`), or None. The
    sweep asks before it clears a run directory for its child."""
    try:
        fd = os.open(run_dir, os.O_RDONLY)
    except OSError:
        return None
    try:
        return None if _flock(fd, run_dir) else _busy_message(run_dir)
    finally:
        os.close(fd)  # closing releases a lock taken here
