"""Optimiser groups (alpha_p, predictor weight decay), LARS and the learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from directpred.config import load_config
from directpred.methods import build_method
from directpred.train.optim import LARS, build_optimizer, lr_factor, set_lr


def test_predictor_group_has_alpha_p_and_its_own_weight_decay():
    cfg = load_config(
        None,
        [
            "backbone.width=4",
            "predictor.name=linear",
            "optim.alpha_p=10",
            "optim.predictor_weight_decay=0",
            "optim.lr=0.05",
        ],
    )
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
    opt = LARS(
        [dict(params=[w], lars_exclude=False), dict(params=[b], lars_exclude=True, weight_decay=0.0)],
        lr=0.1,
        momentum=0.9,
        weight_decay=0.01,
        trust_coefficient=0.001,
    )
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


def test_lars_through_the_builder_groups_and_first_step():
    """optim.name=lars: weights adapted with weight decay, biases and BatchNorm excluded (BYOL), the predictor's
    groups at alpha_p * lr with its own weight decay; the first step equals the formula computed here."""
    cfg = load_config(
        None,
        [
            "backbone.width=4",
            "predictor.name=linear",
            "predictor.bias=true",
            "optim.name=lars",
            "optim.lr=0.2",
            "optim.alpha_p=2",
            "optim.predictor_weight_decay=0.01",
            "optim.lars_eta=0.02",
        ],
    )
    m = build_method(cfg)
    opt = build_optimizer(cfg.optim, m.online.encoder, m.online.predictor)
    assert isinstance(opt, LARS)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"trunk", "trunk_bias_bn", "predictor", "predictor_bias_bn"}
    assert all(p.ndim > 1 for p in groups["trunk"]["params"] + groups["predictor"]["params"])
    assert all(p.ndim <= 1 for p in groups["trunk_bias_bn"]["params"] + groups["predictor_bias_bn"]["params"])
    assert [(groups[n]["lr"], groups[n]["weight_decay"], groups[n]["lars_exclude"]) for n in sorted(groups)] == [
        pytest.approx((0.4, 0.01, False)),
        pytest.approx((0.4, 0.0, True)),
        pytest.approx((0.2, 4e-4, False)),
        pytest.approx((0.2, 0.0, True)),
    ]
    g = torch.Generator().manual_seed(0)
    expected = {}
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g)
            d = p.grad.double()
            if not group["lars_exclude"]:
                d = d + group["weight_decay"] * p.detach().double()
                d = d * (0.02 * p.detach().double().norm() / d.norm())
            expected[p] = p.detach().double() - group["lr"] * d
    opt.step()
    for p, want in expected.items():
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-7)
