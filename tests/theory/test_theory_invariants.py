"""Theorem 3 (commutator dynamics and decay), alignment, the EMA ratio, and the matrix flows Eq. 7 / Eq.
62."""

import numpy as np

from directpred.theory import (
    K_matrix,
    alignment,
    commutator,
    commutator_norm,
    ema_ratio,
    flow_params,
    linear_field,
    simulate_linear,
    simulate_matrix,
    simulate_reduced,
)
from directpred.theory.reduced import MatrixParams, matrix_field


def _sym(rng, n, scale=1.0):
    A = rng.normal(size=(n, n)) * scale
    return 0.5 * (A + A.T)


def test_commutator_ode_along_full_symmetric_simsiam():
    """SimSiam + symmetric Wp + isotropic data obeys Eq. 7 with τ = 1, so d/dt[F,Wp] = −([F,Wp]K + K[F,Wp])
    with F = WWᵀ (Theorem 3), checked exactly (chain rule, no time stepping) at a random state."""
    rng = np.random.default_rng(0)
    n1, n2, sigma2, eta, alpha_p = 5, 4, 0.3, 0.05, 1.7
    W, Wp = rng.normal(size=(n2, n1)), _sym(rng, n2)
    p = flow_params(np.eye(n1), sigma2 * np.eye(n1), alpha_p=alpha_p, eta=eta, beta=0.0, mode="simsiam", symmetric=True)
    dW, dWp, _ = linear_field(W, Wp, W, p)
    F = W @ W.T
    dF = dW @ W.T + W @ dW.T
    L = commutator(F, Wp)
    dL = commutator(dF, Wp) + commutator(F, dWp)
    K = K_matrix(F, Wp, tau=1.0, alpha_p=alpha_p, eta=eta, sigma2=sigma2)
    np.testing.assert_allclose(dL, -(L @ K + K @ L), rtol=1e-10, atol=1e-12)
    # and the matrix flow of Eq. 7 gives the same (Wp, F) derivatives
    mWp, mF = matrix_field(Wp, F, MatrixParams(alpha_p, eta, sigma2, 1.0, n2, True))
    np.testing.assert_allclose(mWp, dWp, atol=1e-12)
    np.testing.assert_allclose(mF, dF, atol=1e-12)


def test_commutator_decays_when_K_stays_positive_definite():
    """If λ_min K(t) ≥ λ0 > 0 along the run, ‖[F,Wp](t)‖ ≤ e^{−2λ0 t}‖[F,Wp](0)‖ (Theorem 3, inf_t form).

    RK4 at dt = 0.01 on Eq. 7 (error ~1e-9 relative); the bound is checked with a 1e-6 relative slack.
    """
    rng = np.random.default_rng(1)
    n, tau, sigma2, eta, alpha_p = 4, 0.5, 0.2, 0.2, 2.0
    Wp0 = _sym(rng, n, 0.3) + 0.5 * np.eye(n)
    A = rng.normal(size=(n, n))
    F0 = A @ A.T / n + 0.5 * np.eye(n)
    tr = simulate_matrix(
        Wp0,
        F0,
        tau=tau,
        alpha_p=alpha_p,
        eta=eta,
        sigma2=sigma2,
        dt=0.01,
        steps=1000,
        method="rk4",
        record_every=10,
    )
    K = K_matrix(tr.F, tr.Wp, tau=tau, alpha_p=alpha_p, eta=eta, sigma2=sigma2)
    lam0 = np.linalg.eigvalsh(K).min()
    assert lam0 > 0
    c = commutator_norm(tr.F, tr.Wp)
    assert c[0] > 0.1
    assert np.all(c <= np.exp(-2 * lam0 * tr.t) * c[0] * (1 + 1e-6) + 1e-12)
    assert c[-1] < 1e-3 * c[0]
    assert np.abs(alignment(tr.F[-1], tr.Wp[-1]) - 1).max() < 1e-3  # eigenspaces aligned


def test_commutator_can_grow_when_K_is_indefinite():
    """The converse direction of Fig. 9: no weight decay, large τ, small F: K < 0 somewhere and ‖[F,Wp]‖
    grows."""
    rng = np.random.default_rng(2)
    n, tau = 4, 2.0
    Wp0 = _sym(rng, n, 0.2) + (tau / 2) * np.eye(n)
    F0 = 1e-3 * (np.eye(n) + _sym(rng, n, 0.3))
    tr = simulate_matrix(Wp0, F0, tau=tau, alpha_p=1.0, eta=0.0, sigma2=0.0, dt=0.01, steps=300, method="rk4")
    K0 = K_matrix(F0, Wp0, tau=tau, alpha_p=1.0, eta=0.0, sigma2=0.0)
    assert np.linalg.eigvalsh(K0).min() < 0
    c = commutator_norm(tr.F, tr.Wp)
    assert c.max() > 10 * c[0]


def test_eq7_aligned_matches_reduced_simsiam():
    """Eq. 7 with commuting (Wp, F) and τ = 1 is Eqs. 11-12 per mode (SimSiam, τ ≡ 1)."""
    rng = np.random.default_rng(3)
    U, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    p0, s0 = np.array([0.7, 0.2, 0.05]), np.array([0.5, 0.3, 0.1])
    kw = dict(alpha_p=1.0, eta=0.02, sigma2=0.1, dt=0.01, steps=800, method="rk4", record_every=100)
    m = simulate_matrix(U @ np.diag(p0) @ U.T, U @ np.diag(s0) @ U.T, tau=1.0, **kw)
    r = simulate_reduced(p0, s0, 1.0, beta=0.0, ema=False, **kw)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(m.Wp), 1), np.sort(r.p, 1), atol=1e-9)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(m.F), 1), np.sort(r.s, 1), atol=1e-9)


def test_eq62_preserves_F_equals_WpT_Wp_over_alpha_p():
    """Fig. 8's setting: F = WpᵀWp/α_p (Theorem 1 with C = 0) is invariant under the asymmetric flow Eq.
    62."""
    rng = np.random.default_rng(4)
    alpha_p = 1.5
    Wp0 = 0.5 * rng.normal(size=(3, 3)) + 0.5 * np.eye(3)
    tr = simulate_matrix(
        Wp0,
        Wp0.T @ Wp0 / alpha_p,
        tau=0.8,
        alpha_p=alpha_p,
        eta=0.01,
        sigma2=0.1,
        dt=0.01,
        steps=1000,
        symmetric=False,
        method="rk4",
        record_every=100,
    )
    pred = np.swapaxes(tr.Wp, 1, 2) @ tr.Wp / alpha_p
    np.testing.assert_allclose(tr.F, pred, atol=1e-8)
    assert np.abs(tr.Wp[-1] - Wp0).max() > 0.05


def test_alignment_values():
    rng = np.random.default_rng(5)
    U, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    F = U @ np.diag([3.0, 2.0, 1.0]) @ U.T
    np.testing.assert_allclose(alignment(F, U @ np.diag([0.5, 2.0, 1.0]) @ U.T), 1.0, atol=1e-12)
    np.testing.assert_allclose(alignment(F, U @ np.diag([0.5, -2.0, 1.0]) @ U.T), [1, -1, 1], atol=1e-12)
    th = 0.3
    R = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    np.testing.assert_allclose(alignment(np.diag([2.0, 1.0]), R), np.cos(th), atol=1e-12)


def test_ema_ratio_and_fig7_assumption():
    """Wa = τW gives (τ, 1); in the full BYOL flow from Wa(0) = 0 the correlation rises close to 1 (App.
    B)."""
    rng = np.random.default_rng(6)
    W = rng.normal(size=(3, 4))
    tau, corr = ema_ratio(W, 0.4 * W)
    np.testing.assert_allclose([tau, corr], [0.4, 1.0])
    tr = simulate_linear(
        0.3 * W,
        np.eye(3) * 0.1 + 0.1 * rng.normal(size=(3, 3)),
        np.zeros_like(W),
        np.eye(4),
        9e-4 * np.eye(4),
        alpha_p=1.0,
        eta=0.01,
        beta=0.4,
        dt=0.01,
        steps=5000,
        record_every=500,
    )
    _, c = ema_ratio(tr.W, tr.Wa)
    assert c[-1] > 0.9


def test_track_says_where_theorem_1_applies():
    """theorem1_applies() marks the runs that meet Theorem 1's assumptions: with them the balance follows its
    prediction; with a symmetrised predictor it does not, and the summary figure leaves the prediction out."""
    from directpred.theory import theorem1_applies, track

    rng = np.random.default_rng(1)
    n1, n2 = 4, 3
    W, Wp = rng.normal(size=(n2, n1)) * 0.5, rng.normal(size=(n2, n2)) * 0.5
    kw = dict(alpha_p=1.5, eta=0.05, beta=0.5, dt=1e-3, steps=2000, method="rk4", record_every=100)
    trajs = {sym: simulate_linear(W, Wp, W.copy(), np.eye(n1), 0.2 * np.eye(n1), symmetric=sym, **kw) for sym in (0, 1)}
    runs = {sym: track(tr) for sym, tr in trajs.items()}
    assert theorem1_applies(trajs[0].params) and not theorem1_applies(trajs[1].params)
    assert runs[0]["balance_error"].max() < 1e-6 * runs[0]["balance"][0]
    assert runs[1]["balance_error"].max() > 1e-2 * runs[1]["balance"][0]


def test_track_of_a_reduced_or_matrix_trajectory_says_what_it_needs():
    # It raised KeyError('X').
    import pytest

    from directpred.theory import track

    red = simulate_reduced([0.5], [0.5], 0.0, alpha_p=1, eta=0.0, beta=0.1, sigma2=0.0, dt=0.01, steps=2)
    with pytest.raises(ValueError, match=r"track needs a linear-model trajectory .* got a 'reduced' one with states"):
        track(red)
    mat = simulate_matrix(np.eye(2), np.eye(2), tau=1.0, alpha_p=1.0, eta=0.0, sigma2=0.0, dt=0.1, steps=2)
    with pytest.raises(ValueError, match=r"got a 'matrix' one with states \['F', 'Wp'\]"):
        track(mat)
