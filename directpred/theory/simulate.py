"""``simulate``: one configured simulation of the linear (Eqs. 2-4) or reduced (Eqs. 11-13) model, from YAML.

The strict config of ``directpred theory simulate`` (:class:`SimulateConfig`) and :func:`run_simulate`, which writes
the trajectory, a summary and its figure.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from directpred.config import ConfigError, merge_into, parse_override, read_yaml, strict_json

# ----------------------------------------------------------------------------------------------------
# Config of `simulate`
# ----------------------------------------------------------------------------------------------------


@dataclass
class SimulateConfig:
    """Everything ``directpred theory simulate`` reads from YAML (unknown keys are errors).

    ``model: linear`` runs the full linear model (Eqs. 2-4) on data ``data`` and, if ``sgd_batch > 0``, the
    same model trained by minibatch SGD with learning rate ``dt``; ``model: reduced`` runs Eqs. 11-13 from ``p0``,
    ``s0``, ``tau0``.
    """

    model: Literal["linear", "reduced"] = "linear"
    predictor_rule: Literal["gradient", "directpred", "directcopy"] = "gradient"
    eps: float = 0.0
    isoloss: bool = False
    alpha_p: float = 1.0
    eta: float = 0.04
    beta: float = 0.4
    sigma2: float = 0.1
    dt: float = 0.01
    steps: int = 5000
    method: Literal["euler", "rk4"] = "euler"
    record_every: int = 10
    seed: int = 0
    # linear model
    n1: int = 10
    n2: int = 5
    mode: Literal["byol", "simsiam"] = "byol"
    stop_gradient: bool = True
    predictor: bool = True
    symmetric: bool = False
    data: Literal["isotropic", "anisotropic", "additive", "scrambling"] = "isotropic"
    init_scale: float = 1.0
    wa_init: Literal["zero", "copy"] = "zero"
    sgd_batch: int = 0
    rho: float = 0.0
    # reduced model
    p0: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.2, 0.4])
    s0: list[float] = field(default_factory=lambda: [0.0025, 0.01, 0.04, 0.16])
    tau0: float = 0.0
    ema: bool = True


# The keys each model reads: a key of the other model is an error rather than silently ignored (or, as p0 and s0 on
# the linear model were, checked against each other for nothing).
COMMON_KEYS = (
    "model",
    "predictor_rule",
    "eps",
    "isoloss",
    "alpha_p",
    "eta",
    "beta",
    "sigma2",
    "dt",
    "steps",
    "method",
    "record_every",
)
MODEL_KEYS = {
    "linear": (
        "n1",
        "n2",
        "mode",
        "stop_gradient",
        "predictor",
        "symmetric",
        "data",
        "init_scale",
        "wa_init",
        "sgd_batch",
        "rho",
        "seed",
    ),
    "reduced": ("p0", "s0", "tau0", "ema"),
}


def build_simulate_config(raw: dict[str, Any], overrides: Sequence[str] = ()) -> SimulateConfig:
    """Strictly merge YAML ``raw`` and ``--set key=value`` overrides into a validated :class:`SimulateConfig`.

    Parsing and type checks are the training configuration's (:mod:`directpred.config`); errors are
    :class:`directpred.config.ConfigError` (a ``ValueError``) naming the key. A key that the chosen ``model`` does
    not read (``p0`` with ``model: linear``, ``n1`` with ``model: reduced``) is an error naming the keys it reads.
    """
    cfg = SimulateConfig()
    merge_into(cfg, dict(raw or {}))
    given = list(raw or {})
    for ov in overrides:
        key, value = parse_override(ov)
        merge_into(cfg, {key: value})
        given.append(key)
    other = "reduced" if cfg.model == "linear" else "linear"
    stray = list(dict.fromkeys(k for k in given if k in MODEL_KEYS[other]))
    if stray:
        raise ConfigError(
            f"{', '.join(stray)} {'does' if len(stray) == 1 else 'do'} not apply to model: {cfg.model} (only to "
            f"model: {other}); remove {'it' if len(stray) == 1 else 'them'} or set model: {other}. The {cfg.model} "
            f"model reads: {', '.join(COMMON_KEYS + MODEL_KEYS[cfg.model])}"
        )
    checks = [
        (cfg.dt > 0, f"dt must be > 0, got {cfg.dt}"),
        (cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}"),
        (cfg.record_every >= 1, f"record_every must be >= 1, got {cfg.record_every}"),
        (cfg.eta >= 0, f"eta (weight decay) must be >= 0, got {cfg.eta}"),
        (cfg.alpha_p > 0, f"alpha_p must be > 0, got {cfg.alpha_p}"),
        (cfg.beta >= 0, f"beta must be >= 0, got {cfg.beta}"),
        (cfg.sigma2 >= 0, f"sigma2 must be >= 0, got {cfg.sigma2}"),
        (cfg.n1 >= 1 and cfg.n2 >= 1, f"n1 and n2 must be >= 1, got {cfg.n1}, {cfg.n2}"),
        (
            cfg.model == "reduced" or cfg.data != "scrambling" or cfg.n1 >= 2,
            f"data: scrambling needs n1 >= 2 (it scrambles the last n1 // 2 coordinates), got n1: {cfg.n1}",
        ),
        (cfg.sgd_batch >= 0, f"sgd_batch must be >= 0 (0 = no SGD run), got {cfg.sgd_batch}"),
        (cfg.init_scale > 0, f"init_scale must be > 0, got {cfg.init_scale}"),
        (
            cfg.model == "linear" or len(cfg.p0) == len(cfg.s0),
            f"p0 and s0 need equal lengths, got {len(cfg.p0)} and {len(cfg.s0)}",
        ),
        (all(s >= 0 for s in cfg.s0), "s0 (eigenvalues of F) must be >= 0"),
        (cfg.model == "linear" or len(cfg.p0) >= 1, "p0 and s0 need at least one mode, e.g. p0: [0.1], s0: [0.01]"),
        (
            cfg.model == "linear" or cfg.tau0 >= 0,
            f"tau0 (the initial EMA ratio W_a/W; 0 = the target starts at zero) must be >= 0, got {cfg.tau0}",
        ),
        (0 <= cfg.seed < 2**32, f"seed must lie in [0, 2**32) (it seeds numpy and torch), got {cfg.seed}"),
        (cfg.stop_gradient or cfg.mode == "simsiam", "stop_gradient: false needs mode: simsiam (Theorem 2)"),
        (
            math.isfinite(cfg.eps) and cfg.eps >= 0 and (cfg.eps == 0 or cfg.predictor_rule != "gradient"),
            f"eps must be >= 0, and 0 unless predictor_rule is directpred or directcopy (it is the closed-form "
            f"predictor's ε); got eps: {cfg.eps} with predictor_rule: {cfg.predictor_rule}",
        ),
        (
            cfg.predictor or cfg.predictor_rule == "gradient",
            f"predictor_rule: {cfg.predictor_rule} sets W_p from F, but predictor: false fixes W_p = I; drop one",
        ),
        (
            cfg.stop_gradient or not cfg.isoloss,
            "isoloss: true needs the stop-gradient target it is defined with; drop stop_gradient: false",
        ),
        (
            # IsoLoss gives W_p no gradient (as the trainer, which refuses it with a trained predictor); W_p = I
            # (linear model, predictor: false) has nothing to train
            not (cfg.isoloss and cfg.predictor_rule == "gradient" and (cfg.model == "reduced" or cfg.predictor)),
            "isoloss: true passes no gradient to the predictor (IsoLoss is p.detach() + z - z.detach()), but "
            "predictor_rule: gradient trains W_p by Eq. 2's gradient; set predictor_rule: directpred or directcopy "
            "(W_p set in closed form), or isoloss: false",
        ),
        (
            0 <= cfg.rho < 1 and (cfg.rho == 0 or (cfg.predictor_rule != "gradient" and cfg.sgd_batch > 0)),
            f"rho (the SGD run's F̂ moving-average rate, Eq. 19) must lie in [0, 1) and is read only with a "
            f"closed-form predictor_rule and sgd_batch > 0; got rho: {cfg.rho}",
        ),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    return cfg


def load_simulate_config(path: str | Path, overrides: Sequence[str] = ()) -> SimulateConfig:
    """Read a YAML file and apply overrides (see :func:`build_simulate_config`)."""
    raw = read_yaml(Path(path)) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values")
    training = [k for k in ("method", "predictor", "backbone", "train", "optim") if isinstance(raw.get(k), dict)]
    if training:  # its `data: {...}` section was refused as a value of the simulation's data (a distribution)
        raise ConfigError(
            f"{path} is a training config (it has {', '.join(f'{k}:' for k in training)} sections): train with it "
            f"by `directpred train {path}`; `directpred theory simulate` takes a simulation config "
            "(configs/theory/*.yaml)"
        )
    return build_simulate_config(raw, overrides)


def run_simulate(cfg: SimulateConfig, out: Path) -> dict[str, Any]:
    """Run one configured simulation; write ``trajectory.npz``, ``summary.json`` and ``summary.png`` into
    ``out``, and ``sgd.npz`` when the configuration also runs minibatch SGD."""
    from directpred.theory import plots
    from directpred.theory.dynamics import simulate_linear
    from directpred.theory.invariants import theorem1_applies, track
    from directpred.theory.reduced import isoloss_fixed_point, p_star, simulate_reduced
    from directpred.theory.sgd import make_data, simulate_sgd

    held = [name for name in ("config.yaml", "checkpoints") if (out / name).exists()]
    if held:  # its summary.json (the run's accuracies and verdicts) would be replaced by the simulation's
        raise ConfigError(
            f"--out {out} is a training run's directory (it holds {' and '.join(held)}): the simulation's "
            "summary.json would replace the run's; give the simulation a folder of its own, e.g. "
            f"--out {out / 'theory'}"
        )
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"config": dataclasses.asdict(cfg)}
    if cfg.model == "reduced":
        tau0 = cfg.tau0
        tr = simulate_reduced(
            cfg.p0,
            cfg.s0,
            tau0,
            sigma2=cfg.sigma2,
            dt=cfg.dt,
            steps=cfg.steps,
            ema=cfg.ema,
            method=cfg.method,
            record_every=cfg.record_every,
            alpha_p=cfg.alpha_p,
            eta=cfg.eta,
            beta=cfg.beta,
            predictor_rule=cfg.predictor_rule,
            eps=cfg.eps,
            isoloss=cfg.isoloss,
        )
        _stop_if_diverged("simulation", tr, "trajectory.npz", cfg, out, summary)
        tr.save(out / "trajectory.npz")
        keys = [k for k in ("p", "s", "tau", "K") if k in tr.states]  # no K for a closed-form W_p
        fig, axes = plots.new_figure(1, len(keys))
        for ax, key in zip(axes[0], keys):
            plots.lines(ax, tr.t, tr[key], color="C0")
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("t")
        if "K" in tr.states:
            axes[0, 3].axhline(0, color="k", lw=0.6)
        plots.save(fig, str(out / "summary.png"))
        summary.update(
            p_final=tr.p[-1],
            s_final=tr.s[-1],
            tau_final=tr.tau[-1],
            p_star_at_tau1=p_star(1.0, cfg.eta, cfg.sigma2),
        )
        if cfg.predictor_rule == "gradient":  # Theorem 3's K is about the gradient-trained W_p
            summary["K_min"] = float(tr.K.min())
        if cfg.isoloss:
            summary["p_star_isoloss_at_tau1"] = isoloss_fixed_point(1.0, cfg.eta, cfg.sigma2)
    else:
        rng = np.random.default_rng(cfg.seed)
        W = cfg.init_scale * rng.normal(size=(cfg.n2, cfg.n1)) / np.sqrt(cfg.n1)
        Wp = cfg.init_scale * rng.normal(size=(cfg.n2, cfg.n2)) / np.sqrt(cfg.n2)
        Wa = np.zeros_like(W) if cfg.wa_init == "zero" else W.copy()
        data = make_data(cfg.data, cfg.n1, cfg.sigma2)
        tr = simulate_linear(
            W,
            Wp,
            Wa,
            data.X,
            data.Xp,
            dt=cfg.dt,
            steps=cfg.steps,
            method=cfg.method,
            record_every=cfg.record_every,
            alpha_p=cfg.alpha_p,
            eta=cfg.eta,
            beta=cfg.beta,
            mode=cfg.mode,
            stop_gradient=cfg.stop_gradient,
            predictor=cfg.predictor,
            symmetric=cfg.symmetric,
            predictor_rule=cfg.predictor_rule,
            eps=cfg.eps,
            isoloss=cfg.isoloss,
        )
        _stop_if_diverged("gradient-flow simulation", tr, "trajectory.npz", cfg, out, summary)
        q = track(tr)
        tr.save(out / "trajectory.npz", **q)
        fig, axes = plots.new_figure(2, 3)
        theorem1 = theorem1_applies(tr.params)
        plots.linear_summary(axes, tr.t, q, label="gradient flow", color="C0", theorem1=theorem1)
        summary["theorem1_applies"] = theorem1
        summary["flow"] = {k: v[-1] for k, v in q.items()}
        summary["flow"]["balance_error_max"] = float(q["balance_error"].max())
        if cfg.sgd_batch > 0:
            sg = simulate_sgd(
                W,
                Wp,
                Wa,
                data,
                lr=cfg.dt,
                steps=cfg.steps,
                batch=cfg.sgd_batch,
                seed=cfg.seed,
                record_every=cfg.record_every,
                alpha_p=cfg.alpha_p,
                eta=cfg.eta,
                beta=cfg.beta,
                mode=cfg.mode,
                stop_gradient=cfg.stop_gradient,
                predictor=cfg.predictor,
                symmetric=cfg.symmetric,
                predictor_rule=cfg.predictor_rule,
                eps=cfg.eps,
                isoloss=cfg.isoloss,
                rho=cfg.rho,
            )
            _stop_if_diverged("SGD simulation", sg, "sgd.npz", cfg, out, summary)
            qs = track(sg)
            sg.save(out / "sgd.npz", **qs)
            plots.linear_summary(axes, sg.t, qs, label=f"SGD (batch {cfg.sgd_batch})", color="C1", theorem1=theorem1)
            summary["sgd"] = {k: v[-1] for k, v in qs.items()}
            summary["sgd_vs_flow_rel_W"] = float(np.linalg.norm(sg.W[-1] - tr.W[-1]) / np.linalg.norm(tr.W[-1]))
        axes[1, 1].legend(fontsize=7)
        plots.save(fig, str(out / "summary.png"))
    _write_summary(out, summary)
    return summary


def _write_summary(out: Path, summary: dict[str, Any]) -> None:
    from directpred.theory.dynamics import _jsonable

    # Atomically (a temporary file renamed over it), without the training code's writer: the toolkit needs no torch.
    tmp = out / "summary.json.tmp"
    tmp.write_text(strict_json(_jsonable(summary), indent=1) + "\n")
    os.replace(tmp, out / "summary.json")


def _stop_if_diverged(name: str, tr: Any, file: str, cfg: SimulateConfig, out: Path, summary: dict[str, Any]) -> None:
    """Raise :class:`SimulationDiverged` if trajectory ``tr`` reached a non-finite state, after writing it to ``file``
    and ``summary.json`` (with ``diverged_at_t``) into ``out``."""
    t = _first_nonfinite(tr)
    if t is None:
        return
    tr.save(out / file)
    summary["diverged_at_t"] = {name: t}
    _write_summary(out, summary)
    raise SimulationDiverged(
        f"the {name} diverged: a state is not finite from t={t:g} (step {round(t / cfg.dt)}); lower dt (now "
        f"{cfg.dt:g}). The trajectory and summary.json (non-finite values as null) are in {out}"
    )


class SimulationDiverged(ValueError):
    """A simulated trajectory reached a non-finite state (a step size ``dt`` too large for the dynamics)."""


def _first_nonfinite(tr: Any) -> float | None:
    """When trajectory ``tr`` diverged: the recorded time from which a state stays NaN or infinite to the end (None:
    every state ends finite; a record not yet defined, such as the SGD loss at t = 0, is no divergence)."""
    first: list[int] = []
    for v in tr.states.values():
        finite = np.isfinite(np.asarray(v, dtype=float).reshape(len(tr.t), -1)).all(axis=1)
        if not finite[-1]:
            last_finite = np.flatnonzero(finite)
            first.append(int(last_finite[-1]) + 1 if last_finite.size else 0)
    return float(tr.t[min(first)]) if first else None
