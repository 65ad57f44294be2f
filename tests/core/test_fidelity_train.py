"""When W_p is set (predictor.update_at), the optimal predictor in training, the paper configs' authors' settings,
and the final collapse verdict, on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from directpred.config import load_config
from directpred.data.order import epoch_order
from directpred.train.loop import Trainer

REPO = Path(__file__).resolve().parents[2]
PAPER_CONFIGS = sorted([*(REPO / "configs" / "cifar10").glob("*.yaml"), *(REPO / "configs" / "stl10").glob("*.yaml")])


def _directpred_matrix(F: np.ndarray, eps: float = 0.1) -> np.ndarray:
    s, U = np.linalg.eigh(F)
    s = np.clip(s, 0, None)
    p = np.clip(np.sqrt(s / s.max()) + eps, 1e-4, None)
    return U @ np.diag(p) @ U.T


def _run_steps(trainer: Trainer, n: int) -> tuple[list[torch.Tensor], list[np.ndarray], list[torch.Tensor]]:
    """Run n steps; return the W_p each step predicted with, each step's (2B, d) projections and W_p after it."""
    used: list[torch.Tensor] = []
    pred = trainer.method.predictor
    handle = pred.register_forward_pre_hook(lambda m, args: used.append(m.weight.detach().clone()))
    order = epoch_order(len(trainer.data.pretrain), trainer.cfg.train.seed, 0)
    zs, after = [], []
    for t in range(n):
        out = trainer.train_step(trainer._batch(order, t)).out
        zs.append(torch.cat([out.z1, out.z2]).detach().double().numpy())
        after.append(pred.weight.detach().clone())
    handle.remove()
    return used[::2], zs, after  # the predictor is called once per view


@pytest.mark.parametrize("update_at", ["forward", "after_step"])
def test_wp_of_step_t_comes_from_F_hat_up_to_t_or_t_minus_1(update_at, tiny_overrides, tmp_path):
    """forward: step t predicts with the DirectPred matrix of F^ over steps <= t; after_step (the authors' order):
    over steps < t (the initial W_p = I at step 0)."""
    cfg = load_config(None, tiny_overrides + ["train.epochs=1", f"predictor.update_at={update_at}"])
    trainer = Trainer(cfg, tmp_path / "run").setup()
    used, zs, _ = _run_steps(trainer, 4)
    F, Fs = None, []
    for z in zs:  # Eq. 19, rho = 0.3, computed independently in float64
        term = z.T @ z / len(z)
        F = term if F is None else 0.3 * F + 0.7 * term
        Fs.append(F)
    for t in range(4):
        if update_at == "forward":
            expected = _directpred_matrix(Fs[t])
        else:
            expected = np.eye(F.shape[0]) if t == 0 else _directpred_matrix(Fs[t - 1])
        np.testing.assert_allclose(used[t].double().numpy(), expected, atol=2e-4, err_msg=f"step {t}")
    # After the last step F^ holds every step's projections in both modes.
    np.testing.assert_allclose(trainer.method.predictor.corr.double().numpy(), Fs[-1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["directcopy", "optimal"])
def test_after_step_also_defers_other_statistic_predictors(name, tiny_overrides, tmp_path):
    """after_step: step 0 predicts with the initial W_p = I, step t+1 with the W_p set after step t, and F^ after
    step t holds exactly the projections of steps <= t."""
    over = tiny_overrides + ["train.epochs=1", f"predictor.name={name}", "predictor.update_at=after_step"]
    trainer = Trainer(load_config(None, over), tmp_path / "run").setup()
    used, zs, after = _run_steps(trainer, 3)
    assert torch.equal(used[0], torch.eye(used[0].shape[0]))
    for t in range(2):
        assert torch.equal(used[t + 1], after[t]) and not torch.equal(after[t], used[t])
    F = None
    for z in zs:
        term = z.T @ z / len(z)
        F = term if F is None else 0.3 * F + 0.7 * term
    np.testing.assert_allclose(trainer.method.predictor.corr.double().numpy(), F, rtol=1e-4, atol=1e-5)
    if name == "directcopy":  # W_p = F^ / ||F^||_2 + eps I of the F^ after the last step
        expected = F / np.linalg.eigvalsh(F).max() + 0.1 * np.eye(len(F))
        np.testing.assert_allclose(after[-1].double().numpy(), expected, atol=1e-5)


@pytest.mark.parametrize(
    "extra",
    [
        ["predictor.update_at=after_step"],
        ["predictor.update_at=after_step", "predictor.partitions=3"],
        ["predictor.update_at=after_step", "predictor.name=optimal", "predictor.rho=0"],
    ],
)
def test_after_step_resume_is_bit_identical(extra, tiny_overrides, tmp_path):
    """Stopped at step 5 (inside epoch 1 of 2; freq=2, so the hybrid's SGD steps on W_p count) and resumed: the
    same final state as an uninterrupted run."""
    from directpred.cli import main

    common = tiny_overrides + ["predictor.freq=2", "train.epochs=2", *extra]
    Trainer(load_config(None, common), tmp_path / "full").fit()
    Trainer(load_config(None, common + ["train.max_steps=5"]), tmp_path / "part").fit()
    assert main(["train", "--resume", str(tmp_path / "part"), "--set", "train.max_steps=0"]) == 0
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"


def test_optimal_predictor_trains_and_stays_finite(tiny_overrides, tmp_path):
    for update_at, method in (("after_step", "byol"), ("forward", "simsiam")):
        over = tiny_overrides + [
            "predictor.name=optimal",
            "predictor.freq=2",
            f"predictor.update_at={update_at}",
            f"method.name={method}",
            "train.max_steps=6",
        ]
        summary = Trainer(load_config(None, over), tmp_path / f"{update_at}_{method}").fit()
        assert summary["steps"] == 6
        state = torch.load(tmp_path / f"{update_at}_{method}" / "checkpoints" / "last.pt", weights_only=False)
        W = state["model"]["online.predictor.weight"]
        assert torch.isfinite(W).all() and not torch.equal(W, torch.eye(W.shape[0]))
        assert int(state["model"]["online.predictor.count"]) == 6
        rows = [json.loads(x) for x in (tmp_path / f"{update_at}_{method}" / "metrics.jsonl").read_text().splitlines()]
        assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")


@pytest.mark.parametrize("path", PAPER_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_paper_configs_follow_the_authors(path):
    """The authors' code initialises the target independently and sets W_p after the optimiser step
    (``regulate_predictor``), except in its partition mode, whose ``update()`` folds the batch into the cells and
    predicts with their matrices in the same forward pass (luckmatters ``byol_trainer.py``)."""
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    assert raw.get("method", {}).get("target_init") == "random" and cfg.method.target_init == "random"
    if cfg.predictor.name in ("directpred", "directcopy", "optimal"):
        order = "forward" if cfg.predictor.partitions else "after_step"
        assert raw["predictor"].get("update_at") == order and cfg.predictor.update_at == order


@pytest.mark.parametrize("target_init", ["copy", "random"])
def test_target_init_copy_or_independent_and_the_ema_step(target_init, tiny_overrides, tmp_path):
    """``method.target_init``: ``copy`` starts the target equal to the online encoder, ``random`` (the authors'
    code) from an independent draw; either way a step moves it to m * target + (1 - m) * online."""
    over = tiny_overrides + [f"method.target_init={target_init}", "train.max_steps=1", "method.ema=0.9"]
    trainer = Trainer(load_config(None, over), tmp_path / "run").setup()
    target0 = {n: p.detach().clone() for n, p in trainer.method.target.named_parameters()}
    online0 = dict(trainer.method.online.encoder.named_parameters())
    assert target0.keys() == online0.keys() and not any(p.requires_grad for p in trainer.method.target.parameters())
    weights = [n for n, p in target0.items() if p.ndim > 1]
    same = [torch.equal(target0[n], online0[n].detach()) for n in weights]
    assert all(same) if target_init == "copy" else not any(same)
    order = epoch_order(len(trainer.data.pretrain), trainer.cfg.train.seed, 0)
    trainer.train_step(trainer._batch(order, 0))
    for n, p in trainer.method.target.named_parameters():
        torch.testing.assert_close(p.detach(), 0.9 * target0[n] + 0.1 * online0[n].detach(), rtol=1e-5, atol=1e-6)
