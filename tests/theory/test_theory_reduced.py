"""Per-mode dynamics, Eqs. 11-16: fixed points, their stability, the threshold, and the integral of motion."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from directpred.theory import (
    eta_threshold,
    fixed_points,
    integral_of_motion,
    jacobian_ps,
    p_star,
    parabola_constant,
    rhs_parabola,
    rhs_ps,
    simulate_reduced,
)
from directpred.theory.reduced import isoloss_fixed_point, rhs_parabola_dp

taus = st.floats(0.2, 2.0)
sig2 = st.floats(0.0, 1.0)
alphas = st.floats(0.2, 5.0)


def _fd_jacobian(p, s, tau, **kw):
    h = 1e-6
    J = np.zeros((2, 2))
    for k, (dp, ds) in enumerate([(h, 0.0), (0.0, h)]):
        plus = np.array(rhs_ps(p + dp, s + ds, tau, **kw))
        minus = np.array(rhs_ps(p - dp, s - ds, tau, **kw))
        J[:, k] = (plus - minus) / (2 * h)
    return J


@settings(max_examples=60, deadline=None)
@given(tau=taus, sigma2=sig2, alpha_p=alphas, frac=st.floats(0.02, 0.98))
def test_fixed_points_below_threshold_zeros_and_stability(tau, sigma2, alpha_p, frac):
    """0 < η < τ²/4(1+σ²): p = 0 and p*₊ stable, p*₋ unstable, in Eq. 16 and in the (p, s) system Eqs.
    11-12."""
    eta = frac * eta_threshold(tau, sigma2)
    kw = dict(alpha_p=alpha_p, eta=eta, sigma2=sigma2)
    pm, pp = p_star(tau, eta, sigma2)
    assert 0 < pm < pp
    np.testing.assert_allclose(fixed_points(tau, eta, sigma2), [0.0, pm, pp])
    for p in (0.0, pm, pp):
        s = p**2 / alpha_p  # the fixed points lie on the invariant parabola
        np.testing.assert_allclose(rhs_ps(p, s, tau, **kw), 0.0, atol=1e-12)
        assert abs(rhs_parabola(p, tau, eta, sigma2)) < 1e-12
        J = jacobian_ps(p, s, tau, **kw)
        np.testing.assert_allclose(J, _fd_jacobian(p, s, tau, **kw), rtol=1e-5, atol=1e-7)
    ev = lambda p: np.linalg.eigvals(jacobian_ps(p, p**2 / alpha_p, tau, **kw)).real  # noqa: E731
    assert ev(0.0).max() < 0 and ev(pp).max() < 0  # stable
    assert ev(pm).max() > 0  # unstable (a saddle in the (p, s) plane)
    d1 = [rhs_parabola_dp(p, tau, eta, sigma2) for p in (0.0, pm, pp)]
    assert d1[0] < 0 and d1[1] > 0 and d1[2] < 0
    # the corrected factorisation of Eq. 16 (the Fig. 4 caption omits the (1+σ²))
    q = np.linspace(-0.5, 2, 7)
    np.testing.assert_allclose(rhs_parabola(q, tau, eta, sigma2), -(1 + sigma2) * q * (q - pm) * (q - pp), atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(tau=st.floats(0.01, 3.0), sigma2=st.floats(0.0, 2.0))
def test_at_the_threshold_the_double_root_remains(tau, sigma2):
    """At η = τ²/(4(1+σ²)) Eq. 16 has the double root τ/(2(1+σ²)) (the interval is closed). The discriminant
    rounded to ±1e-17: p_star returned (nan, nan) (in 5 % of random (τ, σ²)) or two roots 1e-9 apart."""
    eta = eta_threshold(tau, sigma2)
    double = tau / (2 * (1 + sigma2))
    np.testing.assert_allclose(p_star(tau, eta, sigma2), (double, double), rtol=1e-6)
    np.testing.assert_allclose(fixed_points(tau, eta, sigma2), [0.0, double], rtol=1e-6)


@settings(max_examples=40, deadline=None)
@given(tau=taus, sigma2=sig2, alpha_p=alphas, factor=st.floats(1.01, 10.0))
def test_beyond_threshold_only_collapse(tau, sigma2, alpha_p, factor):
    eta = factor * eta_threshold(tau, sigma2)
    assert np.all(np.isnan(p_star(tau, eta, sigma2)))
    np.testing.assert_array_equal(fixed_points(tau, eta, sigma2), [0.0])
    assert np.linalg.eigvals(jacobian_ps(0.0, 0.0, tau, alpha_p=alpha_p, eta=eta, sigma2=sigma2)).real.max() < 0
    q = np.linspace(1e-3, 3, 200)
    assert np.all(rhs_parabola(q, tau, eta, sigma2) < 0)  # every p > 0 flows to 0


def test_basins_on_the_invariant_parabola():
    """Start on s = p²/α_p slightly above / below p*₋ (SimSiam, τ ≡ 1): converge to p*₊ / to collapse."""
    sigma2, eta, alpha_p = 0.1, 0.1, 2.0
    pm, pp = p_star(1.0, eta, sigma2)
    kw = dict(alpha_p=alpha_p, eta=eta, beta=0.0, sigma2=sigma2, dt=0.05, steps=6000, ema=False, record_every=6000)
    up = simulate_reduced(1.05 * pm, (1.05 * pm) ** 2 / alpha_p, 1.0, **kw)
    down = simulate_reduced(0.95 * pm, (0.95 * pm) ** 2 / alpha_p, 1.0, **kw)
    assert abs(up.p[-1, 0] - pp) < 1e-3 and abs(up.s[-1, 0] - pp**2 / alpha_p) < 1e-3
    assert down.p[-1, 0] < 1e-2 * pm and down.s[-1, 0] < 1e-4


def test_collapse_basin_grows_with_eta_and_shrinks_with_tau():
    """Obs. #4 and #10 (App. B.2): p*₋ increases with η and decreases with τ."""
    etas = np.linspace(0.001, 0.2, 20)
    pm = [p_star(1.0, e, 0.1)[0] for e in etas]
    assert np.all(np.diff(pm) > 0)
    tau = np.linspace(0.7, 2.0, 20)
    pm_tau = [p_star(t, 0.1, 0.1)[0] for t in tau]
    assert np.all(np.diff(pm_tau) < 0)


@pytest.mark.parametrize("ema", [True, False])
def test_integral_of_motion_eq14(ema):
    """s_j − p_j²/α_p − e^{−2ηt}c_j = 0 with the corrected c_j = s_j(0) − p_j²(0)/α_p, for any τ(t).

    RK4 at dt = 0.01: residual O(dt⁴); 1e-8 is the bound. The main-text sign of c_j would give a residual of
    2e^{−2ηt}|c_j| instead, which the last assert rules out.
    """
    p0, s0 = np.array([0.5, 0.2, -0.1]), np.array([0.3, 0.6, 0.05])
    tr = simulate_reduced(
        p0,
        s0,
        0.1,
        alpha_p=1.3,
        eta=0.05,
        beta=0.4,
        sigma2=0.3,
        dt=0.01,
        steps=2000,
        ema=ema,
        method="rk4",
        record_every=100,
    )
    res = integral_of_motion(tr.t, tr.p, tr.s, alpha_p=1.3, eta=0.05)
    assert np.abs(res).max() < 1e-8
    c_wrong = -parabola_constant(p0, s0, 1.3)
    wrong = tr.s - tr.p**2 / 1.3 - np.exp(-0.1 * tr.t)[:, None] * c_wrong
    assert np.abs(wrong).max() > 0.1


def test_no_weight_decay_stays_on_parabola_and_reaches_p_equals_tau_over_lambda():
    """η = 0, τ ≡ 1, start above the parabola: s = p²/α_p + c_j forever and p → τ/(1+σ²) (non-collapsed)."""
    alpha_p, sigma2 = 1.0, 0.25
    tr = simulate_reduced(
        0.1,
        0.2,
        1.0,
        alpha_p=alpha_p,
        eta=0.0,
        beta=0.0,
        sigma2=sigma2,
        dt=0.01,
        steps=3000,
        ema=False,
        method="rk4",
        record_every=3000,
    )
    c = 0.2 - 0.01
    np.testing.assert_allclose(tr.s[-1, 0], tr.p[-1, 0] ** 2 / alpha_p + c, atol=1e-9)
    np.testing.assert_allclose(tr.p[-1, 0], 1 / (1 + sigma2), atol=1e-4)


def test_ema_tau_converges_to_one_at_the_non_collapsed_fixed_point():
    """With EMA, at a non-collapsed fixed point ṡ = 0 so Eq. 13 gives τ → 1 (Obs. #8's curriculum ends
    there)."""
    tr = simulate_reduced(
        [0.4, 0.3],
        [0.5, 0.4],
        0.0,
        alpha_p=1.0,
        eta=0.04,
        beta=0.4,
        sigma2=0.1,
        dt=0.01,
        steps=20000,
        record_every=20000,
    )
    pm, pp = p_star(1.0, 0.04, 0.1)
    np.testing.assert_allclose(tr.tau[-1, 0], 1.0, atol=1e-3)
    np.testing.assert_allclose(tr.p[-1], pp, atol=1e-3)
    assert np.all(tr.K[-1] > 0)


def test_reduced_rejects_bad_input():
    with pytest.raises(ValueError, match="dt"):
        simulate_reduced(0.1, 0.1, 0.0, alpha_p=1, eta=0, beta=0, sigma2=0, dt=-1, steps=1)
    with pytest.raises(ValueError, match="eta"):
        simulate_reduced(0.1, 0.1, 0.0, alpha_p=1, eta=-0.1, beta=0, sigma2=0, dt=0.1, steps=1)
    with pytest.raises(ValueError, match="s0"):
        simulate_reduced(0.1, -0.1, 0.0, alpha_p=1, eta=0, beta=0, sigma2=0, dt=0.1, steps=1)


def test_matrix_flow_rejects_bad_input():
    # alpha_p <= 0 and eta < 0 ran silently (W_p frozen, or growing weights); shapes failed in a reshape, and an
    # asymmetric F0 (no correlation matrix) gave a meaningless flow.
    from directpred.theory import simulate_matrix

    kw = dict(tau=1.0, alpha_p=1.0, eta=0.0, sigma2=0.0, dt=0.1, steps=2)
    I2 = np.eye(2)
    for bad, match in [
        (dict(alpha_p=0.0), r"need alpha_p > 0, eta >= 0, sigma2 >= 0, finite tau; got 0.0, 0.0, 0.0, 1.0"),
        (dict(eta=-0.1), "got 1.0, -0.1, 0.0, 1.0"),
        (dict(sigma2=-1.0), "sigma2 >= 0"),
        (dict(tau=float("nan")), "finite tau"),
    ]:
        with pytest.raises(ValueError, match=match):
            simulate_matrix(I2, I2, **{**kw, **bad})
    with pytest.raises(ValueError, match=r"square matrices of one shape \(n, n\), got \(1, 2\) and \(2, 2\)"):
        simulate_matrix(I2[:1], I2, **kw)
    with pytest.raises(ValueError, match=r"got \(2, 2\) and \(3, 3\)"):
        simulate_matrix(I2, np.eye(3), **kw)
    with pytest.raises(ValueError, match="F0 is a correlation F = W X Wᵀ and must be symmetric"):
        simulate_matrix(I2, np.array([[1.0, 2.0], [0.0, 1.0]]), **kw)
    # F = W X Wᵀ computed in floating point (symmetric up to rounding) is accepted
    W = np.random.default_rng(0).normal(size=(3, 5))
    F0 = W @ np.diag(np.linspace(1, 2, 5)) @ W.T
    assert simulate_matrix(np.eye(3), F0, **kw).F.shape == (3, 3, 3)


def test_symmetric_matrix_flow_rejects_a_non_symmetric_predictor():
    """Eq. 7 (``symmetric=True``) is the flow of a symmetric W_p. From a non-symmetric Wp0 it integrated neither
    Eq. 7 nor Eq. 62: W_p's skew part only decayed by η, and F = W X Wᵀ turned non-symmetric (35 % of ‖F‖ at t = 10
    with the start below). Refused, naming the argument and both fixes; Eq. 62 still takes it."""
    from directpred.theory import simulate_matrix

    rng = np.random.default_rng(0)
    Wp0, H = 0.3 * rng.normal(size=(4, 4)), rng.normal(size=(4, 4))
    F0 = 0.1 * H @ H.T / 4
    kw = dict(tau=1.0, alpha_p=1.0, eta=0.01, sigma2=0.1, dt=0.01, steps=10)
    msg = (
        r"^Wp0 is not symmetric, but symmetric=True integrates Eq\. 7, the flow of a symmetric W_p \(Assumption 3\); "
        r"pass a symmetric Wp0 \(e\.g\. \(Wp0 \+ Wp0\.T\) / 2\) or symmetric=False for the asymmetric flow, Eq\. 62$"
    )
    with pytest.raises(ValueError, match=msg):
        simulate_matrix(Wp0, F0, **kw)
    sym = simulate_matrix((Wp0 + Wp0.T) / 2, F0, **kw)  # the suggested fix: stays symmetric, as Eq. 7 promises
    np.testing.assert_allclose(sym.F, np.swapaxes(sym.F, 1, 2), rtol=0, atol=1e-15)  # up to rounding
    np.testing.assert_allclose(sym.Wp, np.swapaxes(sym.Wp, 1, 2), rtol=0, atol=1e-15)
    assert simulate_matrix(Wp0, F0, symmetric=False, **kw).Wp.shape == (11, 4, 4)
    # a symmetric W_p computed in floating point (symmetric up to rounding) is accepted
    A = rng.normal(size=(4, 3))
    assert simulate_matrix(A @ np.diag([1.0, 2.0, 3.0]) @ A.T, F0, **kw).Wp.shape == (11, 4, 4)


def test_reduced_rejects_a_tau0_of_another_shape_and_non_finite_starts():
    # A (1, d) tau0 failed inside numpy's concatenate; a NaN p0 ran and returned a NaN trajectory.
    kw = dict(alpha_p=1, eta=0.0, beta=0.1, sigma2=0.0, dt=0.1, steps=2)
    with pytest.raises(ValueError, match=r"tau0 must be a scalar or have shape \(2,\), got \(1, 2\)"):
        simulate_reduced([0.5, 0.1], [0.5, 0.1], [[0.1, 0.2]], **kw)
    with pytest.raises(ValueError, match="p0, s0 and tau0 must be finite"):
        simulate_reduced([float("nan")], [0.5], 0.0, **kw)
    with pytest.raises(ValueError, match="p0, s0 and tau0 must be finite"):
        simulate_reduced([0.5], [0.5], float("inf"), **kw)
    assert simulate_reduced([0.5, 0.1], [0.5, 0.1], [0.1, 0.2], **kw).tau.shape == (3, 2)


@pytest.mark.parametrize("sigma2", [-1.0, -3.0, -0.5, float("nan"), float("inf")])
@pytest.mark.parametrize("fn", ["p_star", "eta_threshold", "fixed_points"])
def test_threshold_and_fixed_points_refuse_a_sigma2_that_is_no_variance(fn, sigma2):
    """sigma2 = -1 divided by zero (ZeroDivisionError, or inf from numpy); below -1 the threshold came out negative
    and p* flipped sign, answers about a system that cannot arise."""
    call = {
        "p_star": lambda: p_star(1.0, 0.1, sigma2),
        "eta_threshold": lambda: eta_threshold(1.0, sigma2),
        "fixed_points": lambda: fixed_points(1.0, 0.1, sigma2),
    }[fn]
    where = "eta_threshold" if fn == "eta_threshold" else "p_star"
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == (
        f"{where}: sigma2 (the augmentation variance σ²) must be a finite number >= 0, got {sigma2!r}"
    )


@pytest.mark.parametrize("eta", [-0.01, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("fn", ["p_star", "fixed_points", "isoloss_fixed_point"])
def test_fixed_points_refuse_a_weight_decay_that_simulate_reduced_refuses(fn, eta):
    """A negative weight decay gave a negative "fixed point" p*₋ (p_star(1, -0.1, 0.1) = (-0.09, 1.0)), where
    simulate_reduced refuses eta < 0."""
    call = {
        "p_star": lambda: p_star(1.0, eta, 0.1),
        "fixed_points": lambda: fixed_points(1.0, eta, 0.1),
        "isoloss_fixed_point": lambda: isoloss_fixed_point(1.0, eta, 0.1),
    }[fn]
    where = "isoloss_fixed_point" if fn == "isoloss_fixed_point" else "p_star"
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value) == f"{where}: eta (the weight decay η) must be a finite number >= 0, got {eta!r}"
    if eta < 0:
        with pytest.raises(ValueError, match="eta >= 0"):
            simulate_reduced([0.5], [0.5], 0.0, alpha_p=1.0, eta=eta, beta=0.4, sigma2=0.1, dt=0.1, steps=2)
    assert p_star(1.0, 0.0, 0.1) == (0.0, 1.0 / 1.1) and fixed_points(1.0, 0.0, 0.1).tolist() == [0.0, 1.0 / 1.1]
