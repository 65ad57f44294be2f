"""Full linear model, Eqs. 2-4: Theorem 1, Theorem 2, the no-predictor collapse, and the reduction to Eqs.
11-13."""

import numpy as np
import pytest
from scipy.linalg import expm

from directpred.theory import flow_params, linear_field, simulate_linear, simulate_reduced
from directpred.theory.invariants import balance


def _spd(rng, n, lo=0.2):
    Q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (Q * rng.uniform(lo, 1.5, n)) @ Q.T


def _init(rng, n2, n1, scale=0.5):
    return (
        scale * rng.normal(size=(n2, n1)),
        scale * rng.normal(size=(n2, n2)),
        scale * rng.normal(size=(n2, n1)),
    )


@pytest.mark.parametrize("mode", ["byol", "simsiam"])
@pytest.mark.parametrize("eta", [0.0, 0.1])
@pytest.mark.parametrize("alpha_p", [0.5, 1.0, 3.0])
def test_theorem1_balance_rk4(mode, eta, alpha_p):
    """WpᵀWp − α_p WWᵀ = e^{−2ηt}(same at 0) for any X, X', Wa (Theorem 1, with the α_p⁻¹ of its proof).

    RK4 at dt = 0.01 has global error O(dt⁴) ≈ 1e-8 relative, so 1e-6 leaves margin but catches any O(dt)
    slip.
    """
    rng = np.random.default_rng(1)
    n1, n2 = 5, 3
    W, Wp, Wa = _init(rng, n2, n1)
    X, Xp = _spd(rng, n1), 0.3 * _spd(rng, n1)
    tr = simulate_linear(
        W,
        Wp,
        Wa,
        X,
        Xp,
        alpha_p=alpha_p,
        eta=eta,
        beta=0.7,
        dt=0.01,
        steps=400,
        mode=mode,
        method="rk4",
        record_every=50,
    )
    B = balance(tr.W, tr.Wp, alpha_p)
    pred = np.exp(-2 * eta * tr.t)[:, None, None] * B[0]
    scale = np.abs(B[0]).max()
    assert np.abs(B - pred).max() < 1e-6 * scale
    # the trajectory actually moved, so the check is not vacuous
    assert np.abs(tr.W[-1] - tr.W[0]).max() > 0.05


def test_theorem1_euler_error_is_first_order():
    """Euler (dt = learning rate α) breaks the identity only at O(dt): halving dt halves the error."""
    rng = np.random.default_rng(2)
    W, Wp, Wa = _init(rng, 3, 4)
    X, Xp = _spd(rng, 4), 0.2 * np.eye(4)
    errs = []
    for dt in (0.02, 0.01, 0.005):
        tr = simulate_linear(W, Wp, Wa, X, Xp, alpha_p=2.0, eta=0.05, beta=0.5, dt=dt, steps=int(round(2 / dt)))
        B = balance(tr.W, tr.Wp, 2.0)
        errs.append(np.abs(B[-1] - np.exp(-2 * 0.05 * tr.t[-1]) * B[0]).max())
    r1, r2 = errs[0] / errs[1], errs[1] / errs[2]
    assert 1.7 < r1 < 2.3 and 1.7 < r2 < 2.3, errs


def test_theorem2_vector_field_is_minus_H_vecW():
    """Without stop-gradient (SimSiam), d vec(W)/dt = −H vec(W), H = X'⊗(WpᵀWp+I) + X⊗W̃pᵀW̃p + ηI (Eq. 6)."""
    rng = np.random.default_rng(3)
    n1, n2, eta = 4, 3, 0.07
    W, Wp, _ = _init(rng, n2, n1)
    X, Xp = _spd(rng, n1), 0.3 * _spd(rng, n1)
    p = flow_params(X, Xp, alpha_p=1.0, eta=eta, beta=0.0, mode="simsiam", stop_gradient=False)
    dW, _, _ = linear_field(W, Wp, W, p)
    Wt = Wp - np.eye(n2)
    H = np.kron(Xp, Wp.T @ Wp + np.eye(n2)) + np.kron(X, Wt.T @ Wt) + eta * np.eye(n1 * n2)
    np.testing.assert_allclose(dW.ravel(order="F"), -H @ W.ravel(order="F"), rtol=1e-12, atol=1e-12)
    assert np.linalg.eigvalsh(H).min() > 0


def test_theorem2_no_stop_gradient_collapses_but_stop_gradient_does_not():
    rng = np.random.default_rng(4)
    n1, n2 = 4, 4
    W, Wp, _ = _init(rng, n2, n1, scale=0.7)
    Wp = np.eye(n2) + 0.3 * rng.normal(size=(n2, n2))
    X, Xp = np.eye(n1), 0.1 * np.eye(n1)
    kw = dict(alpha_p=1.0, eta=0.0, beta=0.0, dt=0.01, steps=3000, mode="simsiam", record_every=100)
    no_sg = simulate_linear(W, Wp, None, X, Xp, stop_gradient=False, **kw)
    sg = simulate_linear(W, Wp, None, X, Xp, stop_gradient=True, **kw)
    nW = np.linalg.norm(no_sg.W, axis=(1, 2))
    assert nW[-1] < 0.05 * nW[0]
    assert np.all(np.diff(nW) <= 1e-12)  # Lyapunov V = ½‖W‖² decreases (Lemma 2)
    assert np.linalg.norm(sg.W[-1]) > 0.5 * nW[0]


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_no_predictor_collapse_matches_closed_form(stop_gradient):
    """Wp = I, Wa = W: Ẇ = −W(X' + ηI) with stop-gradient, −W(2X' + ηI) without; both → 0."""
    rng = np.random.default_rng(5)
    n1, n2, eta = 4, 3, 0.02
    W = rng.normal(size=(n2, n1))
    X, Xp = _spd(rng, n1), 0.5 * _spd(rng, n1)
    tr = simulate_linear(
        W,
        None,
        None,
        X,
        Xp,
        alpha_p=1.0,
        eta=eta,
        beta=0.0,
        dt=0.01,
        steps=1000,
        mode="simsiam",
        predictor=False,
        stop_gradient=stop_gradient,
        method="rk4",
    )
    A = (1 if stop_gradient else 2) * Xp + eta * np.eye(n1)
    np.testing.assert_allclose(tr.W[-1], W @ expm(-A * tr.t[-1]), rtol=1e-7, atol=1e-10)
    np.testing.assert_array_equal(tr.Wp[-1], np.eye(n2))
    long = simulate_linear(
        W,
        None,
        None,
        X,
        Xp,
        alpha_p=1.0,
        eta=eta,
        beta=0.0,
        dt=0.05,
        steps=4000,
        mode="simsiam",
        predictor=False,
        stop_gradient=stop_gradient,
        record_every=4000,
    )
    assert np.linalg.norm(long.W[-1]) < 1e-3 * np.linalg.norm(W)


def _aligned_init(rng, p0, s0, tau0, n1):
    d = len(p0)
    U, _ = np.linalg.qr(rng.normal(size=(d, d)))
    V, _ = np.linalg.qr(rng.normal(size=(n1, d)))
    W = U @ np.diag(np.sqrt(s0)) @ V.T
    Wp = U @ np.diag(p0) @ U.T
    Wa = U @ np.diag(np.asarray(tau0) * np.sqrt(s0)) @ V.T
    return W, Wp, Wa


@pytest.mark.parametrize("mode", ["byol", "simsiam"])
def test_full_model_matches_reduced_per_mode(mode):
    """Isotropic data (X = I, X' = σ²I) and aligned init: the eigenvalues of Wp and F = WWᵀ follow Eqs. 11-13.

    For BYOL each mode keeps its own τ_j = (Wa/W)_j, so the reduced model is run with per-mode τ_j. Both
    use RK4
    at dt = 0.01 (error O(dt⁴)), so the two must agree to ~1e-8; 1e-6 is the bound.
    """
    rng = np.random.default_rng(6)
    p0, s0, tau0 = np.array([0.6, 0.3, 0.1]), np.array([0.9, 0.4, 0.2]), np.array([0.2, 0.5, 0.8])
    sigma2, n1 = 0.2, 5
    W, Wp, Wa = _aligned_init(rng, p0, s0, tau0, n1)
    kw = dict(alpha_p=1.5, eta=0.02, beta=0.6, dt=0.01, steps=1500, method="rk4", record_every=100)
    full = simulate_linear(W, Wp, Wa, np.eye(n1), sigma2 * np.eye(n1), mode=mode, **kw)
    red = simulate_reduced(p0, s0, tau0, sigma2=sigma2, ema=(mode == "byol"), **kw)
    p_full = np.sort(np.linalg.eigvalsh(0.5 * (full.Wp + np.swapaxes(full.Wp, 1, 2))), axis=1)
    s_full = np.sort(np.linalg.eigvalsh(full.W @ np.swapaxes(full.W, 1, 2)), axis=1)
    np.testing.assert_allclose(p_full, np.sort(red.p, axis=1), atol=1e-6)
    np.testing.assert_allclose(s_full, np.sort(red.s, axis=1), atol=1e-6)
    assert np.abs(red.p[-1] - p0).max() > 0.1  # dynamics happened
    assert np.abs(full.Wp - np.swapaxes(full.Wp, 1, 2)).max() < 1e-10  # stays symmetric without symmetrising


def test_single_mode_shared_tau_matches_full_byol():
    """n2 = 1: the shared-τ Eq. 13 is exact and τ = Wa/W."""
    rng = np.random.default_rng(7)
    n1 = 3
    v = rng.normal(size=(1, n1))
    v /= np.linalg.norm(v)
    W, Wp, Wa = 0.8 * v, np.array([[0.2]]), 0.0 * v
    kw = dict(alpha_p=1.0, eta=0.04, beta=0.4, dt=0.01, steps=2000, method="rk4", record_every=200)
    full = simulate_linear(W, Wp, Wa, np.eye(n1), 0.1 * np.eye(n1), **kw)
    red = simulate_reduced(0.2, 0.64, 0.0, sigma2=0.1, **kw)
    np.testing.assert_allclose(full.Wp[:, 0, 0], red.p[:, 0], atol=1e-7)
    np.testing.assert_allclose(np.sum(full.W**2, axis=(1, 2)), red.s[:, 0], atol=1e-7)
    np.testing.assert_allclose((full.Wa / full.W)[:, 0, 0][1:], red.tau[1:, 0], atol=1e-6)


def test_symmetric_switch_keeps_wp_symmetric_and_batched_runs_are_independent():
    rng = np.random.default_rng(8)
    Ws = rng.normal(size=(3, 2, 4))
    Wps = rng.normal(size=(3, 2, 2))
    kw = dict(alpha_p=1.0, eta=0.01, beta=0.5, dt=0.01, steps=200, symmetric=True, record_every=200)
    X, Xp = np.eye(4), 0.1 * np.eye(4)
    batched = simulate_linear(Ws, Wps, np.zeros_like(Ws), X, Xp, **kw)
    assert np.abs(batched.Wp - np.swapaxes(batched.Wp, -1, -2)).max() < 1e-14
    for r in range(3):
        single = simulate_linear(Ws[r], Wps[r], np.zeros((2, 4)), X, Xp, **kw)
        np.testing.assert_allclose(batched.W[:, r], single.W, rtol=1e-12, atol=1e-14)


def test_invalid_arguments_fail_clearly():
    W, X = np.ones((2, 3)), np.eye(3)
    kw = dict(alpha_p=1.0, eta=0.0, beta=0.1, dt=0.01, steps=10)
    with pytest.raises(ValueError, match="stop_gradient"):
        simulate_linear(W, np.eye(2), W, X, X, stop_gradient=False, **kw)
    with pytest.raises(ValueError, match="dt"):
        simulate_linear(W, np.eye(2), W, X, X, **{**kw, "dt": 0.0})
    with pytest.raises(ValueError, match="eta"):
        simulate_linear(W, np.eye(2), W, X, X, **{**kw, "eta": -1.0})
    with pytest.raises(ValueError, match="steps"):
        simulate_linear(W, np.eye(2), W, X, X, **{**kw, "steps": 0})
