"""Where a run executes: the device, the autocast precision, the source commit, CPU features.

Pure look-ups of the process's environment, shared by training, evaluation and the command line.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from directpred.config import ConfigError


def resolve_device(name: str, *, option: str = "train.device") -> torch.device:
    """``auto`` picks CUDA (this process's ``LOCAL_RANK`` GPU under torchrun) when available, else the CPU.

    Errors name ``option`` (``train.device``, or a command's flag such as ``--device``) with the value as the user
    wrote it (``'cuda'``, not the ``cuda:0`` it stands for) and the fix.

    Raises:
        ConfigError: a CUDA device on a machine without CUDA, or a GPU index the machine lacks.
    """
    given = name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":  # an explicit index: torch.cuda.set_device refuses a bare "cuda"
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    device = torch.device(name)
    flag = option.startswith("--")
    shown = f"{option} {given!r}" if flag else f"{option}={given!r}"
    if device.type == "cuda" and not torch.cuda.is_available():
        fix = f"{option} cpu" if flag else f"--set {option}=cpu"
        raise ConfigError(f"{shown} but CUDA is not available here: {cuda_unavailable_reason()}; use {fix} or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        means = "" if name == given else f" ({name}, this process's LOCAL_RANK)"
        raise ConfigError(
            f"{shown}{means} but this machine has {torch.cuda.device_count()} GPU(s) (cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}); use one of them, or auto"
        )
    return device


def cuda_unavailable_reason() -> str:
    """Why ``torch.cuda.is_available()`` is False, in words: a CPU-only PyTorch build, or no GPU visible."""
    if torch.version.cuda is None:
        return f"this PyTorch build ({torch.__version__}) has no CUDA support"
    return "no CUDA GPU is visible (driver, CUDA_VISIBLE_DEVICES)"


def check_gpu_indices(indices: list[int], option: str) -> None:
    """Refuse GPU indices (``--devices 0,1``) this process does not see: the runs would fall back to the CPU (or fail
    one by one) instead. The indices count the GPUs this process sees, as torch numbers them: under
    ``CUDA_VISIBLE_DEVICES``, its entries (``4,5,6,7`` makes them 0 to 3).

    Raises:
        ConfigError: naming ``option``, the indices, and the fix.
    """
    shown = f"{option} {','.join(map(str, indices))}"
    if indices and not torch.cuda.is_available():
        raise ConfigError(
            f"{shown} but CUDA is not available here: {cuda_unavailable_reason()}; use {option} cpu or auto"
        )
    count = torch.cuda.device_count() if indices else 0
    beyond = [i for i in indices if i >= count]
    if beyond:
        mask = os.environ.get("CUDA_VISIBLE_DEVICES")
        if mask is not None:  # physical ids given where the mask's positions are meant (a Slurm job's 4,5,6,7)
            raise ConfigError(
                f"{shown} but this process sees {count} GPU(s) (CUDA_VISIBLE_DEVICES={mask}); {option} counts the "
                f"GPUs this process sees (under CUDA_VISIBLE_DEVICES, its entries): use indices 0 to {count - 1}, "
                "or auto"
            )
        raise ConfigError(
            f"{shown} but this machine has {count} GPU(s) (0 to {count - 1}); use indices among them, or auto"
        )


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (where oneDNN's bf16 convolutions beat fp32).

    Measured (benchmarks/README.md): with AMX, bf16 autocast made the DirectPred step of ResNet-18 1.6x faster at
    width 16 and 2.6x at full width; with AVX512-BF16 alone it was slower than fp32 (width 16), so ``auto`` keeps
    fp32 there. An ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) below AMX, e.g. ``AVX2``, keeps oneDNN off the
    tiles, so this is False under it whatever the CPU has.
    """
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if cap != "ALL" and "AMX" not in cap:
        return False
    try:
        return bool(torch._C._cpu._init_amx())
    except (AttributeError, RuntimeError):
        return False


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows (often only ``x86_64``)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware(device: torch.device) -> dict[str, Any]:
    """What a run's speed depends on, for its ``summary.json`` and the benchmarks: the CPU model, the vector code
    path ATen dispatches to (``AVX2`` where ``ATEN_CPU_CAPABILITY=avx2`` forces it), AMX tiles, the CPU count and
    the intra-op threads, and the GPU's name on CUDA."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": cpu_has_amx(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def hardware_text(hw: dict[str, Any]) -> str:
    """One line for a :func:`describe_hardware` record: ``CPU (code path, AMX), T of N CPU threads``, or the GPU
    first."""
    cpu = f"{hw.get('cpu')} ({hw.get('cpu_capability')}{', AMX' if hw.get('amx') else ', no AMX'})"
    threads = f"{hw.get('threads')} of {hw.get('cpus')} CPU threads"
    return f"{hw['gpu']}, {cpu}" if hw.get("gpu") else f"{cpu}, {threads}"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.precision`` (None = fp32). ``auto``: bf16 on CUDA GPUs that support it (else fp16)
    and on CPUs with AMX; fp32 elsewhere."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_amx() else None


def git_commit() -> str:
    """The commit of the source tree this package runs from (``+dirty`` if it has changes), or ``unknown``."""
    here = Path(__file__).resolve().parent  # the package directory
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
