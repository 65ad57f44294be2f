"""The ground floor for multi-process training: rank, world size, all-reduce and gather.

One code path serves 1 and N processes. ``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``; without them every
helper here is the identity, so heads and evaluation call them unconditionally.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0 writes logs, checkpoints and summaries."""
    return rank() == 0


def init_from_env(device: torch.device) -> bool:
    """Join the process group described by torchrun's environment; gloo on CPU, NCCL on CUDA.

    Returns True if a multi-process group was initialised.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():
        return True
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    return True


def die_with_launcher() -> bool:
    """Under ``torchrun`` on Linux, have this worker killed (SIGKILL) when the launcher that started it dies.

    torchrun starts each worker in a session of its own, so a launcher killed outright (SIGKILL, the OOM killer, a
    ``directpred sweep`` killed with its runs) left its workers running on as orphans, holding their GPU and the run
    directory's lock, and a rerun raced them. A launcher that stops normally (SIGINT/SIGTERM) forwards the signal and
    waits for its workers, which checkpoint and stop as ever: this changes nothing there. Returns whether the request
    was made (not under torchrun, or not on Linux: False)."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    from directpred._startup import PARENT_PID as launcher  # noted before the imports of torch & co.

    if prctl(1, signal.SIGKILL) != 0:  # 1 = PR_SET_PDEATHSIG
        return False
    if os.getppid() != launcher:  # it died before the request could take effect: as it would have had us do
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def shutdown() -> bool:
    """Leave the process group, if any: all processes together (a barrier first), since a gloo process whose peer
    has already torn its connections down can abort at exit ("terminate called without an active exception").
    Returns whether there was a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        return True
    return False


def exit_process(code: int) -> NoReturn:
    """End this process with ``code`` now: Python's exit handlers run (logging, trackers), the interpreter's
    finalisation does not. After a gloo process group, that finalisation can still abort the process (SIGABRT,
    "terminate called without an active exception") when the run has finished and written everything: seen with
    the AVX2 code path in about 1 of 20 two-process runs even after :func:`shutdown`."""
    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    os._exit(code)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it (identity in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum of ``tensor`` over all processes, in place, returned (identity in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over all processes in place and return it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (N_r, ...) from every rank along dim 0, in rank order; sizes may differ by rank."""
    if not is_distributed():
        return tensor
    n = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    max_n = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((max_n, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.zeros_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def interleave_strided(blocks: torch.Tensor, world: int) -> torch.Tensor:
    """The N rows of a split sharded by stride (rank r held rows ``r, r + world, ...``) and concatenated in rank
    order, as :func:`gather_cat` returns them, put back in the split's order 0..N-1.

    >>> interleave_strided(torch.tensor([0, 2, 4, 1, 3]), world=2).tolist()
    [0, 1, 2, 3, 4]
    """
    out = torch.empty_like(blocks)
    start = 0
    for r in range(world):
        size = len(range(r, len(blocks), world))
        out[r::world] = blocks[start : start + size]
        start += size
    return out


def gather_strided(tensor: torch.Tensor) -> torch.Tensor:
    """All N rows of a split of which this rank holds rows ``rank, rank + world, ...`` (``tensor``), in the split's
    order on every rank, so that what follows (a seeded shuffle, a probe) does not depend on the number of
    processes. The identity in one process."""
    if not is_distributed():
        return tensor
    return interleave_strided(gather_cat(tensor), world_size())


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (e.g. BatchNorm running statistics, which DDP only syncs at the start of
    a forward pass, so after the last training step each rank holds statistics of its own batch)."""
    if is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf.data, src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``src``'s picklable ``obj`` on every process (a collective; the identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(work: Callable[[], T], what: str, error_type: type[Exception]) -> T | None:
    """Run ``work`` on process 0 alone; every process then learns its outcome and stops together if it failed:
    process 0 raises its own error, the others ``error_type`` naming ``what`` process 0 could not do. A collective
    that waits as a barrier would, so no process is left in a barrier (30 minutes) for a peer that has failed. Every
    process calls it; returns ``work``'s result on process 0, None on the others (in a single process: ``work()``).
    """
    result, error = None, None
    if is_main():
        try:
            result = work()
        except Exception as exc:  # raised below, once the other processes know
            error = exc
    failed = broadcast_object(None if error is None else f"{error}")
    if error is not None:
        raise error
    if failed is not None:
        relayed = error_type(f"process 0 could not {what}, so this process stops too: {failed}")
        relayed.relayed_what = what  # type: ignore[attr-defined]  # the command line prints one line for it
        raise relayed
    return result


def relayed_failure(exc: BaseException) -> str | None:
    """What process 0 could not do, when ``exc`` is the error :func:`on_main` raised in another process to stop it
    with process 0 (whose own error says why); None for any other error."""
    what = getattr(exc, "relayed_what", None)
    return what if isinstance(what, str) else None


# How a collective fails in a process whose peer has died or stopped (gloo; NCCL reports a DistBackendError).
PEER_FAILURE_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's failure because another process of the group has gone (it failed, or was
    stopped): not this process's own problem, which the other process's output gives."""
    backend_error = getattr(dist, "DistBackendError", ())
    return (backend_error != () and isinstance(exc, backend_error)) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in PEER_FAILURE_MESSAGES)
    )


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()
