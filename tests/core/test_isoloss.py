"""IsoLoss (method.isoloss): the z-gradient against the authors' cosine formula and against dL/dp computed apart,
the loss value unchanged, W_p's eigenmodes no longer scaling the gradient, and the refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from directpred.config import ConfigError, load_config
from directpred.heads import DirectPred
from directpred.losses import isoloss_prediction, negative_cosine, two_view_loss
from directpred.methods import build_method
from directpred.methods.siamese import Encoder, Siamese


def _spd(d: int, seed: int) -> torch.Tensor:
    """A random symmetric positive definite W_p (float64) with spread eigenvalues, as DirectPred's are."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(0.05, 1.0, d, dtype=torch.float64)) @ q.T


def _authors_cosine_isoloss(z: torch.Tensor, zt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The cosine IsoLoss as written in the authors' code (paper.md §7, `isoloss_func`), independently of ours:
    sim = z.SG(z_t) / SG(|p| |z_t|) - 1/2 SG(p.z_t / (|p|^3 |z_t|)) |W^(1/2) z|^2 with W^(1/2) from eigh;
    L = -2 mean(sim)."""
    s, u = torch.linalg.eigh(w)
    w_half = u @ torch.diag(s.clamp_min(0).sqrt()) @ u.T
    p = z @ w.T
    pn, tn = p.norm(dim=1), zt.norm(dim=1)
    first = (z * zt.detach()).sum(1) / (pn * tn).detach()
    second = 0.5 * ((p * zt).sum(1) / (pn**3 * tn)).detach() * (z @ w_half.T).pow(2).sum(1)
    return -2 * (first - second).mean()


def test_cosine_gradient_equals_the_authors_isoloss():
    """Our z-gradient (negative cosine of z + SG(W_p z - z)) equals that of the authors' cosine IsoLoss formula."""
    w = _spd(6, 0)
    z = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(10, 6, dtype=torch.float64)
    (ours,) = torch.autograd.grad(negative_cosine(isoloss_prediction(z @ w.T, z), zt), z)
    (theirs,) = torch.autograd.grad(_authors_cosine_isoloss(z, zt, w), z)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    # and it is not the ordinary gradient, which carries the factor W_p^T
    (plain,) = torch.autograd.grad(negative_cosine(z @ w.T, zt), z)
    assert (plain - ours).abs().max() > 1e-3


@pytest.mark.parametrize("loss_name", ["cosine", "euclidean"])
def test_value_unchanged_and_gradient_is_dl_dp(loss_name):
    """The loss value is the ordinary one; the z-gradient is dL/dp at p (p a leaf), i.e. W_p^T left out."""
    w = _spd(5, 1)

    def loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return negative_cosine(p, t) if loss_name == "cosine" else (p - t).pow(2).sum(1).mean()

    z = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(7, 5, dtype=torch.float64)
    p = z @ w.T
    value = loss(isoloss_prediction(p, z), zt)
    (grad_z,) = torch.autograd.grad(value, z)
    p_leaf = p.detach().requires_grad_(True)
    plain = loss(p_leaf, zt)
    (grad_p,) = torch.autograd.grad(plain, p_leaf)
    torch.testing.assert_close(value, plain.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_z, grad_p, rtol=1e-12, atol=1e-12)
    if loss_name == "euclidean":  # the authors' Euclidean IsoLoss: grad_z = 2 (W_p z - z_t) / B
        torch.testing.assert_close(grad_z, 2 * (p.detach() - zt) / z.shape[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_value_is_exactly_the_prediction_in_every_dtype(dtype):
    """The value is p to the last bit, also in half precision (where z + StopGrad(p - z) would round once more: up
    to 4e-3 relative in bf16 for a spread spectrum)."""
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(64, 128, generator=g) * torch.logspace(0, -2, 128)).to(dtype).requires_grad_(True)
    w = torch.diag(torch.logspace(0, -2, 128).sqrt()).to(dtype)
    p = z @ w.T
    q = isoloss_prediction(p, z)
    assert q.dtype == p.dtype and torch.equal(q, p)
    q.float().sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))


def test_every_eigenmode_gets_the_same_rate():
    """Along an eigenvector u_j of W_p the ordinary gradient is p_j times IsoLoss's: the mode-dependent rate that
    IsoLoss removes (Euclidean loss, where the relation is exact)."""
    w = _spd(4, 2)
    s, u = torch.linalg.eigh(w)
    z = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 4, dtype=torch.float64)
    grads = []
    for iso in (False, True):
        p = z @ w.T
        q = isoloss_prediction(p, z) if iso else p
        grads.append(torch.autograd.grad((q - zt).pow(2).sum(), z)[0] @ u)  # in W_p's eigenbasis
    torch.testing.assert_close(grads[0], grads[1] * s, rtol=1e-10, atol=1e-12)


def test_siamese_isoloss_same_loss_and_predictor_state_other_gradient():
    """One BYOL step of a small network with DirectPred: with isoloss the loss and F^/W_p are those of the ordinary
    step (same inputs), the projector's gradient differs, and it equals the gradient through z of dL/dp."""

    def make(isoloss: bool) -> Siamese:
        torch.manual_seed(0)
        enc = Encoder(nn.Sequential(nn.Flatten(), nn.Linear(12, 16)), nn.Linear(16, 8))
        return Siamese(enc, DirectPred(8, rho=0.3, eps=0.1), isoloss=isoloss)

    x1, x2 = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)
    outs, grads = [], []
    for iso in (False, True):
        m = make(iso)
        out = m(x1, x2)
        out.loss.backward()
        outs.append((out, m.predictor.weight.detach().clone(), m.predictor.corr.clone()))
        grads.append(m.encoder.projector.weight.grad.clone())
    (plain, w0, c0), (iso_out, w1, c1) = outs
    torch.testing.assert_close(plain.loss, iso_out.loss)
    torch.testing.assert_close((w0, c0), (w1, c1))
    assert (grads[0] - grads[1]).abs().max() > 1e-4
    # the same gradient from dL/dp applied straight to z (independent route: p as leaves, then z's backward)
    m = make(True)
    out = m(x1, x2)
    p1, p2 = (p.detach().requires_grad_(True) for p in (out.p1, out.p2))
    g1, g2 = torch.autograd.grad(two_view_loss(p1, p2, out.t1, out.t2), (p1, p2))
    torch.autograd.backward([out.z1, out.z2], [g1, g2])
    torch.testing.assert_close(m.encoder.projector.weight.grad, grads[1])


def test_a_trained_predictor_is_refused(tiny_overrides):
    """IsoLoss passes no gradient to W_p: a predictor trained by SGD would silently stay at its initialisation."""
    for sets, what in (
        (["predictor.name=linear"], "predictor.name=linear"),
        (["predictor.name=mlp"], "predictor.name=mlp"),
        (["predictor.name=directpred", "predictor.freq=5"], "predictor.freq=5"),
        (["predictor.name=directcopy", "predictor.freq=2"], "predictor.freq=2"),
        (["predictor.name=optimal", "predictor.freq=3"], "predictor.freq=3"),
    ):
        with pytest.raises(ConfigError, match="method.isoloss") as exc:
            load_config(None, tiny_overrides + ["method.isoloss=true", *sets])
        assert what in str(exc.value) and "method.isoloss=false" in str(exc.value)
    for ok in (["predictor.name=directcopy"], ["predictor.name=optimal"], ["predictor.name=none"]):
        assert build_method(load_config(None, tiny_overrides + ["method.isoloss=true", *ok])).isoloss
    # the partitioned DirectPred sets its cells every freq steps without SGD in between: allowed
    cfg = load_config(None, tiny_overrides + ["method.isoloss=true", "predictor.partitions=2", "predictor.freq=2"])
    assert build_method(cfg).isoloss
    enc = Encoder(nn.Linear(4, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"has trainable parameters \(weight\)"):
        Siamese(enc, DirectPred(4, freq=3), isoloss=True)


def test_training_with_isoloss(tiny_overrides, tmp_path):
    """Through the trainer: the first step's loss is the ordinary run's (same seed, same value by construction), the
    weights it leaves differ (another gradient), and the loss stays finite."""
    from directpred.train.logger import read_metrics
    from directpred.train.loop import Trainer

    losses = {}
    for iso in ("false", "true"):
        cfg = load_config(None, tiny_overrides + [f"method.isoloss={iso}", "train.max_steps=4", "train.seed=3"])
        Trainer(cfg, tmp_path / iso).fit()
        losses[iso] = [r["loss"] for r in read_metrics(tmp_path / iso) if r["kind"] == "train"]
    assert len(losses["true"]) == 4 and all(torch.isfinite(torch.tensor(losses["true"])))
    assert losses["true"][0] == pytest.approx(losses["false"][0], rel=1e-6)
    assert losses["true"][1:] != pytest.approx(losses["false"][1:], rel=1e-6)
