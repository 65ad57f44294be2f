"""OpenMP thread settings on a CPU, idle or shared: images/s of a bare SGD step under each setting, in one run.

Each setting runs in its own subprocess (``OMP_NUM_THREADS`` and ``OMP_WAIT_POLICY`` are read when PyTorch's
OpenMP runtime starts), in alternating rounds, so that the ratios survive a noisy machine. ``--busy N`` starts N
busy-looping processes for the measurement (a machine shared with other jobs); the default measures the machine as
it is. The network is the quick-start backbone (ResNet-18 width 16, CIFAR stem), batch 128, fp32.

    python benchmarks/omp_wait_policy.py --busy 2 --out benchmarks/results/omp_wait_busy.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {  # name -> environment
    "2 threads, default wait": {"OMP_NUM_THREADS": "2"},
    "2 threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}

CHILD = """
import time, torch
from directpred.backbones.resnet import resnet
torch.manual_seed(0)
m = resnet("resnet18", width=16)
opt = torch.optim.SGD(m.parameters(), lr=0.01)
x = torch.randn({batch}, 3, 32, 32)
for i in range({warmup} + {steps}):
    if i == {warmup}:
        t = time.perf_counter()
    loss = m(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
print({batch} * {steps} / (time.perf_counter() - t))
"""


def _busy() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--busy", type=int, default=0, help="busy-looping processes during the measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    code = CHILD.format(batch=args.batch, warmup=2, steps=args.steps)
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    base["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), base.get("PYTHONPATH", "")])
    load_before = os.getloadavg()[0]
    busy = [_busy() for _ in range(args.busy)]
    rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
    try:
        for _ in range(args.rounds):
            for name, env in SETTINGS.items():
                out = subprocess.run(
                    [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True
                )
                rates[name].append(float(out.stdout.strip().splitlines()[-1]))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    result = {
        "busy_processes": args.busy,
        "cpus": os.cpu_count(),
        "load_1min_before": load_before,
        "batch": args.batch,
        "steps": args.steps,
        "rounds": args.rounds,
        "images_per_s": {name: {"median": statistics.median(r), "all": r} for name, r in rates.items()},
    }
    for name, r in rates.items():
        print(f"{name:36s} median {statistics.median(r):7.1f} images/s   rounds {[round(v) for v in r]}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"({time.time() - t0:.0f} s)")
