"""The online linear probe (eval.online_probe): it leaves training unchanged, learns on learnable data, and its
state survives a resume exactly."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from directpred.cli import main
from directpred.config import load_config
from directpred.data.augment import eval_transform
from directpred.data.datasets import load_data
from directpred.data.views import view_recipes
from directpred.train.callbacks import OnlineProbeCallback, StepResult
from directpred.train.logger import read_metrics
from directpred.train.loop import Trainer


def _state(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def _probe_rows(run):
    return [r for r in read_metrics(run) if r["kind"] == "probe"]


def test_online_probe_changes_no_weight_and_learns_above_chance(tiny_overrides, tmp_path):
    # 128 training images in 8 steps an epoch; kNN (and the probe's test top-1) after epochs 1..3.
    common = tiny_overrides + ["train.epochs=4", "train.log_every=8", "eval.knn_every=1"]
    Trainer(load_config(None, common), tmp_path / "off").fit()
    Trainer(load_config(None, common + ["eval.online_probe=true"]), tmp_path / "on").fit()
    off, on = _state(tmp_path / "off"), _state(tmp_path / "on")
    assert off["model"].keys() == on["model"].keys()
    for k in off["model"]:
        assert torch.equal(off["model"][k], on["model"][k]), f"{k} differs with the online probe on"
    assert off["optimizer"]["state"].keys() == on["optimizer"]["state"].keys()
    for k, s in off["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], on["optimizer"]["state"][k]["momentum_buffer"])
    assert _probe_rows(tmp_path / "off") == [] and off["callbacks"] == {"online_probe": {}}

    rows = _probe_rows(tmp_path / "on")
    train_rows = [r for r in rows if "probe_train_top1" in r]
    test_rows = [r for r in rows if "probe_test_top1" in r]
    assert [r["step"] for r in train_rows] == [8, 16, 24, 32]
    # epochs 1-3 on the periodic kNN's features, epoch 4 on the final evaluation's (also in summary.json)
    assert [(r["epoch"], r["step"]) for r in test_rows] == [(1, 8), (2, 16), (3, 24), (4, 32)]
    summary = json.loads((tmp_path / "on" / "summary.json").read_text())
    assert summary["online_probe_test_top1"] == test_rows[-1]["probe_test_top1"]
    assert "online_probe_test_top1" not in json.loads((tmp_path / "off" / "summary.json").read_text())
    for r in test_rows:  # a share of the 32 test images
        assert abs(r["probe_test_top1"] * 32 / 100 - round(r["probe_test_top1"] * 32 / 100)) < 1e-9
    # 4 classes: chance is 25 %, and a probe at chance over the epoch's 128 images has std 3.8 points, so 33 is two
    # std above it. Measured in epochs 1 and 4: 27 % and 45 % (AVX-512), 30 % and 40 % (AVX2 forced): the tiny
    # network's numbers move with the CPU's kernels, so the bound is statistical, not tuned to one machine.
    assert train_rows[-1]["probe_train_top1"] > max(33.0, train_rows[0]["probe_train_top1"])

    # Independently: the checkpoint's probe on the final backbone's test features beats chance too.
    cfg = load_config(None, common)
    data = load_data(cfg.data, seed=0)
    trainer = Trainer(cfg, tmp_path / "on", resume=True).setup()
    _, test_recipe = view_recipes(cfg, data)
    backbone = trainer.method.encoder.backbone.eval()
    with torch.no_grad():
        feats = backbone(eval_transform(data.test.images.permute(0, 3, 1, 2), test_recipe))
    probe = on["callbacks"]["online_probe"]["probe"]
    pred = (feats @ probe["weight"].T + probe["bias"]).argmax(1)
    assert (pred == data.test.labels).float().mean() > 0.4
    # and it is the final row's figure (up to one of the 32 test images: here the features come in one batch)
    assert abs(100.0 * float((pred == data.test.labels).float().mean()) - summary["online_probe_test_top1"]) <= 3.2

    # evaluated again on resume (another kNN k): the final evaluation's rows are replaced, not added to
    assert main(["train", "--resume", str(tmp_path / "on"), "--set", "eval.knn_k=3"]) == 0
    again = [r for r in _probe_rows(tmp_path / "on") if "probe_test_top1" in r]
    assert [r["step"] for r in again] == [8, 16, 24, 32] and again[-1] == test_rows[-1]
    assert [r["step"] for r in read_metrics(tmp_path / "on") if r["kind"] == "final"] == [32]


def test_online_probe_resumes_bit_identically(tiny_overrides, tmp_path):
    """Stopped mid-epoch (step 12 of 8-step epochs) and resumed: the model, the probe, its optimiser and its
    logged rows equal those of a run that never stopped."""
    common = tiny_overrides + ["train.epochs=3", "train.log_every=5", "eval.knn_every=1", "eval.online_probe=true"]
    Trainer(load_config(None, common), tmp_path / "full").fit()
    Trainer(load_config(None, common + ["train.max_steps=12"]), tmp_path / "part").fit()
    assert main(["train", "--resume", str(tmp_path / "part"), "--set", "train.max_steps=0"]) == 0
    full, part = _state(tmp_path / "full"), _state(tmp_path / "part")
    for k in full["model"]:
        assert torch.equal(full["model"][k], part["model"][k]), k
    a, b = full["callbacks"]["online_probe"], part["callbacks"]["online_probe"]
    for k in ("weight", "bias"):
        assert torch.equal(a["probe"][k], b["probe"][k])
    for k, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    # The part run logged its last-step row at step 12, which the resumed run replaces (rows after its checkpoint
    # are dropped; the row at 12 itself stays): compare the rows of the other steps.
    rows_full = [r for r in _probe_rows(tmp_path / "full") if r["step"] != 12]
    rows_part = [r for r in _probe_rows(tmp_path / "part") if r["step"] != 12]
    assert rows_full == rows_part and len(rows_full) >= 6


def test_a_resume_with_another_online_probe_lr_trains_the_probe_at_that_rate(tiny_overrides, tmp_path):
    """eval.* may change on resume: the probe's optimiser goes on at the new eval.online_probe_lr (what config.yaml
    records), not the checkpoint's (its momentum buffers are the checkpoint's: the resume test above)."""
    common = tiny_overrides + ["train.epochs=1", "eval.online_probe=true"]
    Trainer(load_config(None, common + ["train.max_steps=2"]), tmp_path / "r").fit()
    assert _state(tmp_path / "r")["callbacks"]["online_probe"]["optimizer"]["param_groups"][0]["lr"] == 0.1
    args = ["--set", "eval.online_probe_lr=0.01", "--set", "train.max_steps=3"]
    assert main(["train", "--resume", str(tmp_path / "r"), *args]) == 0
    state = _state(tmp_path / "r")
    assert state["step"] == 3 and state["callbacks"]["online_probe"]["optimizer"]["param_groups"][0]["lr"] == 0.01


class _HostReads(TorchFunctionMode):
    """Counts the tensor calls that copy a value to the host (a device sync on a GPU)."""

    READS = {"tolist", "item", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def test_online_probe_reads_its_counts_on_the_host_only_when_it_logs():
    """The probe summed each step's (correct, labelled, loss) with a .tolist(): a device sync every step. They stay
    on the device now and are read when a row is logged (every train.log_every steps, and the last step) or a
    checkpoint written; the rows are the running sums, which an independent count over the same logits gives."""
    cb = OnlineProbeCallback()
    rows: list[dict] = []
    trainer = SimpleNamespace(
        cfg=SimpleNamespace(
            eval=SimpleNamespace(online_probe=True, online_probe_lr=0.1), train=SimpleNamespace(log_every=4)
        ),
        data=SimpleNamespace(num_classes=3),
        device=torch.device("cpu"),
        world=1,
        epoch=1,
        last_step=10,
        logger=SimpleNamespace(log=lambda row, group: rows.append(row)),
    )
    g = torch.Generator().manual_seed(0)
    expected: list[tuple[int, int, float]] = []
    correct = seen = 0
    loss_sum = 0.0
    for step in range(1, 11):
        h = torch.randn(8, 5, generator=g)
        y = torch.randint(-1, 3, (8,), generator=g)  # -1: unlabelled, left out
        if cb.probe is not None:  # an independent count of this step, with the probe as it is before the step
            with torch.no_grad():
                logits = cb.probe(h)
            keep = y >= 0
            correct += int(((logits.argmax(1) == y) & keep).sum())
            seen += int(keep.sum())
            loss_sum += float(
                (torch.nn.functional.cross_entropy(logits, y.clamp(min=0), reduction="none") * keep).sum()
            )
        else:  # zero-initialised: every logit 0, argmax 0, loss log 3 per labelled image
            keep = y >= 0
            correct += int(((y == 0) & keep).sum())
            seen += int(keep.sum())
            loss_sum += float(keep.sum()) * math.log(3)
        trainer.step = step
        with _HostReads() as reads:
            cb.on_step_end(trainer, StepResult(torch.tensor(0.0), 0.1, 0.99, SimpleNamespace(h1=h), labels=y))
        logs = step % 4 == 0 or step == 10
        assert (reads.count > 0) == logs, (step, reads.count)
        if logs:
            expected.append((step, 100.0 * correct / seen, loss_sum / seen))
            if step % 4 == 0:
                correct = seen = 0
                loss_sum = 0.0
    assert [r["step"] for r in rows] == [4, 8, 10]
    for row, (step, top1, loss) in zip(rows, expected):
        assert row["step"] == step and row["probe_train_top1"] == pytest.approx(top1, abs=1e-9)
        assert row["probe_loss"] == pytest.approx(loss, rel=1e-6)
    state = cb.state_dict()  # step 10 was a last-step row, not a log_every one: its counts carry on in a resume
    assert state["counts"][:2] == [correct, seen] and state["counts"][2] == pytest.approx(loss_sum, rel=1e-6)
