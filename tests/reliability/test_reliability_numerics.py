"""Numerical faults: a non-finite loss or gradient stops the run naming the step and the last good checkpoint (or
is skipped, up to train.skip_nonfinite); the eigendecomposition of F^ falls back and W_p stays finite and
symmetric on degenerate inputs."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from directpred.config import load_config
from directpred.data.order import epoch_order
from directpred.heads.directpred import DirectCopy, DirectPred, PartitionedDirectPred
from directpred.train.checkpoint import load_checkpoint
from directpred.train.loop import Trainer, TrainingError

NAN = float("nan")
REPO = Path(__file__).resolve().parents[2]


def _trainer(tiny_overrides, tmp_path, *extra: str) -> Trainer:
    over = tiny_overrides + ["train.epochs=1", "train.checkpoint_every_steps=2", "predictor.freq=2", *extra]
    return Trainer(load_config(None, over), tmp_path / "run").setup()


def _poison_loss_at(trainer: Trainer, steps: set[int]) -> None:
    """The loss (and so every gradient) becomes NaN at the given steps."""
    forward = trainer.method.forward

    def poisoned(x1, x2, **kw):
        out = forward(x1, x2, **kw)
        if trainer.step in steps:
            out.loss = out.loss * NAN
        return out

    trainer.method.forward = poisoned


def _poison_grad_at(trainer: Trainer, steps: set[int]) -> None:
    """A finite loss, but one parameter's gradient becomes inf at the given steps."""
    p = next(trainer.method.online.encoder.parameters())
    p.register_hook(lambda g: g * float("inf") if trainer.step in steps else g)


@pytest.mark.parametrize("fault", ["loss", "gradient", "predictor input"])
def test_nonfinite_step_stops_with_step_cause_and_last_good_checkpoint(fault, tiny_overrides, tmp_path):
    trainer = _trainer(tiny_overrides, tmp_path)
    if fault == "loss":
        _poison_loss_at(trainer, {5})
        expected = "non-finite loss"
    elif fault == "gradient":
        _poison_grad_at(trainer, {5})
        expected = "non-finite gradient"
    else:  # NaN projections reach DirectPred's F^, which refuses them
        trainer.method.online.encoder.projector.register_forward_hook(
            lambda m, i, out: out * NAN if trainer.step == 5 else out
        )
        expected = "NaN/inf in the predictor's inputs"
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    msg = str(info.value)
    # the step being taken, as metrics.jsonl numbers it: the 6th (index 5), after the checkpoint of step 4
    assert expected in msg and "at step 6;" in msg and "optim.lr" in msg
    if fault == "predictor input":  # the fault, then the trainer's advice once (not the head's own advice before it)
        assert msg.startswith("NaN/inf in the predictor's inputs f (the network has diverged) at step 6; training")
        assert msg.count("resume from") == 1
    assert f"last good checkpoint is {last} (step 4)" in msg and "--resume" in msg
    state = load_checkpoint(last)  # the checkpoint of step 4 is intact and finite
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_before_any_checkpoint_says_so(tiny_overrides, tmp_path):
    trainer = _trainer(tiny_overrides, tmp_path)
    _poison_loss_at(trainer, {0})
    with pytest.raises(TrainingError, match="at step 1;.*No checkpoint was written yet"):
        trainer.fit()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize("update_at", ["forward", "after_step"])
def test_skipped_step_changes_nothing_but_the_step_counter(update_at, tiny_overrides, tmp_path):
    trainer = _trainer(tiny_overrides, tmp_path, "train.skip_nonfinite=1", f"predictor.update_at={update_at}")
    _poison_grad_at(trainer, {1})
    order = epoch_order(len(trainer.data.pretrain), trainer.cfg.train.seed, 0)
    trainer.train_step(trainer._batch(order, 0))
    before = {k: v.clone() for k, v in trainer.method.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in trainer.optimizer.state.values()]
    with pytest.warns(RuntimeWarning, match=r"^step 2: non-finite gradient.*skipped \(1 of at most 1"):
        res = trainer.train_step(trainer._batch(order, 1))
    assert res.skipped and trainer.step == 2 and trainer.skipped_steps == 1
    after = trainer.method.state_dict()
    for k in before:  # weights, target, BatchNorm statistics, F^, W_p and counters
        assert torch.equal(before[k], after[k]), f"{k} changed in a skipped step"
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(momentum, trainer.optimizer.state.values()))


def test_skip_policy_finishes_counts_and_stops_past_its_limit(tiny_overrides, tmp_path):
    trainer = _trainer(tiny_overrides, tmp_path, "train.skip_nonfinite=2")
    _poison_loss_at(trainer, {2, 5})
    with pytest.warns(RuntimeWarning, match="skipped") as caught:
        summary = trainer.fit()
    assert summary["skipped_steps"] == 2 and summary["steps"] == 8
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_steps"] == 2
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["skipped_steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] is None for r in rows if r["kind"] == "train"] == [s in (3, 6) for s in range(1, 9)]
    # the warnings name the skipped steps as metrics.jsonl does
    warned = [str(w.message).split(":")[0] for w in caught if "step skipped" in str(w.message)]
    assert warned == [f"step {r['step']}" for r in rows if r["kind"] == "train" and r["loss"] is None]

    limited = _trainer(tiny_overrides, tmp_path / "b", "train.skip_nonfinite=1")
    _poison_loss_at(limited, {2, 5})
    with pytest.warns(RuntimeWarning), pytest.raises(TrainingError, match="non-finite loss.*at step 6;"):
        limited.fit()


def test_fp16_loss_scaler_skips_are_counted_logged_and_resumed(tiny_overrides, tmp_path):
    """Under fp16 the GradScaler leaves a step with inf/NaN gradients unapplied and lowers its scale, silently:
    such steps are now counted (amp_skipped_steps in the train rows, summary.json and the checkpoint) with the loss
    scale logged. fp16 needs CUDA, so the run here is fp32 with an enabled CPU GradScaler put in its place and
    gradients made inf at two steps; the count is checked against the steps whose parameters did not move."""
    trainer = _trainer(tiny_overrides, tmp_path, "optim.warmup_epochs=0")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20, growth_interval=1000)
    trainer.loss_scale = trainer.scaler.get_scale()  # as setup reads it from an enabled scaler
    _poison_grad_at(trainer, {2, 5})
    params = list(trainer.method.online.encoder.parameters())  # W_p is set by DirectPred, not by the optimiser
    unmoved = []
    step = trainer.train_step

    def watched(images):
        before = [p.detach().clone() for p in params]
        result = step(images)
        if all(torch.equal(a, p) for a, p in zip(before, params)):
            unmoved.append(trainer.step)
        return result

    trainer.train_step = watched
    summary = trainer.fit()
    assert unmoved == [3, 6] and summary["amp_skipped_steps"] == 2 and summary["skipped_steps"] == 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["amp_skipped_steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["amp_skipped_steps"] for r in train] == [0, 0, 1, 1, 1, 2, 2, 2]
    assert [r["loss_scale"] for r in train] == [2.0**20] * 2 + [2.0**19] * 3 + [2.0**18] * 3
    resumed = Trainer(load_config(None, [], base=trainer.cfg.to_dict()), tmp_path / "run", resume=True).setup()
    assert resumed.amp_skipped_steps == 2


def test_eigh_failure_falls_back_with_warning_and_counter_in_summary(tiny_overrides, tmp_path, monkeypatch):
    eigh, calls = torch.linalg.eigh, []

    def failing_once(A, *args, **kwargs):
        calls.append(A.dtype)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("injected: the algorithm failed to converge")
        return eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", failing_once)
    trainer = _trainer(tiny_overrides, tmp_path, "train.max_steps=3", "predictor.freq=1")
    with pytest.warns(RuntimeWarning, match="fell back to float64"):
        summary = trainer.fit()
    # One retry, then float32 again (later float64 calls are the final diagnostics report's spectra).
    assert calls[:4] == [torch.float32, torch.float64, torch.float32, torch.float32]
    assert summary["eigh_fallbacks"] == 1 and summary["steps"] == 3
    W = trainer.method.predictor.weight.detach()
    assert torch.isfinite(W).all() and torch.equal(W, W.T)


def test_directcopy_eigvalsh_failing_in_float64_too_stops_as_a_divergence(tiny_overrides, tmp_path, monkeypatch):
    """DirectCopy's float64 retry was unguarded: its LinAlgError (not a FloatingPointError) bypassed the trainer's
    divergence handling (TrainingDiverged with the step and the last good checkpoint; train.skip_nonfinite), as
    DirectPred's symmetric_eigh does not."""
    from directpred.train.faults import TrainingDiverged

    eigvalsh = torch.linalg.eigvalsh

    def failing_from_step_3(A, *args, **kwargs):
        if len(calls) >= 2:
            raise torch.linalg.LinAlgError("injected: the algorithm failed to converge")
        calls.append(A.dtype)
        return eigvalsh(A, *args, **kwargs)

    calls: list[torch.dtype] = []
    monkeypatch.setattr(torch.linalg, "eigvalsh", failing_from_step_3)
    trainer = _trainer(tiny_overrides, tmp_path, "predictor.name=directcopy", "train.max_steps=5")
    with pytest.raises(TrainingDiverged, match="eigvalsh of F\\^ failed even in float64"):
        trainer.fit()


# ---------------------------------------------------------------------------------------------------------------
# Property-based: DirectPred and DirectCopy on degenerate batches

F32_SAFE = 1e15  # |f| whose squares (F^ up to ~1e30 * d) stay inside float32


@st.composite
def degenerate_batches(draw) -> torch.Tensor:
    d = 6
    b = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["zeros", "rank1", "duplicated", "random", "one-hot", "sparse"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if kind == "zeros":
        z = torch.zeros(b, d)
    elif kind == "rank1":
        z = torch.randn(b, 1, generator=g) * torch.randn(1, d, generator=g)
    elif kind == "duplicated":
        z = torch.randn(1, d, generator=g).expand(b, d).clone()
    elif kind == "one-hot":
        z = torch.zeros(b, d)
        z[:, draw(st.integers(0, d - 1))] = 1.0
    elif kind == "sparse":
        z = torch.randn(b, d, generator=g) * (torch.rand(b, d, generator=g) < 0.2)
    else:
        z = torch.randn(b, d, generator=g)
    scale = draw(st.sampled_from([1e-30, 1e-20, 1e-8, 1.0, 1e8, 1e12, F32_SAFE]))
    return z * scale


predictors = st.sampled_from(
    [
        lambda: DirectPred(6, eps_mode="code"),
        lambda: DirectPred(6, eps_mode="paper"),
        lambda: DirectPred(6, eps=0.0),
        lambda: DirectPred(6, c=0.5),
        lambda: DirectPred(6, rho=0.0),
        lambda: DirectPred(6, average="cumulative"),
        lambda: DirectPred(6, zero_mean=True),
        lambda: DirectPred(6, eigh_dtype=torch.float64),
        lambda: DirectCopy(6),
        lambda: DirectCopy(6, eps=0.0),
    ]
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(make=predictors, batches=st.lists(degenerate_batches(), min_size=1, max_size=4))
def test_weight_stays_finite_and_symmetric_on_degenerate_batches(make, batches):
    pred = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fallbacks may warn; that is allowed
        for z in batches:
            pred.update(z)
            W = pred.weight.detach()
            assert torch.isfinite(W).all(), f"W_p not finite after a batch of scale {z.abs().max():.3g}"
            assert torch.equal(W, W.T), "W_p not exactly symmetric"
            assert torch.isfinite(pred.corr).all()
    assert int(pred.count) == len(batches)


@settings(max_examples=30, deadline=None)
@given(
    make=st.one_of(predictors, st.sampled_from([lambda: PartitionedDirectPred(6, partitions=3)])),
    bad=st.sampled_from([NAN, float("inf"), -float("inf"), 1e30]),
    row=st.integers(0, 7),
    col=st.integers(0, 5),
)
def test_nonfinite_or_overflowing_input_raises_and_leaves_state_unchanged(make, bad, row, col):
    pred = make()
    pred.update(torch.randn(8, 6, generator=torch.Generator().manual_seed(0)))
    before = {k: v.clone() for k, v in pred.state_dict().items()}
    z = torch.randn(8, 6)
    z[row, col] = bad
    with pytest.raises(FloatingPointError, match="diverged"):
        pred.update(z)
    for k, v in pred.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused batch"


def test_nonfinite_features_give_nan_accuracies_and_the_run_finishes(tiny_overrides, tmp_path, monkeypatch, capsys):
    """Features that turn NaN at evaluation (a model diverged in eval mode while the training loss stayed finite)
    gave a chance-level accuracy that looked real. The run must not crash there (the epoch's checkpoint would be
    lost): it finishes, with NaN accuracies in summary.json and knn_history and a line saying why."""
    import directpred.eval.protocol as protocol
    from directpred.cli import main

    extract = protocol.extract_features

    def poisoned(*args, **kwargs):
        f = extract(*args, **kwargs)
        f[0, 0] = NAN
        return f

    monkeypatch.setattr(protocol, "extract_features", poisoned)
    run = tmp_path / "run"
    over = tiny_overrides + ["train.epochs=2", "train.checkpoint_every=1", "eval.knn_every=1", "eval.linear=true"]
    over += ["eval.linear_epochs=2"]
    sets = [a for o in over for a in ("--set", o)]
    assert main(["train", str(REPO / "configs/cpu/quickstart.yaml"), "--out", str(run), *sets]) == 0
    out, err = capsys.readouterr()
    assert "RuntimeWarning: kNN: 1 of the 128 rows of the training features are non-finite (NaN or inf)" in err
    # strict JSON: null, not a plausible percentage, and not Python's bare NaN (which jq and JavaScript refuse)
    summary = json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert summary["steps"] == 16 and (run / "checkpoints" / "epoch_0001.pt").is_file()
    for key in ("knn_top1", "linear_top1", "linear_top1_best"):
        assert summary[key] is None, key
    assert summary["knn_history"] == [{"epoch": 1, "knn_top1": None, "step": 8}]
    assert "kNN top-1:              nan %" in out
    assert "nan: the features were non-finite (NaN or inf; a diverged model?), so no accuracy can be read" in out
    # resuming the finished run prints its summary.json as read back (null): still nan and why, not a silent gap
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "had already finished" in out and "kNN top-1:              nan %" in out
    assert "linear probe top-1:     nan %" in out and "linear probe best:      nan %" in out
    # `directpred eval` compares with the training run's null figures as nan, not silently not at all
    assert main(["eval", str(run)]) == 0
    assert "knn_top1: training run reported nan %, now nan %" in capsys.readouterr().out
    assert "nan: the features were non-finite (NaN or inf; a diverged model?), so no accuracy can be read" in out


def test_a_divergence_names_the_runs_settings_that_can_cause_one(tiny_overrides, tmp_path):
    """predictor.eps=1e300 or optim.weight_decay=1e30 diverged with a message that blamed only the learning rate:
    the settings the run moved off their defaults that can diverge are named beside it."""
    trainer = _trainer(tiny_overrides, tmp_path, "predictor.eps=0.5", "optim.alpha_p=3")
    _poison_loss_at(trainer, {1})
    with pytest.raises(TrainingError) as info:
        trainer.fit()
    msg = str(info.value)
    assert "The run also sets optim.alpha_p=3.0, predictor.eps=0.5 off their defaults: a value too large" in msg
    plain = _trainer(tiny_overrides, tmp_path / "plain")
    _poison_loss_at(plain, {1})
    with pytest.raises(TrainingError) as info:
        plain.fit()
    assert "off their defaults" not in str(info.value)
