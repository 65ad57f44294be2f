"""Tiny training runs on generated data: the collapse ablations are flagged, healthy runs are not.

Size: ResNet-18 width 4, 2050 generated 32x32 images of 10 classes (coloured blobs on noise, held in memory; an
epoch is 32 steps), batch 64, diagnostics every 2 steps, one thread. Measured here: the two ablations are flagged
at steps 26-28; the healthy runs keep ``z_std_ratio`` above 0.11 (threshold 0.08). About 20 s per run on 2 shared
cores, hence ``slow``. The full-size evidence is in docs/diagnostics.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic_images

from directpred.cli import main
from directpred.config import load_config
from directpred.data.datasets import DataBundle, ImageArrays
from directpred.train.loop import Trainer

TINY = [
    "data.dataset=folder",
    "backbone.width=4",
    "train.batch_size=64",
    "train.epochs=2",
    "eval.linear=false",
    "eval.knn_every=0",
    "train.progress=false",
    "diag.every=2",
    "train.device=cpu",
    "train.precision=fp32",
]

pytestmark = pytest.mark.slow


def _arrays(n_per_class: int, seed: int, n_classes: int = 10) -> ImageArrays:
    images, labels = synthetic_images(n_per_class, n_classes, 32, seed)
    return ImageArrays(torch.from_numpy(np.stack(images)), torch.tensor(labels), [f"c{k}" for k in range(n_classes)])


@pytest.fixture(scope="module")
def data():
    train = _arrays(205, seed=0)
    return DataBundle(train, train, _arrays(20, seed=1), "blobs")


def train(tmp_path: Path, data, name: str, overrides: list[str], steps: int, folder: Path) -> tuple[Path, dict]:
    # data.path (what `directpred diagnose` reads later) is a small folder; training uses the in-memory images.
    cfg = load_config(
        None,
        TINY + overrides + [f"train.max_steps={steps}", f"data.path={folder}", f"data.cache_dir={tmp_path / 'cache'}"],
    )
    out = tmp_path / name
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = Trainer(cfg, out, data=data).fit()
    finally:
        torch.set_num_threads(n)
    return out, summary


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("simsiam_no_predictor", ["method.name=simsiam", "predictor.name=none"]),
        ("simsiam_no_stop_gradient", ["method.name=simsiam", "method.stop_gradient=false"]),
    ],
)
def test_collapse_ablations_are_flagged_and_stopped(tmp_path, data, name, overrides, caplog, tiny_folder):
    out, summary = train(tmp_path, data, name, overrides + ["diag.stop_on_collapse=true"], steps=48, folder=tiny_folder)
    assert summary["collapsed"] is True, summary
    # Flagged within about an epoch (32 steps); measured: steps 26-28 (the step moves with the CPU's kernels).
    assert summary["collapse_step"] <= 40
    assert summary["stopped_early"] is True and summary["steps"] == summary["collapse_step"]
    assert "z_std_ratio" in summary["collapse_evidence"]
    assert any("COLLAPSED" in r.getMessage() for r in caplog.records if r.name == "directpred.diagnostics.hook")
    saved = json.loads((out / "summary.json").read_text())
    assert saved["collapsed"] is True and saved["collapse_step"] == summary["collapse_step"]


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("byol_directpred", []),
        ("byol_linear", ["predictor.name=linear"]),
        ("byol_mlp", ["predictor.name=mlp"]),
        ("simsiam_directpred", ["method.name=simsiam"]),
        ("simsiam_linear", ["method.name=simsiam", "predictor.name=linear"]),
        ("simsiam_mlp", ["method.name=simsiam", "predictor.name=mlp"]),
    ],
)
def test_healthy_runs_are_not_flagged(tmp_path, data, name, overrides, tiny_folder, capsys):
    out, summary = train(tmp_path, data, name, overrides, steps=24, folder=tiny_folder)
    assert summary["collapsed"] is False and summary["collapse_step"] is None
    assert summary["dim_collapsed"] is False and summary["final_looks_dim_collapsed"] == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    diag = [r for r in rows if r["kind"] == "diag"]
    assert [r["step"] for r in diag] == list(range(2, 25, 2))
    assert all(r["collapsed"] == 0 and r["dim_collapsed"] == 0 for r in diag)
    final = [r for r in rows if r["kind"] == "diag_final"]  # the verdict on the final state
    assert [r["step"] for r in final] == [24] and final[0]["looks_collapsed"] == 0
    if name.endswith("directpred"):  # W_p is built from F^'s eigenvectors: aligned and symmetric
        assert all(r["alignment"] > 0.999 and r["asymmetry"] < 1e-5 for r in diag)
    if name == "byol_directpred":  # the checkpoint-level report and the figures of the same run
        assert main(["diagnose", str(out), "--batches", "1"]) == 0
        assert "no batch metrics" not in capsys.readouterr().out
        assert main(["plot", str(out), "--out", str(tmp_path / "plots")]) == 0
        pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
        assert pngs == ["overview.png", "spectra_byol_directpred.png"]
