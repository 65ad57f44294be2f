"""Minibatch SGD of the linear model on sampled data, and the data models of §2, Assumption 2 and Appendix D.

A minibatch SGD step is an Euler step of :func:`directpred.theory.dynamics.linear_field` with the population
moments ``(S11, S21, S22)`` replaced by minibatch estimates, so its large-batch, small-step limit is the
gradient flow of Lemma 1 (Eqs. 2-4). Each data model knows its exact ``X = Σ^d`` and ``X' = Σ^s − Σ^d``
so a run can be compared with its gradient-flow prediction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from directpred.theory.dynamics import (
    Method,
    Mode,
    PredictorRule,
    Trajectory,
    check_linear_args,
    check_run_args,
    closed_form_predictor,
    flow_params,
    linear_field,
    run_record,
    sym,
)

Array = np.ndarray


@dataclass(frozen=True)
class GaussianViews:
    """``x ~ N(0, Σx)``, views ``x_i = x + n_i`` with independent ``n_i ~ N(0, Σn)``.

    Isotropic data (Assumption 2) is ``Σx = I, Σn = σ²I``; Appendix D's *additive noise* model is a general
    ``Σn``, with ``Σ^s = Σx + Σn`` and ``Σ^d = Σx``.
    """

    Sigma_x: Array
    Sigma_n: Array

    @property
    def X(self) -> Array:
        """``X = Σ^d = E[x1 x2ᵀ]``."""
        return np.asarray(self.Sigma_x, dtype=np.float64)

    @property
    def Xp(self) -> Array:
        """``X' = Σ^s − Σ^d``."""
        return np.asarray(self.Sigma_n, dtype=np.float64)

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[Array, Array]:
        """Draw a minibatch of view pairs ``(x1, x2)``, each (batch, n1)."""
        n = self.X.shape[0]
        Lx = _sqrtm_psd(self.X)
        Ln = _sqrtm_psd(self.Xp)
        x = rng.standard_normal((batch, n)) @ Lx.T
        return x + rng.standard_normal((batch, n)) @ Ln.T, x + rng.standard_normal((batch, n)) @ Ln.T


@dataclass(frozen=True)
class Scrambling:
    """Appendix D's multiplicative scrambling: ``x_i = A_i x`` with ``A_i = P^c + U B_i Uᵀ``.

    ``U`` (n1, k) has orthonormal columns (the scrambled subspace), ``P^c = I − UUᵀ``, and ``B_i`` has i.i.d.
    ``N(0, 1/k)`` entries, so ``E[B M Bᵀ] = tr(M)/k · I`` (as for a random rotation). Then
    ``Σ^d = P^c Σx P^c`` and ``Σ^s = P^c Σx P^c + tr(UᵀΣxU)/k · UUᵀ``; if Σx is isotropic inside
    span(U) and commutes with P^c this is ``Σx`` and ``Σ^d[Σ^s]⁻¹ = P^c``: it learns the clean subspace.
    """

    Sigma_x: Array
    U: Array

    @property
    def Pc(self) -> Array:
        return np.eye(self.U.shape[0]) - self.U @ self.U.T

    @property
    def X(self) -> Array:
        return self.Pc @ self.Sigma_x @ self.Pc

    @property
    def Xp(self) -> Array:
        k = self.U.shape[1]
        return np.trace(self.U.T @ self.Sigma_x @ self.U) / k * (self.U @ self.U.T)

    def sample(self, rng: np.random.Generator, batch: int) -> tuple[Array, Array]:
        """Draw a minibatch of view pairs; each sample gets its own ``B``."""
        n, k = self.U.shape
        x = rng.standard_normal((batch, n)) @ _sqrtm_psd(np.asarray(self.Sigma_x, dtype=np.float64)).T
        xu = x @ self.U  # (B, k) coordinates in the scrambled subspace
        views = []
        for _ in range(2):
            Bm = rng.standard_normal((batch, k, k)) / np.sqrt(k)
            views.append(x @ self.Pc + np.einsum("bij,bj->bi", Bm, xu) @ self.U.T)
        return views[0], views[1]


DataModel = GaussianViews | Scrambling


def _sqrtm_psd(A: Array) -> Array:
    w, V = np.linalg.eigh(sym(np.asarray(A, dtype=np.float64)))
    return (V * np.sqrt(np.clip(w, 0.0, None))) @ V.T


def make_data(kind: str, n1: int, sigma2: float) -> DataModel:
    """The named data models used by the CLI configs.

    * ``isotropic``: ``Σx = I``, ``Σn = σ²I`` (Assumption 2);
    * ``anisotropic``: ``Σx = diag(geomspace(1, 0.1, n1))``, ``Σn = σ²I``;
    * ``additive``: ``Σx = I``, ``Σn = σ² diag(linspace(0, 4, n1))`` (App. D: noisy directions attenuated);
    * ``scrambling``: ``Σx = I``, the last ``n1 // 2`` coordinates scrambled (App. D); needs ``n1 >= 2`` (with
      ``n1 = 1`` no coordinate is scrambled and ``X'`` divides by zero).

    Raises:
        ValueError: an unknown ``kind``, ``n1 < 1`` (``n1 < 2`` for ``scrambling``) or ``sigma2 < 0``.
    """
    if isinstance(n1, bool) or int(n1) != n1 or n1 < 1:
        raise ValueError(f"n1 (the input dimension) must be an integer >= 1, got {n1!r}")
    if not (np.isfinite(sigma2) and sigma2 >= 0):
        raise ValueError(f"sigma2 (the augmentation variance) must be >= 0, got {sigma2!r}")
    if kind == "isotropic":
        return GaussianViews(np.eye(n1), sigma2 * np.eye(n1))
    if kind == "anisotropic":
        return GaussianViews(np.diag(np.geomspace(1.0, 0.1, n1)), sigma2 * np.eye(n1))
    if kind == "additive":
        return GaussianViews(np.eye(n1), sigma2 * np.diag(np.linspace(0.0, 4.0, n1)))
    if kind == "scrambling":
        if n1 < 2:
            raise ValueError(
                f"n1 (the input dimension) must be an integer >= 2 for the scrambling data model (it scrambles the "
                f"last n1 // 2 coordinates), got {n1!r}"
            )
        k = n1 // 2
        return Scrambling(np.eye(n1), np.eye(n1)[:, n1 - k :])
    raise ValueError(f"unknown data model {kind!r}; allowed: isotropic, anisotropic, additive, scrambling")


def simulate_sgd(
    W: Array,
    Wp: Array | None,
    Wa: Array | None,
    data: DataModel,
    *,
    alpha_p: float,
    eta: float,
    beta: float,
    lr: float,
    steps: int,
    batch: int,
    seed: int = 0,
    mode: Mode = "byol",
    stop_gradient: bool = True,
    predictor: bool = True,
    symmetric: bool = False,
    record_every: int = 1,
    predictor_rule: PredictorRule = "gradient",
    eps: float = 0.0,
    isoloss: bool = False,
    rho: float = 0.0,
) -> Trajectory:
    """Train the linear model by minibatch SGD on sampled view pairs (loss Eq. 1, weight decay, EMA target).

    Per step, with learning rate α = ``lr``: ``Wp -= α(α_p ∇_Wp J + η Wp)``, ``W -= α(∇_W J + η W)`` and
    ``Wa += αβ(W − Wa)``, i.e. an Euler step of Eqs. 2-4 with minibatch moments. Time is ``t = k·lr``,
    comparable with :func:`simulate_linear` at ``dt = lr``.

    With a closed-form ``predictor_rule`` (DirectPred, paper §4), each step first folds the minibatch's
    predictor-input correlation ``W (x1ᵀx1/B) Wᵀ`` into the running estimate ``F̂ ← ρ F̂ + (1−ρ)·(batch term)``
    (Eq. 19; the first step takes the batch term as it is), then sets ``W_p`` from F̂ and takes the W step with it.

    Args:
        W: Initial online weights (n2, n1), as for :func:`simulate_linear`.
        Wp: Initial predictor (n2, n2), as for :func:`simulate_linear`.
        Wa: Initial target weights (n2, n1), as for :func:`simulate_linear`.
        data: A data model with ``sample``, ``X`` and ``Xp``.
        alpha_p: The predictor's relative learning rate α_p (Eqs. 2-4).
        eta: Weight decay η (Eqs. 2-4).
        beta: EMA rate β of the target (Eqs. 2-4).
        lr: Learning rate α (> 0).
        steps: Number of SGD steps.
        batch: Minibatch size.
        seed: Seed of the sampler.
        mode: ``"byol"`` or ``"simsiam"``, as in :func:`simulate_linear`.
        stop_gradient: False for Theorem 2's ablation, as in :func:`simulate_linear`.
        predictor: False for W_p = I, as in :func:`simulate_linear`.
        symmetric: True to keep W_p symmetric (Assumption 3), as in :func:`simulate_linear`.
        record_every: Record every k-th step.
        predictor_rule: ``"gradient"``, ``"directpred"`` or ``"directcopy"``, as in :func:`simulate_linear`.
        eps: ε of the closed-form rule, as in :func:`simulate_linear`.
        isoloss: IsoLoss's gradient for W, as in :func:`simulate_linear`.
        rho: ρ of F̂'s moving average (Eq. 19), in [0, 1); 0 uses each minibatch's own estimate.

    Returns:
        Trajectory with states ``W``, ``Wp``, ``Wa`` and ``loss`` (minibatch loss before each recorded step's
        update, NaN at t = 0); ``params['X']``/``params['Xp']`` hold the data model's exact statistics. With a
        closed-form rule, the recorded ``Wp`` is the one the step used (at t = 0: the predictor of the exact
        ``F = W(0)(X + X')W(0)ᵀ``).
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
    check_run_args(lr, steps, record_every)
    if int(batch) != batch or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if not 0.0 <= rho < 1.0:
        raise ValueError(f"rho (F̂'s moving-average rate, Eq. 19) must lie in [0, 1), got {rho!r}")
    if rho != 0 and predictor_rule == "gradient":
        raise ValueError(f"rho={rho} is the closed-form predictor's F̂ rate; set predictor_rule or rho to 0")
    rng = np.random.default_rng(seed)
    W = np.array(W, dtype=np.float64)
    n2, n1 = W.shape
    n_data = np.shape(data.X)[0]
    if n1 != n_data:
        raise ValueError(f"W (n2, n1) must have n1 = {n_data} columns, the data model's dimension; got {W.shape}")
    closed = predictor_rule != "gradient"
    if predictor and not closed and Wp is None:
        raise ValueError("Wp is required when predictor=True")
    Wp = np.eye(n2) if not predictor or closed else np.array(Wp, dtype=np.float64)
    if Wp.shape != (n2, n2):
        raise ValueError(f"Wp must have shape {(n2, n2)} for W of shape {W.shape}, got {Wp.shape}")
    if symmetric:
        Wp = sym(Wp)
    Wa = W.copy() if (mode == "simsiam" or Wa is None) else np.array(Wa, dtype=np.float64)
    if Wa.shape != W.shape:
        raise ValueError(f"Wa must have the shape of W {W.shape}, got {Wa.shape}")
    base = flow_params(
        data.X,
        data.Xp,
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
    if closed:
        Wp = closed_form_predictor(W @ base.S11 @ W.T, predictor_rule, eps)
    F_hat: Array | None = None
    rec = sorted(set(range(0, steps + 1, record_every)) | {steps})
    out = {k: np.empty((len(rec),) + a.shape) for k, a in (("W", W), ("Wp", Wp), ("Wa", Wa))}
    loss = np.full(len(rec), np.nan)
    out["W"][0], out["Wp"][0], out["Wa"][0] = W, Wp, Wa
    i = 1
    for k in range(1, steps + 1):
        x1, x2 = data.sample(rng, batch)
        p = replace(base, S11=x1.T @ x1 / batch, S21=x2.T @ x1 / batch, S22=x2.T @ x2 / batch)
        if closed:
            F_batch = W @ p.S11 @ W.T
            F_hat = F_batch if F_hat is None else rho * F_hat + (1.0 - rho) * F_batch
            Wp = closed_form_predictor(F_hat, predictor_rule, eps)
        dW, dWp, dWa = linear_field(W, Wp, Wa, p, F=F_hat)
        if i < len(rec) and k == rec[i]:
            target = x2 @ (W if mode == "simsiam" else Wa).T
            loss[i] = 0.5 * np.mean(np.sum((x1 @ W.T @ Wp.T - target) ** 2, axis=1))
        W, Wp, Wa = W + lr * dW, Wp + lr * dWp, Wa + lr * dWa
        if i < len(rec) and k == rec[i]:
            out["W"][i], out["Wp"][i], out["Wa"][i] = W, Wp, Wa
            i += 1
    record = run_record(
        "sgd",
        alpha_p=alpha_p,
        eta=eta,
        beta=beta,
        dt=lr,
        steps=steps,
        mode=mode,
        stop_gradient=stop_gradient,
        predictor=predictor,
        symmetric=symmetric,
        record_every=record_every,
        n1=n1,
        n2=n2,
        X=data.X,
        Xp=data.Xp,
        predictor_rule=predictor_rule,
        eps=eps,
        isoloss=isoloss,
        batch=int(batch),
        rho=float(rho),
        seed=int(seed),
        data=type(data).__name__,
    )
    return Trajectory(t=lr * np.asarray(rec, dtype=np.float64), states={**out, "loss": loss}, params=record)


__all__ = ["GaussianViews", "Scrambling", "DataModel", "make_data", "simulate_sgd", "Method"]
