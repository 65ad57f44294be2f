"""The streamed data path on this CPU: images/s per worker against a plain torchvision pipeline, and peak memory as
the data set grows.

Measured in one run, one thread, on the same generated ImageNet-sized JPEGs (``directpred.data.proxy`` at about
375 px, 225-600 px sides):

  (a) worker decode: read + Pillow decode + resize the shorter side to 256 + centre square (what a DataLoader worker
      of ``data.stream`` does), images/s;
  (b) device-side views: BYOL's two augmented 224 views of the uint8 batch (``TwoViewAugment``, per-sample draws),
      here on the CPU (on a GPU this is not the workers' work), images/s;
  (c) lazy path serial: (a) then (b) for the same batches on one core: images/s of one core doing everything;
  (d) baseline: ``torchvision.datasets.ImageFolder`` + ``transforms.v2`` (RandomResizedCrop 224, flip, colour jitter
      0.4/0.4/0.2/0.1 p=0.8, grayscale 0.2, blur p=1.0/0.1, solarise p=0/0.2) producing both views per image in the
      worker, images/s;
  (e) peak RSS (this process and its workers) of one epoch's first batches of the streamed source over 2,000 and
      20,000 small JPEGs, each in a fresh subprocess, with 2 workers;
  (f) batched decode (the ``data.decode: cuda`` path): the batch's bytes decoded in one call by each decoder that
      imports (TorchCodec, torchvision.io), resized to 256 and centre-cropped on ``--decode-device`` (cpu:
      libjpeg-turbo in this process; cuda: nvJPEG), images/s, file reading excluded.

Usage:
    python benchmarks/stream_throughput.py --out benchmarks/results/stream_cpu.json
    python benchmarks/stream_throughput.py --decode-only --decode-device cuda   # (f) alone, on the GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from directpred.data.augment import TwoViewAugment, recipe
from directpred.data.proxy import write_proxy_folder
from directpred.data.stream import (
    JPEG_BACKENDS,
    BatchDataset,
    FolderReader,
    StreamSource,
    decode_jpeg_cuda,
    jpeg_backend,
)
from directpred.runtime import git_commit


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def measure_throughput(root: Path, n: int, batch: int = 32) -> dict[str, float]:
    """(a)-(c): batches of ``batch`` images (of ``n // 2`` when fewer than two batches: one is the warm-up)."""
    reader = FolderReader(root, "train")
    batch = min(batch, n // 2)
    src = StreamSource(reader, 256, batch_size=batch, seed=0)
    aug = TwoViewAugment(*recipe("imagenet", 224))
    batches, t_decode, t_aug = 0, 0.0, 0.0
    it = src.batches(0)
    next(it)  # warm-up
    t = time.perf_counter()
    for step, images in enumerate(it):
        t_decode += time.perf_counter() - t
        t0 = time.perf_counter()
        aug(images, torch.Generator().manual_seed(step))
        t_aug += time.perf_counter() - t0
        batches += 1
        if batches * batch >= n:
            break
        t = time.perf_counter()
    imgs = batches * batch
    out = {
        "worker_decode_images_per_s": _rate(imgs, t_decode),
        "device_views_cpu_images_per_s": _rate(imgs, t_aug),
        "lazy_serial_images_per_s": _rate(imgs, t_decode + t_aug),
        "images": imgs,
    }

    from torchvision import datasets
    from torchvision.transforms import v2

    def view(blur: float, sol: float) -> v2.Compose:
        return v2.Compose(
            [
                v2.RandomResizedCrop(224, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(0.2),
                v2.RandomApply([v2.GaussianBlur(23, (0.1, 2.0))], p=blur),
                v2.RandomSolarize(0.5, p=sol),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
            ]
        )

    v1, v2_ = view(1.0, 0.0), view(0.1, 0.2)

    def two(img):  # noqa: ANN001, ANN202 - a PIL image -> two tensors
        img = v2.functional.to_image(img)
        return v1(img), v2_(img)

    ds = datasets.ImageFolder(str(root / "train"), transform=two)
    torch.manual_seed(0)
    ds[0]
    t = time.perf_counter()
    for i in range(1, imgs + 1):
        ds[i % len(ds)]
    out["torchvision_v2_images_per_s"] = _rate(imgs, time.perf_counter() - t)
    return out


def measure_batched_decode(root: Path, n: int, device: str, batch: int = 32) -> dict[str, float]:
    """(f): images/s of :func:`decode_jpeg_cuda` per decoder that imports, on ``device``; bytes read beforehand.
    Batches of ``batch`` images, or of all ``n`` when fewer."""
    reader = FolderReader(root, "train")
    batch = min(batch, n, len(reader))
    raw, pillow = BatchDataset(reader, 256, raw=True), BatchDataset(reader, 256)
    plan = [list(range(i, i + batch)) for i in range(0, min(n, len(reader)) - batch + 1, batch)]
    blobs = [raw[b].images for b in plan]
    available = [b for b in JPEG_BACKENDS if b == "torchvision" or jpeg_backend() == b]
    out: dict[str, float] = {}
    for backend in available:

        def run(k: int) -> None:
            images = decode_jpeg_cuda(
                blobs[k], 256, device, fallback=pillow, index=torch.tensor(plan[k]), backend=backend
            )
            if images.is_cuda:
                torch.cuda.synchronize()

        run(0)  # warm-up (nvJPEG handle, kernels)
        t = time.perf_counter()
        for k in range(len(plan)):
            run(k)
        out[f"batched_decode_{backend}_{device}_images_per_s"] = _rate(len(plan) * batch, time.perf_counter() - t)
    return out


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def rss_child(root: Path, steps: int) -> dict[str, float]:
    """Runs in a fresh process: stream ``steps`` batches of 64 with 2 workers; the main process's peak RSS (VmHWM:
    its own high-water mark, reset by exec) and the workers' largest RSS sampled after every batch."""
    base = _status_kib(os.getpid(), "VmRSS")
    reader = FolderReader(root, "train")
    after_index = _status_kib(os.getpid(), "VmRSS")
    src = StreamSource(reader, 72, batch_size=64, seed=0, workers=2)
    t = time.perf_counter()
    n, worker_kib = 0, 0
    for k, images in enumerate(src.batches(0)):
        n += len(images)
        worker_kib = max([worker_kib, *(_status_kib(c, "VmRSS") for c in _children(os.getpid()))])
        if k + 1 == steps:
            break
    seconds = time.perf_counter() - t
    return {
        "images_in_set": len(reader),
        "images_streamed": n,
        "seconds": seconds,
        "rss_before_index_mib": base / 1024,
        "index_mib": (after_index - base) / 1024,
        "peak_rss_main_mib": _status_kib(os.getpid(), "VmHWM") / 1024,
        "peak_rss_worker_mib": worker_kib / 1024,
    }


def _source_digest() -> str:
    """benchmarks/source_digest.py's digest of the code (imported here, when the script runs: the module sits beside
    it, on sys.path then, and not when a test imports this file to read its options)."""
    from source_digest import source_digest

    return source_digest(Path(__file__).resolve().parents[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--images", type=int, default=320, help="ImageNet-sized JPEGs timed per path")
    p.add_argument("--rss-sizes", type=int, nargs="+", default=[2000, 20000])
    p.add_argument("--rss-steps", type=int, default=20)
    p.add_argument("--decode-device", default="cpu", help="(f)'s device: cpu or cuda")
    p.add_argument("--decode-only", action="store_true", help="measure (f) only")
    p.add_argument("--_rss-child", dest="rss_child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.images < 2:
        p.error(f"--images must be at least 2 (a warm-up batch and a timed one), got {a.images}")
    torch.set_num_threads(1)
    if a.rss_child:
        print(json.dumps(rss_child(Path(a.rss_child), a.rss_steps)))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="stream_bench_"))
    try:
        t = time.perf_counter()
        big = write_proxy_folder(tmp / "big", train=a.images, val=0, classes=10, size=375)
        files = list((big / "train").rglob("*.JPEG"))
        mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1024
        results: dict = {
            "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
            "commit": git_commit(),  # can be stale in a device machine's copy: the digest names the code
            "source_digest": _source_digest(),
            "images": a.images,
            "machine": {
                "cpus": os.cpu_count(),
                "load_avg_1min_before": os.getloadavg()[0],
                "python": platform.python_version(),
                "torch": torch.__version__,
                "threads": 1,
            },
            "jpeg_mean_kib": mean_kb,
            "generate_seconds": time.perf_counter() - t,
        }
        results["batched_decode"] = measure_batched_decode(big, a.images, a.decode_device)
        if not a.decode_only:
            results["throughput"] = measure_throughput(big, a.images)
        results["rss"] = []
        for n in [] if a.decode_only else a.rss_sizes:
            root = write_proxy_folder(tmp / f"small{n}", train=n, val=0, classes=100, size=48, quality=80)
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            proc = subprocess.run(
                [sys.executable, __file__, "--_rss-child", str(root), "--rss-steps", str(a.rss_steps)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            results["rss"].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            shutil.rmtree(root)
        results["machine"]["load_avg_1min_after"] = os.getloadavg()[0]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(results, indent=2)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    code = main()
    gc.freeze()  # skip the exit's collection over torch's import-time objects (1-2 s; see directpred/__main__.py)
    raise SystemExit(code)
