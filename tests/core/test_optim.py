"""Optimiser groups (alpha_p, predictor weight decay), LARS and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from directpred.config import load_config
from directpred.methods import build_method
from directpred.train.optim import LARS, build_optimizer, lr_factor, set_lr


def test_predictor_group_has_alpha_p_and_its_own_weight_decay():
    cfg = load_config(None, ["backbone.width=4", "predictor.name=linear", "optim.alpha_p=10",
                             "optim.predictor_weight_decay=0", "optim.lr=0.05"])
    m = build_method(cfg)
    opt = build_optimizer(cfg.optim, m.online.encoder, m.online.predictor)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["trunk"]["lr"] == pytest.approx(0.05) and groups["predictor"]["lr"] == pytest.approx(0.5)
    assert groups["trunk"]["weight_decay"] == 4e-4 and groups["predictor"]["weight_decay"] == 0
    set_lr(opt, 0.05, 0.5)
    assert groups["predictor"]["lr"] == pytest.approx(0.25)
    n_trunk = sum(p.numel() for p in m.online.encoder.parameters())
    assert sum(p.numel() for p in groups["trunk"]["params"]) == n_trunk


def test_directpred_freq1_weight_is_not_optimised():
    cfg = load_config(None, ["backbone.width=4"])
    m = build_method(cfg)
    opt = build_optimizer(cfg.optim, m.online.encoder, m.online.predictor)
    assert all(g["name"] != "predictor" for g in opt.param_groups)  # set from F^ every step instead


def test_lars_step_matches_formula():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS([dict(params=[w], lars_exclude=False), dict(params=[b], lars_exclude=True, weight_decay=0.0)],
               lr=0.1, momentum=0.9, weight_decay=0.01, trust_coefficient=0.001)
    w.grad, b.grad = torch.tensor([0.0, 1.0]), torch.tensor([2.0])
    opt.step()
    d = torch.tensor([0.0, 1.0]) + 0.01 * torch.tensor([3.0, 4.0])
    expected = torch.tensor([3.0, 4.0]) - 0.1 * 0.001 * 5.0 / d.norm() * d
    torch.testing.assert_close(w.detach(), expected)
    torch.testing.assert_close(b.detach(), torch.tensor([1.0 - 0.1 * 2.0]))  # excluded: plain SGD


def test_schedules():
    assert lr_factor(0, 100, 0, "constant") == 1.0
    assert lr_factor(4, 100, 10, "constant") == pytest.approx(0.5)
    assert lr_factor(9, 100, 10, "warmup_cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "warmup_cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, 10, "warmup_cosine") == pytest.approx(0.0, abs=1e-12)
