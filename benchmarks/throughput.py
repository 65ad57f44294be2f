"""Throughput benchmark: the training step against its limit, the data pipeline, and DirectPred's eigh cost.

Everything is measured in one process on one machine and network, so the ratios are meaningful on a noisy machine:

  (a) limit:    bare forward + backward of backbone + projector over both views, plus the target's forward;
  (b) step:     the full training step (predictor update, loss, backward, optimiser, EMA) for each predictor;
  (c) pipeline: batch gathering + both augmented views alone;
  (d) DirectPred's update (F^ + eigh + W_p) at the projector's d, and eigh alone for d = 128 ... 4096.

Usage:
    python benchmarks/throughput.py --config configs/cpu/quickstart.yaml --out benchmarks/results/cpu.json
    python benchmarks/throughput.py --config configs/cifar10/byol_directpred.yaml --set data.dataset=folder \
        --set data.path=../shared/data/cifar10-jpeg.tar.gz --set train.precision=bf16 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from directpred.config import load_config
from directpred.data.datasets import DataBundle, ImageArrays, load_data
from directpred.data.order import epoch_order
from directpred.heads.correlation import symmetric_eigh
from directpred.runtime import describe_hardware, git_commit
from directpred.train.loop import Trainer

PREDICTORS = [
    ("mlp", ["predictor.name=mlp"]),
    ("linear", ["predictor.name=linear"]),
    ("directpred_freq1", ["predictor.name=directpred", "predictor.freq=1"]),
    ("directpred_freq5", ["predictor.name=directpred", "predictor.freq=5"]),
    ("directcopy", ["predictor.name=directcopy"]),
]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved(f, g, device: torch.device, steps: int, warmup: int, rounds: int = 3) -> tuple[float, float]:
    """Medians of ``f`` and ``g`` timed in alternating rounds."""
    tf, tg = [], []
    for _ in range(rounds):
        tf.append(timed(f, device, max(1, steps // rounds), warmup))
        tg.append(timed(g, device, max(1, steps // rounds), warmup))
    return statistics.median(tf), statistics.median(tg)


def synthetic_data(n: int = 4096, size: int = 32) -> DataBundle:
    g = torch.Generator().manual_seed(0)
    arr = ImageArrays(
        torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g),
        torch.randint(0, 10, (n,), generator=g),
        [str(i) for i in range(10)],
    )
    return DataBundle(arr, arr, arr, "synthetic")


def _source_digest() -> str:
    """benchmarks/source_digest.py's digest of the code (imported here, when the script runs: the module sits beside
    it, on sys.path then, and not when a test imports this file to read its options)."""
    from source_digest import source_digest

    return source_digest(Path(__file__).resolve().parents[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/cpu/quickstart.yaml", help="training config to benchmark")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--steps", type=int, default=9, help="timed calls per measurement (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed calls first")
    ap.add_argument("--synthetic", action="store_true", help="random images instead of the config's data")
    ap.add_argument("--eigh-dims", default="128,256,512,1024,2048,4096", help="dimensions for the eigh sweep")
    ap.add_argument("--predictors", default=",".join(n for n, _ in PREDICTORS), help="which step variants")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    base = load_config(
        args.config,
        args.set + [f"train.device={args.device}", "train.progress=false", "diag.every=0", "eval.knn_every=0"],
    )
    data = synthetic_data(size=base.data.image_size or 32) if args.synthetic else load_data(base.data)
    results: dict = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "commit": git_commit(),
        "source_digest": _source_digest(),  # names the code where commit cannot
        "config": args.config,
        "overrides": args.set,
        "batch_size": base.train.batch_size,
        "steps": {},
    }
    B = base.train.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        for name, over in PREDICTORS:
            if name not in args.predictors.split(","):
                continue
            cfg = load_config(
                args.config,
                args.set
                + over
                + [f"train.device={args.device}", "train.progress=false", "diag.every=0", "eval.knn_every=0"],
            )
            torch.manual_seed(0)
            tr = Trainer(cfg, Path(tmp) / name, data=data).setup()
            dev = tr.device
            results["device"] = str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "")
            results["precision"] = str(tr.autocast_dtype or "fp32").replace("torch.", "")
            results["hardware"] = describe_hardware(dev)  # CPU model, ATen code path, AMX, threads; the GPU
            order = epoch_order(len(data.pretrain), 0, 0)
            images = tr._batch(order, 0)
            x1, x2 = tr.views(images)
            ac = dict(
                device_type=dev.type, dtype=tr.autocast_dtype or torch.float32, enabled=tr.autocast_dtype is not None
            )
            tr.method.train()

            def step() -> None:
                tr.optimize(x1, x2)

            enc, target = tr.method.online.encoder, tr.method.target

            def bare() -> None:
                with torch.autocast(**ac):
                    z1, z2 = enc(x1), enc(x2)
                    if target is not None:
                        with torch.no_grad():
                            target(x1), target(x2)
                    loss = z1.float().square().mean() + z2.float().square().mean()
                loss.backward()

            # Interleave the two measurements so that drifts of a shared machine hit both alike.
            t_step, t_bare = interleaved(step, bare, dev, args.steps, args.warmup)
            row = {"step_s": t_step, "step_images_per_s": B / t_step, "bare_s": t_bare, "bare_images_per_s": B / t_bare}
            if "limit" not in results:
                results["limit"] = {"bare_s": t_bare, "images_per_s": B / t_bare}

                def pipeline() -> None:
                    tr.views(tr._batch(order, 1))

                t_pipe = timed(pipeline, dev, args.steps, args.warmup)
                results["pipeline"] = {"s": t_pipe, "images_per_s": B / t_pipe}
            pred = tr.method.predictor
            if hasattr(pred, "corr"):
                z = torch.randn(2 * B, cfg.projector.out_dim, device=dev)
                row["predictor_update_s"] = timed(lambda: pred.update(z), dev, args.steps, args.warmup)
                row["predictor_update_share_of_step"] = row["predictor_update_s"] / t_step
            row["step_over_limit"] = t_bare / t_step
            results["steps"][name] = row
            print(
                f"{name:18s} step {B / t_step:8.1f} img/s  bare fwd+bwd {B / t_bare:8.1f} img/s  "
                f"ratio {row['step_over_limit']:.3f}"
                + (
                    f"  predictor update {100 * row['predictor_update_share_of_step']:.2f}% of step"
                    if "predictor_update_share_of_step" in row
                    else ""
                ),
                flush=True,
            )
    lim, pipe = results["limit"], results["pipeline"]
    print(f"limit (bare fwd+bwd) {lim['images_per_s']:8.1f} img/s; data pipeline {pipe['images_per_s']:8.1f} img/s")
    # against DirectPred's step where it was measured, else the first measured predictor's (named in the JSON)
    ref = "directpred_freq1" if "directpred_freq1" in results["steps"] else next(iter(results["steps"]))
    results["pipeline_over_step"] = pipe["images_per_s"] / results["steps"][ref]["step_images_per_s"]
    results["pipeline_over_step_of"] = ref
    print(f"pipeline / step ({ref}): {results['pipeline_over_step']:.2f}")

    dev = torch.device(results["device"].split(" ")[0])
    eigh = {}
    for d in (int(x) for x in args.eigh_dims.split(",") if x):
        g = torch.Generator().manual_seed(d)
        z = torch.randn(4 * d, d, generator=g).to(dev)
        F = z.t() @ z / len(z)
        t = timed(lambda F=F: symmetric_eigh(F, torch.float32), dev, 3 if d >= 2048 else args.steps, 1)
        eigh[d] = t
        print(
            f"eigh d={d:5d}: {1e3 * t:9.2f} ms  (per step at freq 1/5/10: "
            f"{1e3 * t:.2f} / {1e3 * t / 5:.2f} / {1e3 * t / 10:.2f} ms)",
            flush=True,
        )
    results["eigh_s"] = eigh
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    code = main()
    gc.freeze()  # skip the exit's collection over torch's import-time objects (1-2 s; see directpred/__main__.py)
    raise SystemExit(code)
