"""Shared fixtures: small synthetic image datasets in the ImageFolder layout, and a tiny run config."""

from __future__ import annotations

import contextlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MIRROR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"

# Tiny test networks gain nothing from a second thread, and a single thread is immune to OpenMP spin-waiting
# when other processes share the two cores (the pytest-xdist workers among them). torch.compile's test: one compile
# worker, not one per CPU beside the other workers.
torch.set_num_threads(1)
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


@pytest.fixture(autouse=True)
def _same_start_whatever_ran_before() -> Iterator[None]:
    """Every test starts from the same process state, whatever ran before it in this process: pytest-xdist workers
    run different subsets of the tests in different orders. The global RNGs (Python, NumPy, torch) are seeded, and
    the ``directpred`` logger's handlers and level are put back afterwards (a CLI ``main()`` call adds a stderr
    handler, which would show a later test's library warnings on its captured stderr). Each test runs in the
    repository root (the README's commands, and many tests, name ``configs/...`` relative to it), wherever pytest was
    started from (``pytest /path/to/directpred/tests``)."""
    import logging
    import random

    logger = logging.getLogger("directpred")
    handlers, level = list(logger.handlers), logger.level
    cwd = os.getcwd()
    os.chdir(REPO)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
    os.chdir(cwd)
    logger.handlers[:] = handlers
    logger.setLevel(level)


def _cgroup_limits() -> tuple[float | None, int | None]:
    """This process's cgroup CPU quota (in CPUs) and memory limit (bytes), the tightest over its cgroup and the
    cgroup's ancestors, in cgroup v2 (``cpu.max``, ``memory.max``) or v1 (``cpu.cfs_quota_us`` / ``cfs_period_us``,
    ``memory.limit_in_bytes``); None where there is none or it cannot be read."""
    cpus: list[float] = []
    memory: list[int] = []

    def read(path: Path) -> str | None:
        try:
            return path.read_text().strip()
        except OSError:
            return None

    try:
        entries = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    except OSError:
        entries = []
    for _, controllers, path in (e for e in entries if len(e) == 3):
        rel = Path(path.lstrip("/"))
        v1 = controllers.split(",") if controllers else []
        roots = [Path("/sys/fs/cgroup")] if not v1 else [Path("/sys/fs/cgroup") / c for c in (controllers, *v1)]
        for root in roots:
            for d in {root / part for part in [rel, *rel.parents]}:  # the cgroup, its ancestors, the mount root
                if not v1:
                    quota = (read(d / "cpu.max") or "max").split()
                    if quota[0] != "max" and len(quota) == 2 and int(quota[1]) > 0:
                        cpus.append(int(quota[0]) / int(quota[1]))
                    limit = read(d / "memory.max")
                    if limit and limit.isdigit():
                        memory.append(int(limit))
                if "cpu" in v1:
                    quota_us, period_us = read(d / "cpu.cfs_quota_us"), read(d / "cpu.cfs_period_us")
                    if quota_us and period_us and int(quota_us) > 0 and int(period_us) > 0:
                        cpus.append(int(quota_us) / int(period_us))
                if "memory" in v1:
                    limit = read(d / "memory.limit_in_bytes")
                    if limit and limit.isdigit():
                        memory.append(int(limit))  # "no limit" reads as a huge number: the RAM cap below wins
    return (min(cpus) if cpus else None), (min(memory) if memory else None)


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: without it (-p no:xdist), pytest must not refuse it
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto`` (the README's test command): one pytest-xdist worker per CPU this process may run on.

    pytest-xdist's own count is psutil's *physical* cores where psutil is installed (1 on a 2-vCPU machine with
    hyper-threads, which would run the suite serially) or the host's CPUs in a container whose cgroup quota allows
    fewer. Here: the CPUs in this process's affinity mask, capped by its cgroup's CPU quota (v1 or v2, rounded up)
    and by memory (the RAM, or the cgroup's limit if lower) at one worker per 3 GiB: a worker starts subprocesses
    (the CLI tests' runs, the DDP tests' two processes). ``PYTEST_XDIST_AUTO_NUM_WORKERS=N`` overrides, as in
    pytest-xdist.
    """
    import math
    import warnings

    given = os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS", "").strip()
    if given:
        if given.isdigit():
            return int(given)
        warnings.warn(f"PYTEST_XDIST_AUTO_NUM_WORKERS={given!r} is not a number >= 0; ignoring it", stacklevel=1)
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, limit = _cgroup_limits()
    except (OSError, ValueError):  # an unexpected cgroup file: go by the CPUs and the RAM
        quota, limit = None, None
    if quota is not None:
        n = min(n, max(1, math.ceil(quota)))
    memory = [limit] if limit is not None else []
    with contextlib.suppress(OSError, ValueError, AttributeError):
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if ram > 0:
            memory.append(ram)
    if memory:
        n = min(n, max(1, min(memory) // (3 << 30)))
    return max(1, n)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (each tens of seconds: whole runs in subprocesses) run first, in their collected order,
    the rest after them as collected. Under pytest-xdist the short tests then fill the workers' time around the long
    ones; collected alphabetically, a 90-s test could start last and leave the other worker idle that long. Tests
    that share a module-scoped fixture are not marked, so none is set up twice."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # a stable sort: the order is otherwise kept


def pytest_unconfigure(config: pytest.Config) -> None:
    """The tests are over: the interpreter's exit need not walk torch's import-time objects (1-2 s on 2 cores)."""
    import gc

    gc.freeze()


@contextlib.contextmanager
def gloo_process(rank: int, world_size: int, store: str) -> Iterator[None]:
    """One process of a gloo group that ``torch.multiprocessing.spawn`` started, around the body of its work.

    On success the processes leave the group together and end as the CLI ends them
    (:func:`directpred.distributed.shutdown`, then :func:`~directpred.distributed.exit_process`): without the
    interpreter's finalisation, which aborts a gloo process now and then (SIGABRT) when a group is still referenced,
    e.g. by a DistributedDataParallel module in a reference cycle, whose threads then race the exit. An exception
    propagates, for ``spawn`` to report with its traceback.
    """
    import torch.distributed as dist

    from directpred import distributed

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    yield
    distributed.shutdown()
    distributed.exit_process(0)


def synthetic_images(n_per_class: int, n_classes: int = 4, size: int = 32, seed: int = 0):
    """Class-dependent coloured blobs on noise: learnable, so kNN beats chance quickly."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    yy, xx = np.mgrid[0:size, 0:size]
    for c in range(n_classes):
        colour = np.array([(c * 67) % 256, (c * 151 + 40) % 256, (c * 29 + 90) % 256])
        for _ in range(n_per_class):
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            r = size // 4 + (c % 3)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img = rng.integers(0, 80, (size, size, 3))
            img[mask] = np.clip(colour + rng.integers(-20, 20, 3), 0, 255)
            images.append(img.astype(np.uint8))
            labels.append(c)
    return images, labels


def write_folder(
    root: Path, n_train: int = 16, n_test: int = 4, n_classes: int = 4, size: int = 32, fmt: str = "png"
) -> Path:
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = synthetic_images(n, n_classes, size, seed)
        for i, (img, y) in enumerate(zip(images, labels)):
            d = root / split / f"class{y}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(d / f"{i:04d}.{fmt}")
    return root


def write_tar(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        for p in sorted(folder.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(folder)), recursive=False)
    return archive


def write_mixed_folder(root: Path, n_per_class: int = 7, classes: int = 3, seed: int = 0) -> Path:
    """JPEGs of varied sizes and aspect ratios, a grayscale and a CMYK JPEG, a PNG, in train/ and test/."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_per_class), ("test", 3)):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                arr[: h // 2] //= c + 1  # class-dependent content
                im = Image.fromarray(arr)
                kind = i % 5
                if kind == 1:
                    im.convert("L").save(d / f"{i:03d}.JPEG", quality=90)
                elif kind == 2:
                    im.convert("CMYK").save(d / f"{i:03d}.JPEG", quality=90)
                elif kind == 3:
                    im.save(d / f"{i:03d}.png")
                else:
                    im.save(d / f"{i:03d}.JPEG", quality=90)
    return root


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """4 classes x (32 train, 8 test) images of 32x32 in the ImageFolder layout."""
    return write_folder(tmp_path_factory.mktemp("tiny") / "data", n_train=32, n_test=8)


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory, tiny_folder) -> Path:
    return write_tar(tiny_folder, tmp_path_factory.mktemp("tar") / "tiny.tar.gz")


def tiny_override_list(folder: Path, cache_dir: Path) -> list[str]:
    """The ``--set`` overrides of :func:`tiny_overrides` for data in ``folder``, decoded into ``cache_dir`` (for
    fixtures wider than one test, which cannot take the function-scoped fixture)."""
    return [
        "data.dataset=folder",
        f"data.path={folder}",
        f"data.cache_dir={cache_dir}",
        "data.image_size=0",
        "data.train_subset=0",
        "data.test_subset=0",
        "backbone.width=4",
        "projector.hidden_dim=32",
        "projector.out_dim=16",
        "train.batch_size=16",
        "train.progress=false",
        "train.log_every=1",
        "train.device=cpu",
        "train.precision=fp32",
        "eval.knn_every=0",
        "eval.linear=false",
        "eval.knn_k=10",
        "diag.every=0",
    ]


@pytest.fixture
def tiny_overrides(tiny_folder, tmp_path) -> list[str]:
    """``--set`` overrides that make any config run a few steps in seconds on the CPU."""
    return tiny_override_list(tiny_folder, tmp_path / "cache")


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()
