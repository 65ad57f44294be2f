"""Reduced dynamics under Assumptions 1-3: per-eigenmode Eqs. 11-13, fixed points, and the matrix flow Eq. 7.

Notation: ``lam = 1 + σ²`` (``sigma2`` = σ², isotropic augmentation variance), ``p_j`` and ``s_j`` are the
eigenvalues of ``Wp`` and ``F = W X Wᵀ`` in their common eigenbasis, ``tau`` is the EMA ratio ``Wa = τ W``
(Assumption 1). Corrections to typos in the paper (see ``docs/theory.md``):

* the integration constant of Eq. 14 is ``c_j = s_j(0) − α_p⁻¹ p_j²(0)`` (the main text flips the sign);
* Eq. 16 factorises as ``−(1+σ²) p (p − p*₋)(p − p*₊)`` (the Fig. 4 caption drops the ``(1+σ²)``);
* Theorem 3 needs ``inf_t λ_min K(t) > 0`` (the appendix says max_t).

Over 300 lines: the reduced system (Eqs. 11-16), its fixed points and the matrix flows it is derived from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from directpred.theory.dynamics import (
    Method,
    PredictorRule,
    Trajectory,
    check_isoloss,
    check_predictor_rule,
    check_run_args,
    closed_form_eigenvalues,
    integrate,
    sym,
)

Array = np.ndarray


# ----------------------------------------------------------------------------------------------------
# Per-mode dynamics, Eqs. 11-13
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReducedParams:
    """Parameters of Eqs. 11-13.

    Attributes:
        alpha_p: Predictor learning-rate ratio α_p.
        eta: Weight decay η.
        beta: EMA rate β (Eq. 13).
        sigma2: Augmentation variance σ² (``X' = σ² I``).
        ema: ``False`` is SimSiam: τ ≡ 1.
        d: Number of modes.
        shared_tau: One τ for all modes (Eq. 13 summed over modes), else one τ_j per mode.
        predictor_rule: ``"gradient"`` (Eq. 11) or a closed-form rule, ``p_j`` from :func:`closed_form_modes`.
        eps: ε of the closed-form rule.
        isoloss: IsoLoss: Eq. 12 without its factor ``p_j``; only with a closed-form ``predictor_rule`` (IsoLoss
            gives W_p no gradient, so Eq. 11 does not act; :func:`directpred.theory.dynamics.check_isoloss`).
    """

    alpha_p: float
    eta: float
    beta: float
    sigma2: float
    ema: bool
    d: int
    shared_tau: bool = True
    predictor_rule: PredictorRule = "gradient"
    eps: float = 0.0
    isoloss: bool = False

    def __post_init__(self) -> None:
        check_isoloss(self.isoloss, self.predictor_rule)


def rhs_ps(
    p: Array, s: Array, tau: Array | float, *, alpha_p: float, eta: float, sigma2: float, isoloss: bool = False
) -> tuple[Array, Array]:
    """Eqs. 11-12 at given τ, elementwise (vectorised for phase portraits).

    ``ṗ = α_p s [τ − (1+σ²) p] − η p`` (Eq. 11) and ``ṡ = 2 p s [τ − (1+σ²) p] − 2 η s`` (Eq. 12). With
    ``isoloss=True`` the gradient reaching W skips ``Wpᵀ``, which removes Eq. 12's factor ``p``:
    ``ṡ = 2 s [τ − (1+σ²) p] − 2 η s``. The ``ṗ`` returned is always Eq. 11, the gradient-trained predictor's
    rate; IsoLoss gives W_p no gradient, so with ``isoloss=True`` it is not a predictor's rate: the only caller
    that sets it, :func:`rhs_reduced`, has a closed-form rule then and discards ``ṗ`` (``p`` follows ``s``), and
    :func:`simulate_reduced` refuses IsoLoss with ``predictor_rule="gradient"``.
    """
    g = tau - (1.0 + sigma2) * p
    return alpha_p * s * g - eta * p, 2.0 * (1.0 if isoloss else p) * s * g - 2.0 * eta * s


def closed_form_modes(s: Array, rule: PredictorRule, *, eps: float = 0.0, sigma2: float) -> Array:
    """Predictor eigenvalues ``p_j`` of a closed-form rule on aligned modes, from the eigenvalues ``s_j`` of
    ``F = W X Wᵀ`` (last axis: the modes).

    The rule reads the predictor-input correlation ``W (X + X') Wᵀ``, whose eigenvalues are ``(1+σ²) s_j`` for
    isotropic data, so (as :func:`directpred.theory.dynamics.closed_form_predictor`):
    DirectPred (Eq. 18) ``p_j = sqrt((1+σ²) s_j) + ε (1+σ²) max_k s_k``; DirectCopy ``p_j = (1+σ²) s_j + ε``.
    """
    return closed_form_eigenvalues((1.0 + sigma2) * np.asarray(s, dtype=np.float64), rule, eps)


def rhs_closed_form(
    p: Array, tau: Array | float, *, eta: float, sigma2: float, rule: PredictorRule, isoloss: bool = False
) -> Array:
    """``ṗ_j`` of a closed-form predictor with ε = 0: Eq. 12 seen through ``p_j = ((1+σ²) s_j)^α``.

    DirectPred (α = ½) keeps every mode on a parabola ``(1+σ²) s_j = p_j²``, and Eq. 12 becomes
    ``ṗ = p Δ`` with ``Δ = p[τ − (1+σ²)p] − η``: Eq. 16, the dynamics of the gradient-trained predictor on its
    invariant parabola, whatever α_p. DirectCopy (α = 1) runs the same at twice the rate, ``ṗ = 2 p Δ``. With
    IsoLoss, ``Δ`` becomes ``τ − (1+σ²)p − η``: every small mode grows at the same rate ``τ − η`` (instead of at
    ``τ p − η``, which is negative below ``p*₋``), so for τ > η no mode collapses and all go to
    ``p* = (τ − η)/(1+σ²)`` (:func:`isoloss_fixed_point`).
    """
    lam = 1.0 + sigma2
    delta = (tau - lam * p - eta) if isoloss else p * (tau - lam * p) - eta
    if rule == "directpred":
        return p * delta
    if rule == "directcopy":
        return 2.0 * p * delta
    raise ValueError(f"rule must be 'directpred' or 'directcopy', got {rule!r}")


def isoloss_fixed_point(tau: float, eta: float, sigma2: float) -> float:
    """The non-zero fixed point ``p* = (τ − η)/(1+σ²)`` of a closed-form predictor under IsoLoss (ε = 0).

    It is stable and ``p = 0`` unstable when τ > η; when τ <= η it is not positive and every mode collapses.

    Raises:
        ValueError: ``eta`` or ``sigma2`` negative or not finite.
    """
    _check_eta(eta, "isoloss_fixed_point")
    _check_sigma2(sigma2, "isoloss_fixed_point")
    return (tau - eta) / (1.0 + sigma2)


def jacobian_ps(p: float, s: float, tau: float, *, alpha_p: float, eta: float, sigma2: float) -> Array:
    """Jacobian ``∂(ṗ, ṡ)/∂(p, s)`` of Eqs. 11-12 at fixed τ, shape (2, 2)."""
    lam = 1.0 + sigma2
    g = tau - lam * p
    return np.array(
        [[-alpha_p * s * lam - eta, alpha_p * g], [2.0 * s * g - 2.0 * p * s * lam, 2.0 * p * g - 2.0 * eta]]
    )


def tau_rate(p: Array, s: Array, tau: Array, ds: Array, beta: float, shared: bool) -> Array:
    """``τ̇`` from Eq. 13, ``s τ̇ = β(1 − τ) s − τ ṡ/2``.

    With one τ per mode this is Eq. 13 as written. With a shared τ (the multi-mode case), Eq. 13 summed over
    modes: ``τ̇ = β(1 − τ) − τ Σṡ_j / (2 Σs_j)``, which is the rate of the least-squares ratio
    ``τ = ⟨Wa, W⟩ / ‖W‖²`` when ``Wa = τ W`` holds; for one mode both agree.
    """
    if shared:
        S = np.sum(s)
        growth = np.sum(ds) / (2.0 * S) if S > 0 else 0.0
        return np.atleast_1d(beta * (1.0 - tau) - tau * growth)
    with np.errstate(divide="ignore", invalid="ignore"):
        growth = np.where(s > 0, ds / (2.0 * np.where(s > 0, s, 1.0)), 0.0)
    return beta * (1.0 - tau) - tau * growth


def rhs_reduced(t: float, y: Array, params: ReducedParams) -> Array:
    """Eqs. 11-13 on the flat state ``y = [p_1..p_d, s_1..s_d, τ (1 or d entries)]``."""
    d = params.d
    p, s, tau = y[:d], y[d : 2 * d], y[2 * d :]
    tau_eff = tau if params.ema else np.ones_like(tau)
    closed = params.predictor_rule != "gradient"
    if closed:  # the state's p is a placeholder; the rule sets p from s
        p = closed_form_modes(s, params.predictor_rule, eps=params.eps, sigma2=params.sigma2)
    dp, ds = rhs_ps(p, s, tau_eff, alpha_p=params.alpha_p, eta=params.eta, sigma2=params.sigma2, isoloss=params.isoloss)
    if closed:
        dp = np.zeros_like(dp)
    dtau = tau_rate(p, s, tau, ds, params.beta, params.shared_tau) if params.ema else np.zeros_like(tau)
    return np.concatenate([dp, ds, dtau])


def K_mode(p: Array, s: Array, tau: Array | float, *, alpha_p: float, eta: float, sigma2: float) -> Array:
    """Eigenvalue of Theorem 3's K on an aligned mode: ``K_j = (1+σ²)(α_p s_j/2 + p_j²) − τ p_j + 3η/2``."""
    return (1.0 + sigma2) * (alpha_p * s / 2.0 + p**2) - tau * p + 1.5 * eta


def delta_mode(p: Array, tau: Array | float, *, eta: float, sigma2: float) -> Array:
    """``Δ_j = p_j[τ − (1+σ²) p_j] − η`` (§3.3), so that on the invariant parabola ``ṗ_j = p_j Δ_j``."""
    return p * (tau - (1.0 + sigma2) * p) - eta


def simulate_reduced(
    p0: ArrayLike | None,
    s0: ArrayLike,
    tau0: ArrayLike,
    *,
    alpha_p: float,
    eta: float,
    beta: float,
    sigma2: float,
    dt: float,
    steps: int,
    ema: bool = True,
    method: Method = "euler",
    record_every: int = 1,
    predictor_rule: PredictorRule = "gradient",
    eps: float = 0.0,
    isoloss: bool = False,
) -> Trajectory:
    """Simulate the decoupled per-mode dynamics, paper Eqs. 11-13.

    BYOL (``ema=True``) is the 3-D system (p, s, τ) per mode; SimSiam (``ema=False``) fixes τ ≡ 1 and ignores
    ``tau0``. A scalar ``tau0`` means one τ shared by all modes (Eq. 13 summed over modes, see
    :func:`tau_rate`); an array ``tau0`` of length d gives each mode its own τ_j, which is what the full
    linear model with isotropic data and aligned initialisation obeys exactly.

    A closed-form ``predictor_rule`` replaces Eq. 11 by ``p_j`` = :func:`closed_form_modes` of ``s`` (``p0`` is then
    ignored, ``None`` is fine; the recorded ``p0`` is the rule's); ``isoloss=True`` drops Eq. 12's factor ``p_j``
    and needs a closed-form rule (IsoLoss gives W_p no gradient, so Eq. 11 does not act; refused with
    ``"gradient"``).

    Args:
        p0: Initial predictor eigenvalues p_j(0), shape (d,) or scalar.
        s0: Initial eigenvalues s_j(0) of F (>= 0), same shape.
        tau0: Initial τ (scalar, shared) or τ_j (d,).
        alpha_p: Predictor learning-rate ratio α_p (> 0).
        eta: Weight decay η (>= 0).
        beta: EMA rate β (>= 0).
        sigma2: Augmentation variance σ² (>= 0).
        dt: Step size (> 0).
        steps: Number of steps (>= 1).
        ema: ``False`` for SimSiam (τ ≡ 1).
        method: ``"euler"`` or ``"rk4"``.
        record_every: Record every k-th step.
        predictor_rule: ``"gradient"`` (Eq. 11), ``"directpred"`` or ``"directcopy"``.
        eps: ε of the closed-form rule (0 for ``"gradient"``).
        isoloss: IsoLoss's gradient for W; needs a closed-form ``predictor_rule``.

    Returns:
        Trajectory with states ``p`` (T, d), ``s`` (T, d), ``tau`` (T, 1 or d) and, for ``"gradient"`` only,
        ``K`` (T, d), Theorem 3's per-mode eigenvalue (Theorem 3 is about the gradient-trained W_p).

    Examples:
        >>> traj = simulate_reduced([0.5, 0.1], [0.5, 0.1], 0.0, alpha_p=1, eta=0.04, beta=0.4, sigma2=0.1,
        ...                         dt=0.01, steps=100)
        >>> traj.tau.shape
        (101, 1)
    """
    check_run_args(dt, steps, record_every, method)
    if not alpha_p > 0 or not eta >= 0 or not beta >= 0 or not sigma2 >= 0:
        raise ValueError(f"need alpha_p > 0, eta >= 0, beta >= 0, sigma2 >= 0; got {alpha_p}, {eta}, {beta}, {sigma2}")
    check_predictor_rule(predictor_rule, eps)
    check_isoloss(isoloss, predictor_rule)
    closed = predictor_rule != "gradient"
    s0 = np.atleast_1d(np.asarray(s0, dtype=np.float64))
    if closed:  # the rule sets p from s; p0 is not read
        p0 = closed_form_modes(s0, predictor_rule, eps=eps, sigma2=sigma2)
    elif p0 is None:
        raise ValueError("p0 is required with predictor_rule='gradient' (it is only optional for a closed-form rule)")
    p0 = np.atleast_1d(np.asarray(p0, dtype=np.float64))
    if p0.shape != s0.shape or p0.ndim != 1:
        raise ValueError(f"p0 and s0 must be 1-D of equal length, got {p0.shape} and {s0.shape}")
    if not (np.all(np.isfinite(p0)) and np.all(np.isfinite(s0)) and np.all(np.isfinite(tau0))):
        raise ValueError("p0, s0 and tau0 must be finite (NaN or inf make the whole trajectory NaN)")
    if np.any(s0 < 0):
        raise ValueError("s0 are eigenvalues of F = W X Wᵀ and must be >= 0")
    d = p0.size
    shared = np.ndim(tau0) == 0
    tau = np.ones(1 if shared else d) if not ema else np.atleast_1d(np.asarray(tau0, dtype=np.float64))
    if not shared and np.shape(tau0) != (d,):  # a (1, d) array passed a size check and failed in a concatenate
        raise ValueError(f"tau0 must be a scalar or have shape ({d},), got {np.shape(tau0)}")
    params = ReducedParams(
        float(alpha_p),
        float(eta),
        float(beta),
        float(sigma2),
        bool(ema),
        d,
        bool(shared),
        predictor_rule=predictor_rule,
        eps=float(eps),
        isoloss=bool(isoloss),
    )
    t, ys = integrate(
        rhs_reduced,
        np.concatenate([p0, s0, tau]),
        params,
        dt=dt,
        steps=steps,
        method=method,
        record_every=record_every,
    )
    p, s, tau_t = ys[:, :d], ys[:, d : 2 * d], ys[:, 2 * d :]
    states = {"p": p, "s": s, "tau": tau_t}
    if closed:
        states["p"] = closed_form_modes(s, predictor_rule, eps=eps, sigma2=sigma2)
    else:
        states["K"] = K_mode(p, s, tau_t, alpha_p=alpha_p, eta=eta, sigma2=sigma2)
    record = dict(
        model="reduced",
        alpha_p=float(alpha_p),
        eta=float(eta),
        beta=float(beta),
        sigma2=float(sigma2),
        dt=float(dt),
        steps=int(steps),
        ema=bool(ema),
        shared_tau=bool(shared),
        method=method,
        record_every=int(record_every),
        p0=p0,
        s0=s0,
        tau0=np.atleast_1d(tau0),
        predictor_rule=predictor_rule,
        eps=float(eps),
        isoloss=bool(isoloss),
    )
    return Trajectory(t=t, states=states, params=record)


# ----------------------------------------------------------------------------------------------------
# Fixed points, the weight-decay threshold and the invariant parabola (Eqs. 14-16)
# ----------------------------------------------------------------------------------------------------


def _check_sigma2(sigma2: float, where: str) -> None:
    # σ² is a variance: at σ² = -1 the formulas divide by zero, below it the threshold and p* change sign
    if not (np.isfinite(sigma2) and sigma2 >= 0):
        raise ValueError(f"{where}: sigma2 (the augmentation variance σ²) must be a finite number >= 0, got {sigma2!r}")


def _check_eta(eta: float, where: str) -> None:
    # η is a weight decay, as simulate_reduced requires: a negative one gives a negative "fixed point" p*₋
    if not (np.isfinite(eta) and eta >= 0):
        raise ValueError(f"{where}: eta (the weight decay η) must be a finite number >= 0, got {eta!r}")


def eta_threshold(tau: float, sigma2: float) -> float:
    """Largest weight decay with a non-collapsed fixed point, ``τ² / (4(1+σ²))`` (Obs. #5).

    Raises:
        ValueError: ``sigma2`` negative or not finite.
    """
    _check_sigma2(sigma2, "eta_threshold")
    return tau**2 / (4.0 * (1.0 + sigma2))


def p_star(tau: float, eta: float, sigma2: float) -> tuple[float, float]:
    """Non-zero fixed points ``(p*₋, p*₊) = (τ ∓ sqrt(τ² − 4η(1+σ²))) / (2(1+σ²))`` of Eq. 16.

    Returns ``(nan, nan)`` when ``η > τ²/(4(1+σ²))`` (only the collapsed point p = 0 remains).

    Raises:
        ValueError: ``eta`` or ``sigma2`` negative or not finite.
    """
    _check_eta(eta, "p_star")
    _check_sigma2(sigma2, "p_star")
    lam = 1.0 + sigma2
    threshold = eta_threshold(tau, sigma2)
    if eta > threshold:
        return float("nan"), float("nan")
    # sqrt(τ² − 4η(1+σ²)) as |τ| sqrt(1 − η/threshold): exactly 0 at η = threshold, where τ² − 4η(1+σ²) rounded to
    # ±1e-17 and either lost the double root (negative) or split it in two a few 1e-9 apart (positive)
    r = abs(tau) * np.sqrt(max(1.0 - eta / threshold, 0.0)) if threshold > 0 else 0.0
    return float((tau - r) / (2 * lam)), float((tau + r) / (2 * lam))


def fixed_points(tau: float, eta: float, sigma2: float) -> Array:
    """All real fixed points of Eq. 16 (dynamics on the invariant parabola), ascending and unique.

    ``[0, p*₋, p*₊]`` for ``0 < η ≤ τ²/(4(1+σ²))``; ``[0]`` beyond; ``[0, τ/(1+σ²)]`` at ``η = 0``.
    Each pair ``(p*, p*²/α_p)`` is a fixed point of the (p, s) system Eqs. 11-12 at fixed τ.

    Raises:
        ValueError: ``eta`` or ``sigma2`` negative or not finite (raised by :func:`p_star`).
    """
    pm, pp = p_star(tau, eta, sigma2)
    pts = [0.0] + [x for x in (pm, pp) if np.isfinite(x)]
    return np.unique(np.asarray(pts))


def rhs_parabola(p: Array, tau: float, eta: float, sigma2: float) -> Array:
    """Eq. 16, ``ṗ = p²[τ − (1+σ²)p] − η p = −(1+σ²) p (p − p*₋)(p − p*₊)``, on ``s = p²/α_p``."""
    return p**2 * (tau - (1.0 + sigma2) * p) - eta * p


def rhs_parabola_dp(p: Array, tau: float, eta: float, sigma2: float) -> Array:
    """Derivative of Eq. 16 in p: ``2τp − 3(1+σ²)p² − η`` (negative = stable fixed point)."""
    return 2.0 * tau * p - 3.0 * (1.0 + sigma2) * p**2 - eta


def invariant_parabola(p: Array, alpha_p: float) -> Array:
    """The invariant parabola ``s = p²/α_p`` (Eq. 14 with c_j = 0)."""
    return np.asarray(p) ** 2 / alpha_p


def parabola_constant(p0: Array, s0: Array, alpha_p: float) -> Array:
    """``c_j = s_j(0) − α_p⁻¹ p_j²(0)`` of Eq. 14 (corrected sign; the main text has the opposite)."""
    return np.asarray(s0) - np.asarray(p0) ** 2 / alpha_p


def integral_of_motion(t: Array, p: Array, s: Array, *, alpha_p: float, eta: float) -> Array:
    """Residual of Eq. 14, ``s_j(t) − α_p⁻¹p_j²(t) − e^{−2ηt} c_j``; zero along exact Eqs. 11-12 (any τ(t)).

    Args:
        t: Times (T,).
        p: p_j(t) (T, d).
        s: s_j(t) (T, d).
        alpha_p: α_p.
        eta: η.
    """
    c = parabola_constant(p[0], s[0], alpha_p)
    return s - p**2 / alpha_p - np.exp(-2.0 * eta * np.asarray(t))[:, None] * c


# ----------------------------------------------------------------------------------------------------
# Matrix dynamics of (Wp, F): Eq. 7 (symmetric) and Eq. 62 (asymmetric), at fixed τ
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixParams:
    """Parameters of Eq. 7 / Eq. 62 with a time-independent τ."""

    alpha_p: float
    eta: float
    sigma2: float
    tau: float
    n: int
    symmetric: bool = True


def matrix_field(Wp: Array, F: Array, p: MatrixParams) -> tuple[Array, Array]:
    """``(dWp, dF)`` of Eq. 7 (``symmetric=True``) or Eq. 62 (before symmetrisation).

    Eq. 7: ``Ẇp = −(α_p/2)(1+σ²){Wp, F} + α_p τ F − η Wp`` and ``Ḟ = −(1+σ²){Wp², F} + τ{Wp, F} − 2ηF``.
    Eq. 62: ``Ẇp = −α_p(1+σ²) Wp F + α_p τ F − η Wp`` and
    ``Ḟ = −(1+σ²)(WpᵀWp F + F WpᵀWp) + τ(Wpᵀ F + F Wp) − 2ηF``.
    """
    lam = 1.0 + p.sigma2
    if p.symmetric:
        dWp = -p.alpha_p * lam * sym(Wp @ F) + p.alpha_p * p.tau * F - p.eta * Wp
        G = Wp @ Wp
    else:
        dWp = -p.alpha_p * lam * Wp @ F + p.alpha_p * p.tau * F - p.eta * Wp
        G = Wp.T @ Wp
    dF = -lam * (G @ F + F @ G) + p.tau * (Wp.T @ F + F @ Wp) - 2.0 * p.eta * F
    return dWp, dF


def rhs_matrix(t: float, y: Array, params: MatrixParams) -> Array:
    """Flat-state form of :func:`matrix_field`, ``y = [vec Wp, vec F]``."""
    n = params.n
    dWp, dF = matrix_field(y[: n * n].reshape(n, n), y[n * n :].reshape(n, n), params)
    return np.concatenate([dWp.ravel(), dF.ravel()])


def _is_symmetric(A: Array) -> bool:
    """``A`` equals its transpose up to rounding (relative to its largest entry)."""
    return bool(np.allclose(A, A.T, rtol=1e-7, atol=1e-12 * max(1.0, float(np.abs(A).max(initial=0.0)))))


def simulate_matrix(
    Wp0: Array,
    F0: Array,
    *,
    tau: float,
    alpha_p: float,
    eta: float,
    sigma2: float,
    dt: float,
    steps: int,
    symmetric: bool = True,
    method: Method = "euler",
    record_every: int = 1,
) -> Trajectory:
    """Simulate the reduced matrix flow of ``(Wp, F)`` at fixed τ: Eq. 7 or, with ``symmetric=False``, Eq. 62.

    Args:
        Wp0: Initial predictor (n, n); symmetric with ``symmetric=True`` (Assumption 3: Eq. 7 is the flow of a
            symmetric W_p and keeps it symmetric; from a non-symmetric one it would integrate neither Eq. 7 nor
            Eq. 62).
        F0: Initial correlation F = W X Wᵀ (n, n), symmetric.
        tau: The fixed EMA ratio τ.
        alpha_p: Predictor learning-rate ratio α_p (> 0).
        eta: Weight decay η (>= 0).
        sigma2: Augmentation variance σ² (>= 0).
        dt: Step size (> 0).
        steps: Number of steps (>= 1).
        symmetric: Eq. 7 (True) or Eq. 62 (False).
        method: ``"euler"`` or ``"rk4"``.
        record_every: Record every k-th step.

    Returns:
        Trajectory with states ``Wp`` (T, n, n) and ``F`` (T, n, n).

    Raises:
        ValueError: bad settings, a non-symmetric ``F0``, or a non-symmetric ``Wp0`` with ``symmetric=True``.
    """
    check_run_args(dt, steps, record_every, method)
    if not alpha_p > 0 or not eta >= 0 or not sigma2 >= 0 or not np.isfinite(tau):
        raise ValueError(f"need alpha_p > 0, eta >= 0, sigma2 >= 0, finite tau; got {alpha_p}, {eta}, {sigma2}, {tau}")
    Wp0 = np.asarray(Wp0, dtype=np.float64)
    F0 = np.asarray(F0, dtype=np.float64)
    if Wp0.ndim != 2 or Wp0.shape[0] != Wp0.shape[1] or F0.shape != Wp0.shape:
        raise ValueError(f"Wp0 and F0 must be square matrices of one shape (n, n), got {Wp0.shape} and {F0.shape}")
    if not _is_symmetric(F0):
        raise ValueError("F0 is a correlation F = W X Wᵀ and must be symmetric")
    if symmetric and not _is_symmetric(Wp0):
        # Eq. 7 keeps a symmetric W_p symmetric; from a non-symmetric one, F = W X Wᵀ would become non-symmetric too
        raise ValueError(
            "Wp0 is not symmetric, but symmetric=True integrates Eq. 7, the flow of a symmetric W_p (Assumption 3); "
            "pass a symmetric Wp0 (e.g. (Wp0 + Wp0.T) / 2) or symmetric=False for the asymmetric flow, Eq. 62"
        )
    n = Wp0.shape[0]
    params = MatrixParams(float(alpha_p), float(eta), float(sigma2), float(tau), n, bool(symmetric))
    t, ys = integrate(
        rhs_matrix,
        np.concatenate([Wp0.ravel(), F0.ravel()]),
        params,
        dt=dt,
        steps=steps,
        method=method,
        record_every=record_every,
    )
    record = dict(
        model="matrix",
        tau=tau,
        alpha_p=alpha_p,
        eta=eta,
        sigma2=sigma2,
        dt=dt,
        steps=steps,
        symmetric=symmetric,
        method=method,
        record_every=record_every,
    )
    return Trajectory(
        t=t,
        states={"Wp": ys[:, : n * n].reshape(-1, n, n), "F": ys[:, n * n :].reshape(-1, n, n)},
        params=record,
    )


# ----------------------------------------------------------------------------------------------------
# Appendix D: the scalar 3-D system, Eqs. 104-106
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScalarParams:
    """Parameters of Eqs. 104-106 (λ_s = E[x1²], λ_d = E[x1 x2])."""

    lambda_s: float
    lambda_d: float
    alpha_p: float
    beta: float


def rhs_scalar(t: float, y: Array, params: ScalarParams) -> Array:
    """Eqs. 104-106 on ``y = [w_p, w, w_a]`` (any trailing batch axes).

    ``ẇ_p = α_p [w_a λ_d − w_p w λ_s] w``, ``ẇ = w_p [w_a λ_d − w_p w λ_s]``, ``ẇ_a = β(−w_a + w)``.
    """
    wp, w, wa = y[0], y[1], y[2]
    r = wa * params.lambda_d - wp * w * params.lambda_s
    return np.stack([params.alpha_p * r * w, wp * r, params.beta * (w - wa)])
