"""Two gloo processes on a streamed data set: the same training as two processes on the in-memory data, kNN
features gathered from both ranks, BYOL's linear evaluation with all-reduced gradients."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import write_mixed_folder
from test_ddp import REPO, as_args, torchrun

from directpred.cli import main


@pytest.mark.slow
def test_two_process_streamed_run_equals_two_process_in_memory_run(tiny_overrides, tmp_path):
    data = write_mixed_folder(tmp_path / "data", n_per_class=10, classes=3)
    over = tiny_overrides + [
        f"data.path={data}",
        "data.image_size=24",
        "data.augment=imagenet",
        "train.batch_size=4",
        "train.epochs=2",
        "eval.knn_k=5",
    ]
    streamed = over + [
        "data.stream=true",
        "data.workers=1",
        "eval.linear=true",
        "eval.linear_protocol=byol",
        "eval.linear_epochs=2",
        "eval.linear_batch_size=4",
        "eval.linear_lr=0.1",
    ]
    torchrun(["configs/cpu/quickstart.yaml", "--out", str(tmp_path / "mem"), *as_args(over)], cwd=REPO)
    torchrun(["configs/cpu/quickstart.yaml", "--out", str(tmp_path / "lazy"), *as_args(streamed)], cwd=REPO)
    a = torch.load(tmp_path / "mem" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "lazy" / "checkpoints" / "last.pt", weights_only=True)
    assert a["world_size"] == b["world_size"] == 2 and a["step"] == b["step"] == 6  # 30 images, global batch 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k}: streamed and in-memory 2-process runs differ"
    mem = json.loads((tmp_path / "mem" / "summary.json").read_text())
    lazy = json.loads((tmp_path / "lazy" / "summary.json").read_text())
    assert lazy["knn_top1"] == pytest.approx(mem["knn_top1"], abs=1e-6)  # streamed kNN merged across ranks
    assert 0 <= lazy["linear_top1"] <= 100 and lazy.get("linear_top5") is None  # 3 classes: no top-5 figure
    # The 2-process streamed kNN equals a single-process evaluation of the same checkpoint.
    assert main(["eval", str(tmp_path / "lazy"), "--no-linear"]) == 0
    single = json.loads((tmp_path / "lazy" / "eval.json").read_text())
    assert single["knn_top1"] == pytest.approx(lazy["knn_top1"], abs=1e-6)
    # `directpred eval` under torchrun joins the process group, as training's final evaluation does: the same
    # figures, the streamed probe included (its global batch and learning rate scale with the processes); rank 0
    # alone writes and prints. Before, each process evaluated everything alone, printing it twice.
    out = torchrun([str(tmp_path / "lazy"), "--json", str(tmp_path / "ddp_eval.json")], cwd=REPO, command="eval")
    ddp = json.loads((tmp_path / "ddp_eval.json").read_text())
    assert ddp["world_size"] == 2
    for key in ("knn_top1", "linear_top1", "linear_top1_best"):
        assert ddp[key] == pytest.approx(lazy[key], abs=1e-6), key
    assert out.stdout.count("kNN top-1") == 1
