"""Closed-form predictors (DirectPred Eq. 18, DirectCopy) and IsoLoss in the linear model, against independent
computations: scipy's matrix square root, the 1-D ODE the rules reduce to, the reduced model, autograd through the
training code's ``isoloss_prediction``, and minibatch SGD."""

import re

import numpy as np
import pytest
import torch
from scipy.linalg import sqrtm

from directpred.losses import isoloss_prediction
from directpred.theory import (
    GaussianViews,
    closed_form_predictor,
    flow_params,
    integrate,
    linear_field,
    simulate_linear,
    simulate_reduced,
    simulate_sgd,
)
from directpred.theory.dynamics import closed_form_eigenvalues
from directpred.theory.invariants import balance, theorem1_applies, track
from directpred.theory.reduced import (
    ReducedParams,
    closed_form_modes,
    isoloss_fixed_point,
    p_star,
    rhs_closed_form,
)

SIGMA2, ETA = 0.1, 0.02
ISOLOSS_REFUSAL = re.escape(
    "isoloss=True passes no gradient to the predictor (IsoLoss is p.detach() + z - z.detach()), but "
    "predictor_rule='gradient' trains W_p by Eq. 2's gradient; use a predictor set in closed form "
    "(predictor_rule='directpred' or 'directcopy') or isoloss=False"
)
RULES = ["directpred", "directcopy"]


def _psd(rng, n, rank=None):
    A = rng.normal(size=(n, rank or n))
    return A @ A.T / n


def test_directpred_is_the_matrix_square_root_plus_eps_max_s():
    rng = np.random.default_rng(0)
    F = _psd(rng, 5, rank=3)  # rank-deficient: two eigenvalues are 0 up to rounding (clipped, not NaN)
    np.testing.assert_allclose(closed_form_predictor(F, "directpred"), sqrtm(F).real, atol=1e-6)
    s_max = np.linalg.eigvalsh(F).max()
    np.testing.assert_allclose(
        closed_form_predictor(F, "directpred", eps=0.1), sqrtm(F).real + 0.1 * s_max * np.eye(5), atol=1e-6
    )
    np.testing.assert_allclose(closed_form_predictor(F, "directcopy", eps=0.3), F + 0.3 * np.eye(5), atol=1e-12)
    stack = np.stack([_psd(rng, 4) for _ in range(3)])
    batched = closed_form_predictor(stack, "directpred", eps=0.2)
    for k in range(3):
        np.testing.assert_allclose(batched[k], closed_form_predictor(stack[k], "directpred", eps=0.2), atol=1e-12)
    with pytest.raises(ValueError, match="rule must be 'directpred' or 'directcopy', got 'gradient'"):
        closed_form_predictor(F, "gradient")  # type: ignore[arg-type]


def _aligned(rng, s0, n1):
    d = len(s0)
    U, _ = np.linalg.qr(rng.normal(size=(d, d)))
    V, _ = np.linalg.qr(rng.normal(size=(n1, d)))
    return U @ np.diag(np.sqrt(s0)) @ V.T


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("isoloss", [False, True])
def test_full_model_without_ema_follows_the_one_dimensional_law(rule, isoloss):
    """τ ≡ 1, isotropic data, aligned W(0): the eigenvalues of the closed-form W_p of the full model (n1 = 6, n2 = 4)
    follow ṗ = k p Δ (k = 1 DirectPred, 2 DirectCopy; Δ = p(τ − (1+σ²)p) − η, or τ − (1+σ²)p − η with IsoLoss),
    integrated on its own. RK4 at dt = 0.01 on both sides: agreement to ~1e-9."""
    rng = np.random.default_rng(1)
    s0 = np.array([0.002, 0.01, 0.05, 0.2])
    W0 = _aligned(rng, s0, 6)
    kw = dict(alpha_p=1.0, eta=ETA, beta=0.0, dt=0.01, steps=2000, method="rk4", record_every=100)
    full = simulate_linear(
        W0, None, None, np.eye(6), SIGMA2 * np.eye(6), mode="simsiam", **kw, predictor_rule=rule, isoloss=isoloss
    )
    p_full = np.linalg.eigvalsh(full.Wp)
    p0 = np.sort(closed_form_modes(s0, rule, sigma2=SIGMA2))
    np.testing.assert_allclose(p_full[0], p0, atol=1e-12)

    def rhs(t, y, _):
        return rhs_closed_form(y, 1.0, eta=ETA, sigma2=SIGMA2, rule=rule, isoloss=isoloss)

    _, p_ode = integrate(rhs, p0, None, dt=0.01, steps=2000, method="rk4", record_every=100)
    np.testing.assert_allclose(p_full, p_ode, atol=1e-8)
    assert np.abs(p_full[-1] - p0).max() > 0.3  # the dynamics moved


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("isoloss", [False, True])
def test_full_byol_model_matches_the_reduced_closed_form_model(rule, isoloss):
    """BYOL with EMA (W_a(0) = 0: τ_j(0) = 0 per mode): the full model with a closed-form W_p against Eqs. 12-13 with
    p_j = closed_form_modes(s_j), each from its own code path."""
    rng = np.random.default_rng(2)
    s0 = np.array([0.01, 0.05, 0.3])
    W0 = _aligned(rng, s0, 5)
    kw = dict(alpha_p=1.0, eta=ETA, beta=0.5, dt=0.01, steps=1500, method="rk4", record_every=100)
    full = simulate_linear(
        W0, None, np.zeros_like(W0), np.eye(5), SIGMA2 * np.eye(5), **kw, predictor_rule=rule, isoloss=isoloss
    )
    red = simulate_reduced(None, s0, np.zeros(3), sigma2=SIGMA2, **kw, predictor_rule=rule, isoloss=isoloss)
    np.testing.assert_allclose(np.linalg.eigvalsh(full.Wp), np.sort(red.p, axis=1), atol=1e-7)
    np.testing.assert_allclose(
        np.linalg.eigvalsh(full.W @ np.swapaxes(full.W, 1, 2)), np.sort(red.s, axis=1), atol=1e-7
    )
    assert "K" not in red.states  # Theorem 3's K is about a gradient-trained W_p


def test_isoloss_removes_the_collapse_basin_and_the_slow_start():
    """Modes below p*₋ collapse under DirectPred (Eq. 16's basin) and all reach (τ − η)/(1+σ²) with IsoLoss; the
    slowest IsoLoss mode needs less time than the fastest DirectPred mode starting above p*₋ needs."""
    eta = 0.04
    pm, pp = p_star(1.0, eta, SIGMA2)
    p0 = np.array([0.3 * pm, 0.8 * pm, 1.3 * pm, 3 * pm])
    s0 = p0**2 / (1 + SIGMA2)
    kw = dict(alpha_p=1.0, eta=eta, beta=0.0, sigma2=SIGMA2, dt=0.01, steps=6000, ema=False, method="rk4")
    dp = simulate_reduced(None, s0, 0.0, predictor_rule="directpred", **kw)
    iso = simulate_reduced(None, s0, 0.0, predictor_rule="directpred", isoloss=True, **kw)
    np.testing.assert_allclose(dp.p[0], p0, rtol=1e-12)  # on DirectPred's parabola
    assert (np.diff(dp.p[:, :2], axis=0) < 0).all() and (dp.p[-1, :2] < 0.5 * p0[:2]).all()  # below p*₋: collapsing
    assert (np.diff(dp.p[:, 2:], axis=0) >= 0).all()  # above p*₋: growing (to p*₊, where it stops)
    np.testing.assert_allclose(dp.p[-1, 3], pp, rtol=1e-3)
    np.testing.assert_allclose(iso.p[-1], isoloss_fixed_point(1.0, eta, SIGMA2), rtol=1e-6)
    t90_iso = max(iso.t[np.argmax(iso.p[:, j] > 0.9 * iso.p[-1, j])] for j in range(4))
    t90_dp = dp.t[np.argmax(dp.p[:, 2] > 0.9 * pp)]
    assert t90_iso < 0.5 * t90_dp


@pytest.mark.parametrize("rule", ["directpred", "gradient"])
def test_isoloss_field_is_autograd_through_the_training_codes_isoloss_prediction(rule):
    """The theory's field is the exact minibatch gradient of J = ½ E‖p − SG(W_a x2)‖² with p computed by
    ``directpred.losses.isoloss_prediction`` (the training code), for W and for W_p, and without it the chain rule's
    W_pᵀ comes back. A gradient-trained W_p is a leaf of the graph: without IsoLoss dW_p is autograd's −∂J/∂W_p
    (Eq. 2); through ``isoloss_prediction`` W_p gets no gradient, so a field that still trained it by Eq. 2 would be
    another model: the theory refuses that combination, and any combination it accepts must match autograd."""
    rng = np.random.default_rng(3)
    n1, n2, B = 6, 4, 64
    W, Wa = rng.normal(size=(n2, n1)), rng.normal(size=(n2, n1))
    x1, x2 = rng.normal(size=(B, n1)), rng.normal(size=(B, n1))
    S11 = x1.T @ x1 / B
    eps = 0.1 if rule != "gradient" else 0.0
    Wp = closed_form_predictor(W @ S11 @ W.T, rule, eps=eps) if rule != "gradient" else rng.normal(size=(n2, n2))
    base = flow_params(np.eye(n1), np.zeros((n1, n1)), alpha_p=1.0, eta=0.0, beta=0.0)
    for iso in (False, True):
        Wt = torch.tensor(W, requires_grad=True)
        Wpt = torch.tensor(Wp, requires_grad=rule == "gradient")
        z = torch.tensor(x1) @ Wt.T
        pred = Wpt @ z.T
        p = isoloss_prediction(pred.T, z) if iso else pred.T
        loss = 0.5 * ((p - torch.tensor(x2 @ Wa.T)) ** 2).sum(dim=1).mean()
        loss.backward()
        grad_Wp = np.zeros_like(Wp) if Wpt.grad is None else Wpt.grad.numpy()
        if rule == "gradient":
            assert (Wpt.grad is None) is iso  # IsoLoss passes W_p no gradient at all
        fields = {
            **base.__dict__,
            "S11": S11,
            "S21": x2.T @ x1 / B,
            "S22": x2.T @ x2 / B,
            "predictor_rule": rule,
            "eps": eps,
            "isoloss": iso,
        }
        try:
            params = base.__class__(**fields)
        except ValueError as e:  # refused: only IsoLoss with a gradient-trained W_p, for the reason above
            assert re.fullmatch(ISOLOSS_REFUSAL, str(e)) and rule == "gradient" and iso
            continue
        # accepted: the field must be autograd's (before the refusal, this failed for the gradient rule with IsoLoss,
        # whose dW_p = −R Wᵀ is not the zero autograd gives)
        dW, dWp, _ = linear_field(W, Wp if rule == "gradient" else np.eye(n2), Wa, params)
        np.testing.assert_allclose(-dW, Wt.grad.numpy(), atol=1e-12)
        np.testing.assert_allclose(-dWp, grad_Wp, atol=1e-12)  # a closed-form W_p: both zero
        assert bool(dWp.any()) is (rule == "gradient")


def test_sgd_with_a_closed_form_predictor_approaches_the_flow_as_the_batch_grows():
    rng = np.random.default_rng(4)
    W0 = 0.3 * rng.normal(size=(4, 6))
    data = GaussianViews(np.eye(6), SIGMA2 * np.eye(6))
    kw = dict(alpha_p=1.0, eta=ETA, beta=0.5, steps=400, record_every=100, predictor_rule="directpred", isoloss=True)
    flow = simulate_linear(W0, None, None, data.X, data.Xp, dt=0.01, **kw)
    gaps = []
    for batch in (32, 2048):
        sgd = simulate_sgd(W0, None, None, data, lr=0.01, batch=batch, rho=0.3, **kw)
        gaps.append(np.linalg.norm(sgd.W[-1] - flow.W[-1]) / np.linalg.norm(flow.W[-1]))
        # the recorded W_p is the rule applied to an estimate: symmetric, and its eigenvalues are >= 0
        assert np.allclose(sgd.Wp, np.swapaxes(sgd.Wp, 1, 2)) and np.linalg.eigvalsh(sgd.Wp).min() >= -1e-12
    assert gaps[1] < 0.3 * gaps[0] and gaps[1] < 0.01
    assert sgd.params["rho"] == 0.3 and sgd.params["predictor_rule"] == "directpred"


def test_theorem1_is_claimed_only_for_a_gradient_trained_predictor():
    """Theorem 1's balance W_pᵀW_p − α_p WWᵀ = e^{−2ηt}C holds along a gradient-trained W_p (W's gradient through
    W_pᵀ) and ``theorem1_applies`` says so; with a closed-form W_p, with or without IsoLoss (which comes only with a
    closed-form W_p, as it gives W_p no gradient), it is not claimed, and a record with ``isoloss`` is not either."""
    rng = np.random.default_rng(5)
    W, Wp, Wa = 0.5 * rng.normal(size=(3, 5)), 0.5 * rng.normal(size=(3, 3)), 0.5 * rng.normal(size=(3, 5))
    kw = dict(alpha_p=1.0, eta=0.0, beta=0.5, dt=0.01, steps=500, method="rk4", record_every=500)
    tr = simulate_linear(W, Wp, Wa, np.eye(5), 0.2 * np.eye(5), **kw)
    B = balance(tr.W, tr.Wp, 1.0)
    assert np.linalg.norm(B[-1] - B[0]) < 1e-6 and theorem1_applies(tr.params)
    for iso in (False, True):
        closed = simulate_linear(
            W, None, None, np.eye(5), 0.2 * np.eye(5), predictor_rule="directcopy", isoloss=iso, **kw
        )
        assert not theorem1_applies(closed.params)
        assert np.isfinite(track(closed)["commutator"]).all()
    assert not theorem1_applies({**tr.params, "isoloss": True})


def test_isoloss_with_a_gradient_trained_predictor_is_refused():
    """IsoLoss (the training code's ``isoloss_prediction``) gives W_p no gradient, and the trainer refuses it with a
    trained predictor; the theory refuses ``isoloss=True`` with ``predictor_rule="gradient"`` in the full model,
    SGD, the reduced model and their parameter records (it trained W_p by Eq. 2 anyway). A W_p fixed to I
    (``predictor=False``), where IsoLoss changes nothing, and closed-form rules are accepted."""
    W, X = np.ones((2, 3)), np.eye(3)
    kw = dict(alpha_p=1, eta=0, beta=0)
    with pytest.raises(ValueError, match=ISOLOSS_REFUSAL):
        simulate_linear(W, np.eye(2), None, X, X, dt=0.1, steps=1, isoloss=True, **kw)
    with pytest.raises(ValueError, match=ISOLOSS_REFUSAL):
        simulate_sgd(W, np.eye(2), None, GaussianViews(X, X), lr=0.1, steps=1, batch=4, isoloss=True, **kw)
    with pytest.raises(ValueError, match=ISOLOSS_REFUSAL):
        simulate_reduced([0.1], [0.01], 0.0, sigma2=0.1, dt=0.1, steps=1, isoloss=True, **kw)
    with pytest.raises(ValueError, match=ISOLOSS_REFUSAL):
        flow_params(X, X, isoloss=True, **kw)
    with pytest.raises(ValueError, match=ISOLOSS_REFUSAL):
        ReducedParams(1.0, 0.0, 0.0, 0.1, True, 1, isoloss=True)
    rng = np.random.default_rng(6)
    W = rng.normal(size=(2, 3))
    run = dict(dt=0.01, steps=50, predictor=False, mode="simsiam", **kw)
    same = [simulate_linear(W, None, None, X, 0.1 * X, isoloss=iso, **run).W for iso in (False, True)]
    np.testing.assert_array_equal(*same)  # W_p = I: IsoLoss's gradient is the usual one
    red = simulate_reduced(
        None, [0.01], 0.0, sigma2=0.1, dt=0.1, steps=1, predictor_rule="directpred", isoloss=True, **kw
    )
    assert red.params["isoloss"] is True


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(predictor_rule="sgd"), "predictor_rule must be one of gradient, directpred, directcopy, got 'sgd'"),
        (dict(predictor_rule="directpred", predictor=False), "predictor=False fixes W_p = I; drop one of them"),
        (dict(eps=0.1), "eps=0.1 is the closed-form predictor's ε and a gradient-trained W_p has none"),
        (dict(predictor_rule="directpred", eps=-0.1), "eps must be a finite number >= 0, got -0.1"),
        (dict(isoloss=True, stop_gradient=False, mode="simsiam"), "isoloss=True is defined with a stop-gradient"),
    ],
)
def test_impossible_settings_are_refused(kw, msg):
    W = np.ones((2, 3))
    with pytest.raises(ValueError, match=msg):
        simulate_linear(W, np.eye(2), None, np.eye(3), np.eye(3), alpha_p=1, eta=0, beta=0, dt=0.1, steps=1, **kw)
    if "predictor" not in kw and "stop_gradient" not in kw:  # the same rules in the SGD simulation
        with pytest.raises(ValueError, match=msg):
            simulate_sgd(
                W,
                np.eye(2),
                None,
                GaussianViews(np.eye(3), np.eye(3)),
                alpha_p=1,
                eta=0,
                beta=0,
                lr=0.1,
                steps=1,
                batch=4,
                **kw,
            )
    data = GaussianViews(np.eye(3), np.eye(3))
    with pytest.raises(ValueError, match="rho=0.5 is the closed-form predictor's F̂ rate"):
        simulate_sgd(W, np.eye(2), None, data, alpha_p=1, eta=0, beta=0, lr=0.1, steps=1, batch=4, rho=0.5)
    with pytest.raises(ValueError, match="eps=0.1 is the closed-form predictor's ε and a gradient-trained"):
        simulate_reduced([0.1], [0.1], 0.0, alpha_p=1, eta=0, beta=0, sigma2=0.1, dt=0.1, steps=1, eps=0.1)
    with pytest.raises(ValueError, match="p0 is required with predictor_rule='gradient'"):
        simulate_reduced(None, [0.1], 0.0, alpha_p=1, eta=0, beta=0, sigma2=0.1, dt=0.1, steps=1)


def test_negative_eigenvalues_count_as_zero_for_both_rules():
    """Both rules clip F's eigenvalues at 0, as closed_form_eigenvalues (the reduced model's path) does; DirectCopy
    returned F + εI unclipped, [-0.9, 2.1] here against the eigenvalue rule's [0.1, 2.1]."""
    F = np.diag([-1.0, 2.0])
    for rule, eps in (("directcopy", 0.1), ("directpred", 0.1)):
        expected = closed_form_eigenvalues(np.linalg.eigvalsh(F), rule, eps)
        np.testing.assert_allclose(np.linalg.eigvalsh(closed_form_predictor(F, rule, eps)), expected, atol=1e-12)
    np.testing.assert_allclose(np.diag(closed_form_predictor(F, "directcopy", 0.1)), [0.1, 2.1], atol=1e-12)
