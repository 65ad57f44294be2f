"""The CPU proxy of the ImageNet path end to end, as benchmarks/README.md "Proxy runs" reports it.

Generates the proxy JPEGs, trains ``configs/imagenet/proxy.yaml`` from the folder, writes tar shards, trains from
the shards with a SIGKILL once the checkpoint at ``--kill-after`` steps is on disk, resumes that run, and compares
every tensor of the two final checkpoints (they must be equal: the shards are the folder's images in the same
order, and a resume equals an uninterrupted run). Writes the wall times, the figures and the comparison as JSON.

    python benchmarks/proxy_check.py --work /tmp/proxy --out benchmarks/results/proxy_cpu_COMMIT.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("knn_top1", "linear_top1", "linear_top5", "linear_top1_best", "images_per_second", "wall_seconds", "steps")


def _timed(cmd: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True)
    return round(time.perf_counter() - start, 1)


def _tensors(x: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a checkpoint, by its path in the nested dicts and lists."""
    if isinstance(x, torch.Tensor):
        yield prefix, x
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _tensors(v, f"{prefix}.{k}")
    elif isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _tensors(v, f"{prefix}[{i}]")


def _step(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False)["step"])
    except Exception:  # not written yet, or being replaced
        return -1


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (data, shards, runs)")
    parser.add_argument("--out", type=Path, help="JSON file of the results")
    parser.add_argument("--train", type=int, default=3000, help="generated training images")
    parser.add_argument("--val", type=int, default=500, help="generated held-out images")
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--kill-after", type=int, default=40, help="SIGKILL once a checkpoint of this step exists")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both runs")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "directpred"]
    train = [*py, "train", str(REPO / "configs" / "imagenet" / "proxy.yaml"), "--set", "train.progress=false"]
    train += [a for kv in args.set for a in ("--set", kv)]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    res: dict[str, Any] = {"commit": commit.stdout.strip(), "threads": torch.get_num_threads(), "set": args.set}
    gen = [sys.executable, "-m", "directpred.data.proxy", "data", "--train", str(args.train), "--val", str(args.val)]
    res["generate_s"] = _timed(gen, work)
    res["folder_wall_s"] = _timed([*train, "--set", "data.path=data", "--out", "runs/folder"], work)
    res["shards_s"] = _timed([*py, "shards", "data", "--out", "shards", "--shard-size", str(args.shard_size)], work)
    ckpt = work / "runs" / "shards" / "checkpoints" / "last.pt"
    child = subprocess.Popen([*train, "--set", "data.path=shards", "--out", "runs/shards"], cwd=work)
    while child.poll() is None and _step(ckpt) < args.kill_after:
        time.sleep(0.2)
    if child.poll() is not None:
        raise SystemExit(f"the shard run ended before its step-{args.kill_after} checkpoint; lower --kill-after")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    res["killed_at_checkpoint_step"] = _step(ckpt)
    res["resume_wall_s"] = _timed([*py, "train", "--resume", "runs/shards"], work)
    a, b = (
        dict(_tensors(torch.load(work / "runs" / r / "checkpoints" / "last.pt", weights_only=False)))
        for r in ("folder", "shards")
    )
    res["tensors_compared"] = len(a)
    res["tensors_equal"] = sum(k in b and torch.equal(v, b[k]) for k, v in a.items())
    for run in ("folder", "shards"):
        summary = json.loads((work / "runs" / run / "summary.json").read_text())
        res[run] = {k: summary.get(k) for k in FIGURES}
    rows = [json.loads(line) for line in (work / "runs" / "shards" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r.get("kind") == "train"]
    res["shards_train_rows_unique"] = len(steps) == len(set(steps))
    text = json.dumps(res, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return res


if __name__ == "__main__":
    main()
    gc.freeze()  # skip the exit's collection over torch's import-time objects (1-2 s; see directpred/__main__.py)
