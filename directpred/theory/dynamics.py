"""Gradient flow of the full linear BYOL/SimSiam model (paper Eqs. 2-4) and the integrators.

The model (paper §2): online ``W`` (n2, n1), predictor ``Wp`` (n2, n2), target ``Wa`` (n2, n1), loss
``J = ½ E‖Wp W x1 − SG(Wa x2)‖²`` (Eq. 1). Everything here is a pure function of numpy arrays. All matrices
may carry leading batch dimensions (``W`` of shape ``(R, n2, n1)`` runs R independent models at once).

The vector field is written with three second-moment matrices of the two views,
``S11 = E[x1 x1ᵀ]``, ``S21 = E[x2 x1ᵀ]`` and ``S22 = E[x2 x2ᵀ]``. The gradient flow of Lemma 1 uses their
expectations ``S11 = S22 = X + X'`` and ``S21 = X``; minibatch SGD (:mod:`directpred.theory.sgd`) is
exactly an Euler step of the same field with the minibatch estimates, so both share one implementation.

Over 300 lines: the linear model's field (Eqs. 2-4), its integrators and the trajectory container share
notation and are tested as one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from directpred.linalg import symmetric_part

Array = np.ndarray
Rhs = Callable[[float, Array, Any], Array]
Mode = Literal["byol", "simsiam"]
Method = Literal["euler", "rk4"]
PredictorRule = Literal["gradient", "directpred", "directcopy"]
PREDICTOR_RULES = ("gradient", "directpred", "directcopy")


def _mT(A: Array) -> Array:
    """Transpose of the last two axes (batched ``Aᵀ``)."""
    return np.swapaxes(A, -1, -2)


sym = symmetric_part  # the symmetric part (A + Aᵀ)/2, batched; short name for the equations


# ----------------------------------------------------------------------------------------------------
# Trajectory container
# ----------------------------------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    return v


@dataclass
class Trajectory:
    """Arrays recorded along a simulation, plus the parameters it was run with.

    Attributes:
        t: Recorded times, shape ``(T,)`` (``t = k·dt`` for step k).
        states: Name -> array with leading time axis ``(T, ...)``; also reachable as attributes
            (``traj.W``, ``traj.p``).
        params: The parameters of the run (scalars, flags and the data matrices).

    Examples:
        >>> from directpred.theory import simulate_reduced
        >>> traj = simulate_reduced(0.5, 0.5, 1.0, alpha_p=1, eta=0.0, beta=0, sigma2=0, dt=0.01, steps=10)
        >>> traj.p.shape
        (11, 1)
    """

    t: Array
    states: dict[str, Array]
    params: dict[str, Any] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Array:
        states = self.__dict__.get("states", {})
        if name in states:
            return states[name]
        raise AttributeError(name)

    def __getitem__(self, name: str) -> Array:
        return self.states[name]

    def save(self, path: str | Path, **extra: Array) -> None:
        """Write ``t``, every state, ``extra`` arrays and the JSON-encoded params into one ``.npz``."""
        arrays = {"t": self.t, "params_json": np.asarray(json.dumps(_jsonable(self.params))), **self.states, **extra}
        # mypy matches the **arrays against numpy's allow_pickle: bool too (no state is named so)
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]

    @classmethod
    def load(cls, path: str | Path) -> Trajectory:
        """Read a trajectory written by :meth:`save` (extra arrays become states)."""
        with np.load(path) as z:
            params = json.loads(str(z["params_json"]))
            states = {k: z[k] for k in z.files if k not in ("t", "params_json")}
            return cls(t=z["t"], states=states, params=params)


# ----------------------------------------------------------------------------------------------------
# Integrators
# ----------------------------------------------------------------------------------------------------


def euler_step(rhs: Rhs, t: float, y: Array, params: Any, dt: float) -> Array:
    """One explicit Euler step; with ``dt`` = the learning rate α this *is* gradient descent (paper §2)."""
    return y + dt * rhs(t, y, params)


def rk4_step(rhs: Rhs, t: float, y: Array, params: Any, dt: float) -> Array:
    """One classical 4th-order Runge-Kutta step (global error O(dt⁴)): the gradient-flow reference."""
    k1 = rhs(t, y, params)
    k2 = rhs(t + dt / 2, y + dt / 2 * k1, params)
    k3 = rhs(t + dt / 2, y + dt / 2 * k2, params)
    k4 = rhs(t + dt, y + dt * k3, params)
    return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


STEPPERS: dict[str, Callable[[Rhs, float, Array, Any, float], Array]] = {"euler": euler_step, "rk4": rk4_step}


def check_run_args(dt: float, steps: int, record_every: int = 1, method: str = "euler") -> None:
    """Raise ``ValueError`` for impossible integration settings."""
    if not (np.isfinite(dt) and dt > 0):
        raise ValueError(f"dt must be a positive number, got {dt!r}")
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if int(record_every) != record_every or record_every < 1:
        raise ValueError(f"record_every must be an integer >= 1, got {record_every!r}")
    if method not in STEPPERS:
        raise ValueError(f"method must be one of {sorted(STEPPERS)}, got {method!r}")


def integrate(
    rhs: Rhs,
    y0: Array,
    params: Any,
    *,
    dt: float,
    steps: int,
    method: Method = "euler",
    record_every: int = 1,
    t0: float = 0.0,
) -> tuple[Array, Array]:
    """Integrate ``dy/dt = rhs(t, y, params)`` with fixed steps.

    Args:
        rhs: Pure vector field ``rhs(t, y, params) -> dy/dt`` with ``y`` of any shape.
        y0: Initial state.
        params: Passed unchanged to ``rhs``.
        dt: Step size (the paper's learning rate α for Euler).
        steps: Number of steps.
        method: ``"euler"`` or ``"rk4"``.
        record_every: Keep every k-th state (the last state is always kept).
        t0: Initial time.

    Returns:
        ``(t, ys)`` with ``t`` of shape ``(T,)`` and ``ys`` of shape ``(T,) + y0.shape``.
    """
    check_run_args(dt, steps, record_every, method)
    step = STEPPERS[method]
    rec = sorted(set(range(0, steps + 1, record_every)) | {steps})
    ys = np.empty((len(rec),) + np.shape(y0))
    y = np.array(y0, dtype=np.float64)
    ys[0] = y
    i = 1
    for k in range(1, steps + 1):
        y = step(rhs, t0 + (k - 1) * dt, y, params, dt)
        if i < len(rec) and k == rec[i]:
            ys[i] = y
            i += 1
    return t0 + dt * np.asarray(rec, dtype=np.float64), ys


# ----------------------------------------------------------------------------------------------------
# Closed-form predictors (paper §4, Eq. 18; DirectCopy)
# ----------------------------------------------------------------------------------------------------


def closed_form_eigenvalues(s: Array, rule: PredictorRule, eps: float = 0.0) -> Array:
    """The eigenvalues ``p_j`` a closed-form rule gives W_p from the eigenvalues ``s_j`` of F (last axis), negative
    ones (rounding of a PSD matrix) counted as 0: DirectPred (Eq. 18) ``sqrt(s_j) + ε max_k s_k``, DirectCopy
    ``s_j + ε``."""
    s = np.clip(np.asarray(s, dtype=np.float64), 0.0, None)
    if rule == "directpred":
        return np.sqrt(s) + eps * s.max(axis=-1, keepdims=True)
    if rule == "directcopy":
        return s + eps
    raise ValueError(f"rule must be 'directpred' or 'directcopy', got {rule!r}")


def check_predictor_rule(predictor_rule: str, eps: float) -> None:
    """Raise ``ValueError`` for an unknown ``predictor_rule`` or an ε it cannot take (ε only for a closed form)."""
    if predictor_rule not in PREDICTOR_RULES:
        raise ValueError(f"predictor_rule must be one of {', '.join(PREDICTOR_RULES)}, got {predictor_rule!r}")
    if not (np.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if eps != 0 and predictor_rule == "gradient":
        raise ValueError(
            f"eps={eps} is the closed-form predictor's ε and a gradient-trained W_p has none; "
            "set predictor_rule to 'directpred' or 'directcopy', or eps to 0"
        )


def check_isoloss(isoloss: bool, predictor_rule: str, *, predictor: bool = True) -> None:
    """Raise ``ValueError`` for IsoLoss with a gradient-trained ``W_p``.

    IsoLoss (the training code's :func:`directpred.losses.isoloss_prediction`, ``p.detach() + z − z.detach()``)
    removes ``W_pᵀ`` from W's gradient and gives ``W_p`` no gradient at all, so Eq. 2 does not act; the trainer
    (:class:`directpred.methods.siamese.Siamese`) refuses it with a trained predictor for the same reason. A W_p set
    in closed form, or fixed to ``I`` (``predictor=False``, where IsoLoss changes nothing), is fine.
    """
    if isoloss and predictor and predictor_rule == "gradient":
        raise ValueError(
            "isoloss=True passes no gradient to the predictor (IsoLoss is p.detach() + z - z.detach()), but "
            "predictor_rule='gradient' trains W_p by Eq. 2's gradient; use a predictor set in closed form "
            "(predictor_rule='directpred' or 'directcopy') or isoloss=False"
        )


def closed_form_predictor(F: Array, rule: PredictorRule, eps: float = 0.0) -> Array:
    """The predictor set directly from the predictor-input correlation ``F = E[f fᵀ]`` (batched over leading axes).

    * ``"directpred"``, Eq. 18 as the paper writes it: ``F = U diag(s) Uᵀ``, ``p_j = sqrt(s_j) + ε max_j s_j``,
      ``W_p = U diag(p) Uᵀ``;
    * ``"directcopy"`` (Wang, Chen, Du, Tian 2021; the authors' unnormalised ``directcopy`` branch):
      ``W_p = F + ε I``.

    No normalisation by ``s_max`` or ``‖F‖``: the linear model's loss (Eq. 1) is Euclidean, so the predictor's scale
    sets the fixed points (the training code normalises because its cosine loss is scale-invariant). Eigenvalues of
    F below 0 (rounding of a PSD matrix) count as 0.

    Args:
        F: Symmetric positive semi-definite (..., n2, n2).
        rule: ``"directpred"`` or ``"directcopy"``.
        eps: ε >= 0.

    Returns:
        The symmetric predictor ``W_p`` (..., n2, n2).

    Examples:
        >>> Wp = closed_form_predictor(np.diag([4.0, 1.0]), "directpred")
        >>> np.diag(Wp).tolist()
        [2.0, 1.0]
    """
    F = sym(np.asarray(F, dtype=np.float64))
    s, U = np.linalg.eigh(F)  # DirectCopy too: F + εI alone would keep a negative eigenvalue of F
    p = closed_form_eigenvalues(s, rule, eps)
    return (U * p[..., None, :]) @ _mT(U)


# ----------------------------------------------------------------------------------------------------
# The linear model's vector field (Eqs. 2-4 and the ablations)
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearParams:
    """Parameters of the full linear model's flow (Eqs. 2-4).

    Attributes:
        S11: ``E[x1 x1ᵀ]`` (n1, n1); ``X + X'`` for the gradient flow.
        S21: ``E[x2 x1ᵀ]`` (n1, n1); ``X`` for the gradient flow.
        S22: ``E[x2 x2ᵀ]`` (n1, n1); ``X + X'`` for the gradient flow (used only without stop-gradient).
        alpha_p: Predictor learning-rate ratio α_p.
        eta: Weight decay η (on W and Wp).
        beta: EMA rate β of the target (Eq. 4); unused for SimSiam.
        mode: ``"byol"`` (EMA target, Eq. 4) or ``"simsiam"`` (``Wa ≡ W``).
        stop_gradient: ``False`` lets the gradient through the target branch (Theorem 2; SimSiam only).
        predictor: ``False`` fixes ``Wp = I`` (the no-predictor ablation).
        symmetric: Symmetrise the Wp flow (Assumption 3).
        predictor_rule: ``"gradient"`` trains Wp by Eq. 2; ``"directpred"`` / ``"directcopy"`` set it from the
            predictor-input correlation ``F = W S11 Wᵀ`` at every instant (:func:`closed_form_predictor`).
        eps: ε of the closed-form rules.
        isoloss: IsoLoss (Halvagal, Laborieux, Zenke 2023): the gradient reaching W skips ``Wpᵀ`` and W_p gets
            none, so it needs a closed-form ``predictor_rule`` (or ``predictor=False``); :func:`check_isoloss`.
    """

    S11: Array
    S21: Array
    S22: Array
    alpha_p: float
    eta: float
    beta: float
    mode: Mode = "byol"
    stop_gradient: bool = True
    predictor: bool = True
    symmetric: bool = False
    predictor_rule: PredictorRule = "gradient"
    eps: float = 0.0
    isoloss: bool = False

    def __post_init__(self) -> None:
        check_isoloss(self.isoloss, self.predictor_rule, predictor=self.predictor)

    @property
    def n1(self) -> int:
        return self.S11.shape[-1]


def linear_field(W: Array, Wp: Array, Wa: Array, p: LinearParams, F: Array | None = None) -> tuple[Array, Array, Array]:
    """Time derivatives ``(dW, dWp, dWa)`` of the linear model, Eqs. 2-4, with the paper's ablations.

    With ``R := Wp W S11 − Wa S21`` (the residual ``E[(Wp f1 − f2a) x1ᵀ]``):

    * Eq. 2: ``dWp = −α_p R Wᵀ − η Wp`` (symmetrised under Assumption 3; zero without predictor);
    * Eq. 3: ``dW = −Wpᵀ R − η W``;
    * Eq. 4: ``dWa = β (W − Wa)`` (BYOL); SimSiam uses ``Wa = W`` so ``dWa = dW``;
    * no stop-gradient (Theorem 2, SimSiam): the target branch adds ``+ Wp W S21ᵀ − W S22`` to ``dW``,
      which for the flow is ``dW = −(WpᵀWp + I) W X' − W̃pᵀW̃p W X − η W`` with ``W̃p = Wp − I``;
    * a closed-form predictor (``p.predictor_rule`` ``"directpred"`` or ``"directcopy"``, §4): the given ``Wp`` is
      replaced by :func:`closed_form_predictor` of ``F`` (default: the predictor-input correlation ``W S11 Wᵀ``)
      and ``dWp = 0``; no weight decay acts on it;
    * IsoLoss (``p.isoloss``): ``dW = −R − η W``, the gradient with the factor ``Wpᵀ`` removed; W_p gets no
      gradient, so IsoLoss comes with a closed-form rule (:class:`LinearParams` refuses it with the gradient rule).

    Args:
        W: Online weights (..., n2, n1).
        Wp: Predictor (..., n2, n2); unused with a closed-form rule.
        Wa: Target weights (..., n2, n1); ignored for SimSiam.
        p: Model parameters.
        F: The correlation a closed-form rule reads (e.g. SGD's running estimate F̂); ``None``: ``W S11 Wᵀ``.

    Returns:
        ``(dW, dWp, dWa)`` with the shapes of the inputs.
    """
    if p.mode == "simsiam":
        Wa = W
    closed = p.predictor_rule != "gradient"
    if closed:
        Wp = closed_form_predictor(W @ p.S11 @ _mT(W) if F is None else F, p.predictor_rule, p.eps)
    R = Wp @ W @ p.S11 - Wa @ p.S21
    dW = -(R if p.isoloss else _mT(Wp) @ R) - p.eta * W
    if not p.stop_gradient:
        dW = dW + Wp @ W @ _mT(p.S21) - W @ p.S22
    if p.predictor and not closed:
        dWp = -p.alpha_p * (R @ _mT(W)) - p.eta * Wp
        if p.symmetric:
            dWp = sym(dWp)
    else:
        dWp = np.zeros_like(Wp)
    dWa = dW if p.mode == "simsiam" else p.beta * (W - Wa)
    return dW, dWp, dWa


def pack(W: Array, Wp: Array, Wa: Array) -> Array:
    """Flatten ``(W, Wp, Wa)`` into one state vector (keeping leading batch axes)."""
    lead = W.shape[:-2]
    return np.concatenate([W.reshape(lead + (-1,)), Wp.reshape(lead + (-1,)), Wa.reshape(lead + (-1,))], axis=-1)


def unpack(y: Array, n1: int, n2: int) -> tuple[Array, Array, Array]:
    """Inverse of :func:`pack` (views, no copies)."""
    lead = y.shape[:-1]
    a, b = n2 * n1, n2 * n1 + n2 * n2
    return (
        y[..., :a].reshape(lead + (n2, n1)),
        y[..., a:b].reshape(lead + (n2, n2)),
        y[..., b:].reshape(lead + (n2, n1)),
    )


def rhs_linear(t: float, y: Array, params: LinearParams) -> Array:
    """Flat-state form ``dy/dt = rhs(t, y, params)`` of :func:`linear_field` (Eqs. 2-4)."""
    n1 = params.n1
    n2 = int(round((-2 * n1 + np.sqrt(4 * n1 * n1 + 4 * y.shape[-1])) / 2))  # y has 2·n2·n1 + n2² entries
    return pack(*linear_field(*unpack(y, n1, n2), params))


def run_record(
    model: str,
    *,
    alpha_p: float,
    eta: float,
    beta: float,
    dt: float,
    steps: int,
    mode: str,
    stop_gradient: bool,
    predictor: bool,
    symmetric: bool,
    record_every: int,
    n1: int,
    n2: int,
    X: np.ndarray,
    Xp: np.ndarray,
    predictor_rule: str = "gradient",
    eps: float = 0.0,
    isoloss: bool = False,
    **extra: object,
) -> dict:
    """The parameters a linear-model :class:`Trajectory` records (gradient flow or minibatch SGD)."""
    return dict(
        model=model,
        alpha_p=float(alpha_p),
        eta=float(eta),
        beta=float(beta),
        dt=float(dt),
        steps=int(steps),
        mode=mode,
        stop_gradient=stop_gradient,
        predictor=predictor,
        symmetric=symmetric,
        record_every=int(record_every),
        n1=int(n1),
        n2=int(n2),
        X=X,
        Xp=Xp,
        predictor_rule=predictor_rule,
        eps=float(eps),
        isoloss=bool(isoloss),
        **extra,
    )


def flow_params(
    X: Array,
    Xp: Array,
    *,
    alpha_p: float,
    eta: float,
    beta: float,
    mode: Mode = "byol",
    stop_gradient: bool = True,
    predictor: bool = True,
    symmetric: bool = False,
    predictor_rule: PredictorRule = "gradient",
    eps: float = 0.0,
    isoloss: bool = False,
) -> LinearParams:
    """:class:`LinearParams` of the gradient flow (Lemma 1) for data statistics ``X`` and ``X'``."""
    X = np.asarray(X, dtype=np.float64)
    Xp = np.asarray(Xp, dtype=np.float64)
    return LinearParams(
        S11=X + Xp,
        S21=X,
        S22=X + Xp,
        alpha_p=float(alpha_p),
        eta=float(eta),
        beta=float(beta),
        mode=mode,
        stop_gradient=stop_gradient,
        predictor=predictor,
        symmetric=symmetric,
        predictor_rule=predictor_rule,
        eps=float(eps),
        isoloss=bool(isoloss),
    )


def check_linear_args(
    alpha_p: float,
    eta: float,
    beta: float,
    mode: str,
    stop_gradient: bool,
    *,
    predictor: bool = True,
    predictor_rule: str = "gradient",
    eps: float = 0.0,
    isoloss: bool = False,
) -> None:
    """Raise ``ValueError`` for impossible model settings."""
    if mode not in ("byol", "simsiam"):
        raise ValueError(f"mode must be 'byol' or 'simsiam', got {mode!r}")
    if not alpha_p > 0:
        raise ValueError(f"alpha_p must be > 0, got {alpha_p!r}")
    if not eta >= 0:
        raise ValueError(f"eta (weight decay) must be >= 0, got {eta!r}")
    if not beta >= 0:
        raise ValueError(f"beta (EMA rate) must be >= 0, got {beta!r}")
    if not stop_gradient and mode != "simsiam":
        raise ValueError("stop_gradient=False is Theorem 2's setting and needs mode='simsiam' (W_a = W)")
    check_predictor_rule(predictor_rule, eps)
    if predictor_rule != "gradient" and not predictor:
        raise ValueError(
            f"predictor_rule={predictor_rule!r} sets W_p from F, but predictor=False fixes W_p = I; drop one of them"
        )
    if isoloss and not stop_gradient:
        raise ValueError(
            "isoloss=True is defined with a stop-gradient target; it cannot be combined with stop_gradient=False"
        )
    check_isoloss(isoloss, predictor_rule, predictor=predictor)


def simulate_linear(
    W: Array,
    Wp: Array | None,
    Wa: Array | None,
    X: Array,
    Xp: Array,
    *,
    alpha_p: float,
    eta: float,
    beta: float,
    dt: float,
    steps: int,
    mode: Mode = "byol",
    stop_gradient: bool = True,
    predictor: bool = True,
    symmetric: bool = False,
    method: Method = "euler",
    record_every: int = 1,
    predictor_rule: PredictorRule = "gradient",
    eps: float = 0.0,
    isoloss: bool = False,
) -> Trajectory:
    """Simulate the full linear model's gradient flow, paper Eqs. 2-4 (Lemma 1).

    ``method="euler"`` with step ``dt`` is gradient descent with learning rate α = dt (predictor rate α·α_p,
    EMA rate α·β = 1 − γ_a, weight decay η̄ = α·η); ``method="rk4"`` approximates the continuous flow.

    ``predictor_rule="directpred"`` or ``"directcopy"`` replaces Eq. 2 by the predictor set from the
    predictor-input correlation ``F = W (X + X') Wᵀ`` at every instant (paper §4, :func:`closed_form_predictor`):
    the flow limit of DirectPred, where F̂ is the exact expectation. ``isoloss=True`` drops ``Wpᵀ`` from Eq. 3; as
    IsoLoss gives W_p no gradient, it needs a closed-form ``predictor_rule`` (or ``predictor=False``).

    Args:
        W: Initial online weights (..., n2, n1); leading axes run independent models in one call.
        Wp: Initial predictor (..., n2, n2). Replaced by ``I`` when ``predictor=False``; symmetrised when
            ``symmetric=True`` (Assumption 3 initialises it symmetric); ignored (may be ``None``) with a
            closed-form ``predictor_rule``.
        Wa: Initial target (..., n2, n1); ignored (set to ``W``) for SimSiam.
        X: ``E[x̄ x̄ᵀ]`` (n1, n1).
        Xp: ``X'``, the augmentation covariance (n1, n1).
        alpha_p: Predictor learning-rate ratio α_p (> 0).
        eta: Weight decay η (>= 0).
        beta: EMA rate β (>= 0).
        dt: Step size (> 0).
        steps: Number of steps (>= 1).
        mode: ``"byol"`` or ``"simsiam"`` (``Wa ≡ W``).
        stop_gradient: ``False`` is Theorem 2's no-stop-gradient SimSiam.
        predictor: ``False`` fixes ``Wp = I``.
        symmetric: Symmetric predictor (Assumption 3).
        method: ``"euler"`` or ``"rk4"``.
        record_every: Record every k-th step.
        predictor_rule: ``"gradient"`` (Eq. 2), ``"directpred"`` (Eq. 18) or ``"directcopy"``; ``alpha_p`` and
            ``symmetric`` do not act on a closed-form W_p.
        eps: ε of the closed-form rule (0 for ``"gradient"``).
        isoloss: IsoLoss's gradient for W (``−R`` instead of ``−Wpᵀ R``); refused with ``predictor_rule="gradient"``
            (IsoLoss trains no W_p).

    Returns:
        Trajectory with states ``W`` (T, ..., n2, n1), ``Wp`` (T, ..., n2, n2), ``Wa`` (T, ..., n2, n1); with a
        closed-form rule, ``Wp`` is the predictor of each recorded ``W``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> traj = simulate_linear(rng.normal(size=(3, 4)), np.eye(3), None, np.eye(4), 0.1 * np.eye(4),
        ...                        alpha_p=1, eta=0.01, beta=0, dt=0.01, steps=100, mode="simsiam")
        >>> traj.W.shape
        (101, 3, 4)
    """
    check_linear_args(
        alpha_p,
        eta,
        beta,
        mode,
        stop_gradient,
        predictor=predictor,
        predictor_rule=predictor_rule,
        eps=eps,
        isoloss=isoloss,
    )
    check_run_args(dt, steps, record_every, method)
    W = np.array(W, dtype=np.float64)
    n2, n1 = W.shape[-2:]
    X = np.asarray(X, dtype=np.float64)
    Xp = np.asarray(Xp, dtype=np.float64)
    if X.shape != (n1, n1) or Xp.shape != (n1, n1):
        raise ValueError(f"X and Xp must be ({n1}, {n1}) for W of shape {W.shape}; got {X.shape}, {Xp.shape}")
    closed = predictor_rule != "gradient"
    if not predictor or closed:  # a closed-form W_p is recomputed from W; this placeholder is never read
        Wp = np.broadcast_to(np.eye(n2), W.shape[:-2] + (n2, n2)).copy()
    elif Wp is None:
        raise ValueError("Wp is required when predictor=True")
    Wp = np.array(Wp, dtype=np.float64)
    if Wp.shape != W.shape[:-2] + (n2, n2):
        raise ValueError(f"Wp must have shape {W.shape[:-2] + (n2, n2)}, got {Wp.shape}")
    if symmetric:
        Wp = sym(Wp)
    if mode == "simsiam" or Wa is None:
        Wa = W.copy()
    Wa = np.array(Wa, dtype=np.float64)
    if Wa.shape != W.shape:
        raise ValueError(f"Wa must have the shape of W {W.shape}, got {Wa.shape}")
    params = flow_params(
        X,
        Xp,
        alpha_p=alpha_p,
        eta=eta,
        beta=beta,
        mode=mode,
        stop_gradient=stop_gradient,
        predictor=predictor,
        symmetric=symmetric,
        predictor_rule=predictor_rule,
        eps=eps,
        isoloss=isoloss,
    )
    t, ys = integrate(rhs_linear, pack(W, Wp, Wa), params, dt=dt, steps=steps, method=method, record_every=record_every)
    Ws, Wps, Was = unpack(ys, n1, n2)
    if closed:
        Wps = closed_form_predictor(Ws @ params.S11 @ _mT(Ws), predictor_rule, eps)
    record = run_record(
        "linear",
        alpha_p=alpha_p,
        eta=eta,
        beta=beta,
        dt=dt,
        steps=steps,
        mode=mode,
        stop_gradient=stop_gradient,
        predictor=predictor,
        symmetric=symmetric,
        record_every=record_every,
        n1=n1,
        n2=n2,
        X=X,
        Xp=Xp,
        predictor_rule=predictor_rule,
        eps=eps,
        isoloss=isoloss,
        method=method,
    )
    return Trajectory(t=t, states={"W": Ws, "Wp": Wps, "Wa": Was}, params=record)
