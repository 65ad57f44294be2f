"""After a SIGKILL and a resume, metrics.jsonl and TensorBoard hold each step once, with the values of a run that was
never interrupted (the steps between the checkpoint and the kill are redone, not logged twice)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import write_folder

from directpred.config import load_config
from directpred.train.checkpoint import load_checkpoint
from directpred.train.logger import read_metrics, truncate_metrics
from directpred.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
TIMING = ("images_per_second", "seconds")  # wall-clock fields differ between any two runs


def _config(root: Path) -> Path:
    data = write_folder(root / "data", n_train=16, n_test=4, size=16)
    cfg = {
        "data": {"dataset": "folder", "path": str(data), "cache_dir": str(root / "cache")},
        "backbone": {"width": 4},
        "projector": {"hidden_dim": 32, "out_dim": 16},
        "train": {
            "batch_size": 8,
            "epochs": 3,
            "progress": False,
            "log_every": 1,
            "device": "cpu",
            "precision": "fp32",
        },  # checkpoints at the epoch ends only: steps 8, 16, 24
        "eval": {"knn_every": 1, "linear": False, "knn_k": 10},
        "diag": {"every": 3},
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _rows(run: Path) -> dict[tuple[str, int], dict]:
    rows = read_metrics(run)
    keys = Counter((r["kind"], r["step"]) for r in rows)
    assert max(keys.values()) == 1, f"logged twice: {[k for k, n in keys.items() if n > 1]}"
    return {(r["kind"], r["step"]): {k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows}


def _tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        out[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in acc.Tags()["histograms"]:
        out[tag] = [(e.step, e.histogram_value.sum) for e in acc.Histograms(tag)]
    return out


@pytest.mark.slow
def test_sigkill_then_resume_logs_each_step_once_with_uninterrupted_values(tmp_path):
    config = _config(tmp_path)
    reference = tmp_path / "reference"
    Trainer(load_config(config), reference).fit()

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "directpred", "train"]
    proc = subprocess.Popen(
        [*cmd, str(config), "--out", str(run)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while proc.poll() is None and not any(r["kind"] == "train" and r["step"] >= 11 for r in read_metrics(run)):
        assert time.time() - t0 < 60, "no progress to step 11"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    ckpt_step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    logged = max(r["step"] for r in read_metrics(run))
    assert ckpt_step == 8 and logged > ckpt_step, (ckpt_step, logged)  # steps 9.. will be redone

    proc = subprocess.run([*cmd, "--resume", str(run)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

    got, want = _rows(run), _rows(reference)
    assert got.keys() == want.keys()
    assert {k for k, _ in got} == {"train", "diag", "diag_final", "eval", "final"}
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    tb, tb_ref = _tensorboard(run), _tensorboard(reference)
    assert tb.keys() == tb_ref.keys() and {"train/loss", "eval/knn_top1", "diag/wp_eig"} <= tb.keys()
    for tag, events in tb_ref.items():
        steps = [s for s, _ in tb[tag]]
        assert len(steps) == len(set(steps)), f"{tag}: a step appears twice in TensorBoard"
        assert steps == [s for s, _ in events], tag
        if not any(t in tag for t in TIMING):
            assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in events], rel=1e-5, abs=1e-7), tag


def test_truncate_metrics_is_atomic_and_drops_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')
    assert truncate_metrics(path, 3) == 3
    assert read_metrics(tmp_path) == rows[:3]
    assert path.read_text().endswith("\n") and not list(tmp_path.glob(".*.tmp"))
    before = path.stat().st_mtime_ns
    assert truncate_metrics(path, 10) == 0 and path.stat().st_mtime_ns == before  # nothing to drop: untouched
