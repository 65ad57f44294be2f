"""Quantities tracked along a trajectory: spectra, commutator, alignment, balance (Thm 1), K (Thm 3).

All functions accept leading batch/time axes on their matrix arguments.
"""

from __future__ import annotations

import numpy as np

from directpred.theory.dynamics import Trajectory, _mT, sym

Array = np.ndarray


def feature_correlation(W: Array, X: Array) -> Array:
    """``F = W X Wᵀ`` (…, n2, n2), the correlation of the online features (``W Wᵀ`` under Assumption 2)."""
    return W @ X @ _mT(W)


def eigvals_sym(A: Array) -> Array:
    """Eigenvalues of the symmetric part of ``A``, descending (…, n)."""
    return np.linalg.eigvalsh(sym(A))[..., ::-1]


def eigvals_real(A: Array) -> Array:
    """Real parts of the eigenvalues of a (possibly non-symmetric) ``A``, descending (…, n)."""
    return np.sort(np.linalg.eigvals(A).real, axis=-1)[..., ::-1]


def commutator(F: Array, Wp: Array) -> Array:
    """``[F, Wp] = F Wp − Wp F`` (Theorem 3)."""
    return F @ Wp - Wp @ F


def commutator_norm(F: Array, Wp: Array) -> Array:
    """Frobenius norm ``‖[F, Wp]‖_F``."""
    return np.linalg.norm(commutator(F, Wp), axis=(-2, -1))


def alignment(F: Array, Wp: Array) -> Array:
    """Eigenspace alignment: ``cos(Wp u_j, u_j) = u_jᵀ Wp u_j / ‖Wp u_j‖`` for eigenvectors u_j of F (Fig. 2).

    Returns:
        (…, n) cosines ordered by descending eigenvalue of F; 1 means u_j is an eigenvector of Wp with a
        positive eigenvalue.
    """
    _, U = np.linalg.eigh(sym(F))
    U = U[..., ::-1]
    WU = Wp @ U
    num = np.sum(U * WU, axis=-2)
    den = np.linalg.norm(WU, axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def balance(W: Array, Wp: Array, alpha_p: float) -> Array:
    """Theorem 1's quantity ``WpᵀWp − α_p W Wᵀ`` (…, n2, n2)."""
    return _mT(Wp) @ Wp - alpha_p * (W @ _mT(W))


def balance_prediction(C0: Array, t: Array, eta: float) -> Array:
    """Theorem 1's prediction ``e^{−2ηt} C0`` for the balance quantity, with ``C0`` its value at t = 0.

    Note: the paper states Theorem 1 as ``W Wᵀ = α_p⁻¹ WpᵀWp + e^{−2ηt} C``; the appendix restatement drops
    the ``α_p⁻¹``, but its proof (and this function) keeps it.
    """
    t = np.asarray(t, dtype=np.float64)
    return np.exp(-2.0 * eta * t).reshape(t.shape + (1,) * np.ndim(C0)) * C0


def K_matrix(F: Array, Wp: Array, *, tau: float | Array, alpha_p: float, eta: float, sigma2: float) -> Array:
    """Theorem 3's ``K = (1+σ²)[α_p/2 F + Wp² − τ/(1+σ²) Wp] + (3/2)η I``.

    It drives ``d/dt[F,Wp] = −[F,Wp]K − K[F,Wp]``.

    Theorem 3 (with ``inf_t``, the appendix's "max_t" is a typo): if ``λ_min K(t) ≥ λ0 > 0`` for all t then
    ``‖[F, Wp](t)‖_F ≤ e^{−2λ0 t} ‖[F, Wp](0)‖_F``.
    """
    n = F.shape[-1]
    tau = np.asarray(tau, dtype=np.float64).reshape(np.shape(tau) + (1, 1))
    return (1.0 + sigma2) * (alpha_p / 2.0 * F + Wp @ Wp) - tau * Wp + 1.5 * eta * np.eye(n)


def ema_ratio(W: Array, Wa: Array) -> tuple[Array, Array]:
    """Least-squares ``τ = ⟨Wa, W⟩/‖W‖²`` and the correlation ``⟨Wa, W⟩/(‖Wa‖‖W‖)`` (Fig. 7)."""
    dot = np.sum(Wa * W, axis=(-2, -1))
    nw = np.sum(W * W, axis=(-2, -1))
    na = np.sum(Wa * Wa, axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = np.where(nw > 0, dot / np.where(nw > 0, nw, 1.0), 0.0)
        den = np.sqrt(nw * na)
        corr = np.where(den > 0, dot / np.where(den > 0, den, 1.0), 0.0)
    return tau, corr


def track(traj: Trajectory) -> dict[str, Array]:
    """Tracked quantities along a linear-model trajectory (from :func:`simulate_linear` or SGD).

    Returns:
        Dict of arrays over time: ``eig_Wp`` (real parts, descending), ``eig_F``, ``commutator`` ‖[F, Wp]‖,
        ``alignment`` (cosines per eigenvector of F), ``balance`` ‖WpᵀWp − α_pWWᵀ‖_F,
        ``balance_prediction`` ‖e^{−2ηt}C‖_F, ``balance_error`` ‖balance − prediction‖_F, ``norm_W`` ‖W‖_F,
        ``tau_fit`` and ``ema_corr`` (see :func:`ema_ratio`). ``balance_prediction`` means something only where
        :func:`theorem1_applies`.
    """
    if "X" not in traj.params or "W" not in traj.states:  # a reduced or matrix run has no W, W_a, X
        raise ValueError(
            f"track needs a linear-model trajectory (simulate_linear or simulate_sgd), got a "
            f"{traj.params.get('model', 'unknown')!r} one with states {sorted(traj.states)}"
        )
    X = np.asarray(traj.params["X"], dtype=np.float64)
    alpha_p, eta = traj.params["alpha_p"], traj.params["eta"]
    W, Wp, Wa = traj.W, traj.Wp, traj.Wa
    F = feature_correlation(W, X)
    B = balance(W, Wp, alpha_p)
    pred = balance_prediction(B[0], traj.t, eta)
    tau_fit, corr = ema_ratio(W, Wa)
    return {
        "eig_Wp": eigvals_real(Wp),
        "eig_F": eigvals_sym(F),
        "commutator": commutator_norm(F, Wp),
        "alignment": alignment(F, Wp),
        "balance": np.linalg.norm(B, axis=(-2, -1)),
        "balance_prediction": np.linalg.norm(pred, axis=(-2, -1)),
        "balance_error": np.linalg.norm(B - pred, axis=(-2, -1)),
        "norm_W": np.linalg.norm(W, axis=(-2, -1)),
        "tau_fit": tau_fit,
        "ema_corr": corr,
    }


def theorem1_applies(params: dict) -> bool:
    """Whether a linear-model run (a :class:`Trajectory`'s ``params``) meets Theorem 1's assumptions: Eqs. 2-3 with
    the stop-gradient and a predictor trained by gradient descent, not symmetrised, and W's gradient through
    ``Wpᵀ`` (not IsoLoss's). Otherwise the balance has no ``e^{-2 eta t} C`` law."""
    return (
        bool(params.get("stop_gradient", True))
        and bool(params.get("predictor", True))
        and not bool(params.get("symmetric", False))
        and params.get("predictor_rule", "gradient") == "gradient"
        and not bool(params.get("isoloss", False))
    )
