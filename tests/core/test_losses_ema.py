"""Losses (pure functions) and the EMA target rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from directpred.losses import negative_cosine, two_view_loss
from directpred.methods.ema import ema_momentum, ema_update


def test_negative_cosine_equals_mse_of_normalised_vectors():
    p, t = torch.randn(32, 16), torch.randn(32, 16)
    mse = ((F.normalize(p, dim=1) - F.normalize(t, dim=1)) ** 2).sum(1).mean()
    torch.testing.assert_close(negative_cosine(p, t), mse, rtol=1e-5, atol=1e-6)
    assert negative_cosine(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)
    assert negative_cosine(p, -p).item() == pytest.approx(4.0, abs=1e-5)


def test_two_view_loss_sums_both_directions():
    p1, p2, t1, t2 = (torch.randn(8, 4) for _ in range(4))
    sym = two_view_loss(p1, p2, t1, t2)
    torch.testing.assert_close(sym, negative_cosine(p1, t2) + negative_cosine(p2, t1))
    torch.testing.assert_close(two_view_loss(p1, p2, t1, t2, symmetric=False), negative_cosine(p1, t2))


def test_stop_gradient_blocks_target_gradient():
    p1, p2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    t1, t2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    two_view_loss(p1, p2, t1, t2).backward()
    assert t1.grad is None and t2.grad is None and p1.grad is not None
    two_view_loss(p1, p2, t1, t2, stop_gradient=False).backward()
    assert t1.grad is not None and t1.grad.abs().sum() > 0


def test_ema_update_formula_and_buffers_copied():
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    online(torch.randn(10, 4))  # moves the online running stats
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    torch.testing.assert_close(target[1].running_mean, online[1].running_mean)


def test_ema_momentum_schedules():
    assert ema_momentum(123, 1000, 0.996) == 0.996
    assert ema_momentum(0, 1000, 0.996, "cosine") == pytest.approx(0.996)
    assert ema_momentum(1000, 1000, 0.996, "cosine") == pytest.approx(1.0)
    assert ema_momentum(500, 1000, 0.99, "cosine") == pytest.approx(1 - 0.01 * (math.cos(math.pi / 2) + 1) / 2)
    with pytest.raises(ValueError):
        ema_momentum(0, 10, 0.9, "linear")


@pytest.mark.parametrize("t_shape", [(1, 16), (16,), (8, 16)])
def test_negative_cosine_rejects_targets_that_would_broadcast(t_shape):
    # A (1, d) target would broadcast against (B, d) predictions and give a loss, silently the wrong one.
    p = torch.randn(8, 16)
    t = torch.randn(*t_shape) if t_shape != (8, 16) else torch.randn(8, 15)
    with pytest.raises(ValueError, match=r"must have the same shape \(B, d\)"):
        negative_cosine(p, t)
    with pytest.raises(ValueError, match="same shape"):
        two_view_loss(p, p, p, t)


def test_negative_cosine_keeps_float64_and_passes_gradcheck():
    # A float64 check of the loss (gradcheck, a comparison with the theory) must not be rounded to float32.
    p = torch.tensor([[1.0, 1e-9]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    loss = negative_cosine(p, t)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(1e-18, rel=1e-3)  # 2 - 2 cos(theta) = theta^2 for theta = 1e-9
    assert negative_cosine(p.half(), t.half()).dtype == torch.float32
    x, y = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: negative_cosine(a, y), (x,))


@pytest.mark.parametrize("m", [1.5, -0.1, float("nan")])
def test_ema_update_rejects_a_momentum_outside_0_1(m):
    # m = 1.5 extrapolated the target away from both networks without a word.
    target, online = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = target.weight.detach().clone()
    with pytest.raises(ValueError, match=r"EMA momentum=.* must lie in \[0, 1\] \(method.ema\)"):
        ema_update(target, online, m)
    assert torch.equal(target.weight, before)
    ema_update(target, online, 1.0)  # the end of BYOL's cosine schedule: the target stays
    assert torch.equal(target.weight, before)


def test_negative_cosine_refuses_an_empty_batch():
    """The mean over no rows returned NaN, which a caller would only notice as a diverged loss."""
    p = torch.randn(0, 16)
    with pytest.raises(ValueError) as info:
        negative_cosine(p, p.clone())
    assert str(info.value) == (
        "negative_cosine: an empty batch, predictions and targets of shape (0, 16): the mean over no rows is NaN; "
        "give at least one row"
    )
    with pytest.raises(ValueError, match=r"an empty batch, .* of shape \(0, 16\)"):
        two_view_loss(p, p, p, p)
    assert negative_cosine(torch.eye(1, 16), -torch.eye(1, 16)).item() == 4.0  # one row is a batch
