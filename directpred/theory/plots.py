"""Plotting for the theory toolkit: every function draws on an ``ax``. Figures come from the package's plotting
module (:mod:`directpred.diagnostics.plots`, object-oriented ``Figure`` API, no global backend switch)."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from directpred.diagnostics import plots as _plots
from directpred.theory.reduced import (
    ScalarParams,
    fixed_points,
    jacobian_ps,
    rhs_parabola,
    rhs_parabola_dp,
    rhs_ps,
    rhs_scalar,
)

STABLE, UNSTABLE = "tab:red", "tab:green"  # the paper's colours in Fig. 3


def new_figure(nrows: int, ncols: int, *, size: tuple[float, float] = (3.2, 2.6)) -> tuple[Figure, np.ndarray]:
    """A figure with an ``(nrows, ncols)`` array of axes, each ``size`` inches."""
    return _plots.new_figure(nrows, ncols, width=size[0], height=size[1])


def image_formats() -> list[str]:
    """The file extensions (without the dot) matplotlib can write here, sorted: ``pgf`` only where a TeX engine
    (``xelatex``, ``lualatex`` or ``pdflatex``) is on the PATH, as matplotlib's pgf backend runs one to lay out the
    text (without it, saving raised RuntimeError: 'xelatex' not found)."""
    import shutil

    formats = set(Figure().canvas.get_supported_filetypes())
    if not any(shutil.which(tex) for tex in ("xelatex", "lualatex", "pdflatex")):
        formats.discard("pgf")
    return sorted(formats)


def save(fig: Figure, path: str, *, dpi: int = 100) -> None:
    """Save with a tight layout."""
    _plots.save_figure(fig, path, dpi=dpi)


def phase_portrait(
    ax: Axes,
    *,
    alpha_p: float,
    eta: float,
    tau: float,
    sigma2: float,
    p_range: tuple[float, float] = (-0.6, 1.6),
    s_range: tuple[float, float] = (0.0, 2.0),
    density: float = 1.0,
) -> None:
    """Streamlines of Eqs. 11-12 at fixed τ with fixed points (red stable, green unstable) and ``s =
    p²/α_p``."""
    p = np.linspace(*p_range, 60)
    s = np.linspace(*s_range, 60)
    P, S = np.meshgrid(p, s)
    dP, dS = rhs_ps(P, S, tau, alpha_p=alpha_p, eta=eta, sigma2=sigma2)
    speed = np.hypot(dP, dS)
    ax.streamplot(
        P,
        S,
        dP,
        dS,
        color=np.log10(speed + 1e-6),
        cmap="Blues",
        density=density,
        linewidth=0.7,
        arrowsize=0.7,
    )
    ax.plot(p, p**2 / alpha_p, "k--", lw=1, label=r"$s=p^2/\alpha_p$")
    lam = 1.0 + sigma2
    if eta == 0:
        # lines of fixed points: s = 0 (collapsed, stable where p(τ − λp) < 0) and p = τ/λ (stable for s > 0)
        stable = p * (tau - lam * p) < 0
        ax.plot(np.where(stable, p, np.nan), np.zeros_like(p), color=STABLE, lw=3, clip_on=False)
        ax.plot(np.where(~stable, p, np.nan), np.zeros_like(p), color=UNSTABLE, lw=3, clip_on=False)
        ax.axvline(tau / lam, color=STABLE, lw=2)
    else:
        for q in fixed_points(tau, eta, sigma2):
            ev = np.linalg.eigvals(jacobian_ps(q, q**2 / alpha_p, tau, alpha_p=alpha_p, eta=eta, sigma2=sigma2))
            col = STABLE if ev.real.max() < 0 else UNSTABLE
            big = col == STABLE  # stable markers larger, so p*₋ next to 0 (weak η) stays visible on top
            ax.plot(
                q,
                q**2 / alpha_p,
                "o",
                color=col,
                ms=9 if big else 5,
                mec="k",
                zorder=5 if big else 6,
                clip_on=False,
            )
    ax.set_xlim(*p_range)
    ax.set_ylim(*s_range)
    ax.set_xlabel(r"$p_j$")
    ax.set_ylabel(r"$s_j$")
    ax.set_title(rf"$\eta={eta:g}$, $\tau={tau:g}$, $\alpha_p={alpha_p:g}$, $\sigma^2={sigma2:g}$", fontsize=9)


def fixed_point_line(
    ax: Axes, *, tau: float, eta: float, sigma2: float, p_range: tuple[float, float] = (-0.3, 1.1)
) -> None:
    """Eq. 16, ``ṗ = −(1+σ²)p(p − p*₋)(p − p*₊)`` on the invariant parabola, with its fixed points and flow
    arrows."""
    p = np.linspace(*p_range, 400)
    f = rhs_parabola(p, tau, eta, sigma2)
    ax.plot(p, f, "k", lw=1.2)
    ax.axhline(0, color="0.5", lw=0.8)
    for q in fixed_points(tau, eta, sigma2):
        d = rhs_parabola_dp(q, tau, eta, sigma2)
        stable = d < 0 if eta > 0 or q > 0 else False  # at η = 0, p = 0 is a saddle (Fig. 4a)
        ax.plot(q, 0, "o", ms=8, mec="k", color=STABLE if stable else "white", zorder=5)
    xs = np.linspace(p_range[0] + 0.05, p_range[1] - 0.05, 9)
    for x in xs:
        v = rhs_parabola(x, tau, eta, sigma2)
        if abs(v) > 1e-4:
            ax.annotate(
                "",
                xy=(x + 0.04 * np.sign(v), 0),
                xytext=(x, 0),
                arrowprops=dict(arrowstyle="->", color="tab:blue", lw=1.2),
            )
    ax.set_xlabel(r"$p_j$")
    ax.set_ylabel(r"$\dot p_j$")


def lines(
    ax: Axes,
    t: np.ndarray,
    y: np.ndarray,
    *,
    label: str | None = None,
    color: str | None = None,
    logy: bool = False,
    **kw: Any,
) -> None:
    """Plot ``y`` (T,) or (T, k) against ``t``; all columns share ``color`` and the first carries
    ``label``; ``kw``: further :class:`matplotlib.lines.Line2D` properties (``ls``, ``lw``, ...)."""
    y = np.asarray(y).reshape(len(t), -1)
    for k in range(y.shape[1]):
        ax.plot(t, y[:, k], color=color, label=label if k == 0 else None, **kw)
    if logy:
        ax.set_yscale("log")


def band(ax: Axes, t: np.ndarray, runs: np.ndarray, *, label: str, color: str) -> None:
    """Mean ± standard deviation over runs (axis 1 of ``runs``, shape (T, R))."""
    m, s = runs.mean(axis=1), runs.std(axis=1)
    ax.plot(t, m, color=color, label=label)
    ax.fill_between(t, m - s, m + s, color=color, alpha=0.25, lw=0)


def scalar_portrait(ax: Axes, *, wa: float, lambda_s: float, lambda_d: float, alpha_p: float) -> None:
    """App. D, Eqs. 104-105 at fixed ``w_a``: flow in ``(w, w_p)``, the hyperbola of minima and the saddle
    at 0."""
    w = np.linspace(-1.5, 1.5, 50)
    W, P = np.meshgrid(w, w)
    d = rhs_scalar(0.0, np.stack([P, W, np.full_like(W, wa)]), ScalarParams(lambda_s, lambda_d, alpha_p, 0.0))
    ax.streamplot(W, P, d[1], d[0], color="0.6", density=0.9, linewidth=0.6, arrowsize=0.7)
    c = wa * lambda_d / lambda_s
    with np.errstate(divide="ignore"):
        for sgn in (-1, 1):
            x = sgn * np.linspace(0.05, 1.5, 100)
            ax.plot(x, c / x, color=STABLE, lw=2, label=r"$w_p w = w_a\lambda_d/\lambda_s$" if sgn > 0 else None)
    ax.plot(0, 0, "o", color=UNSTABLE, mec="k", ms=7, label="saddle")
    ax.plot(w, w, "k:", lw=1, label=r"$w=w_p$")
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.5, 1.5)
    ax.set_xlabel(r"$w$")
    ax.set_ylabel(r"$w_p$")


def linear_summary(
    axes: np.ndarray,
    t: np.ndarray,
    q: dict[str, np.ndarray],
    *,
    label: str = "",
    color: str = "C0",
    theorem1: bool = True,
) -> None:
    """Six panels of tracked quantities (from :func:`directpred.theory.invariants.track`) on ``axes`` (>= 6).

    Panels: eigenvalues of Wp, eigenvalues of F, ‖[F, Wp]‖, alignment, Theorem 1 balance vs its prediction (drawn
    only with ``theorem1``: :func:`directpred.theory.invariants.theorem1_applies`), ‖W‖.
    """
    ax = axes.ravel()
    lines(ax[0], t, q["eig_Wp"], color=color, label=label)
    ax[0].set_title(r"eig($W_p$) (real part)", fontsize=9)
    lines(ax[1], t, q["eig_F"], color=color, label=label)
    ax[1].set_title(r"eig($F=WXW^\top$)", fontsize=9)
    lines(ax[2], t, q["commutator"] + 1e-300, color=color, label=label, logy=True)
    ax[2].set_title(r"$\|[F,W_p]\|_F$", fontsize=9)
    lines(ax[3], t, q["alignment"], color=color, label=label)
    ax[3].set_title(r"alignment $\cos(W_p u_j,u_j)$", fontsize=9)
    lines(ax[4], t, q["balance"], color=color, label=f"{label} simulated".strip())
    if theorem1:
        lines(ax[4], t, q["balance_prediction"], color="k", ls="--", label=r"$e^{-2\eta t}\|C\|$ (Thm 1)")
        ax[4].set_title(r"$\|W_p^\top W_p-\alpha_p WW^\top\|_F$", fontsize=9)
    else:  # no stop-gradient, no predictor or a symmetrised one: Theorem 1 does not hold, so no prediction is drawn
        ax[4].set_title(r"$\|W_p^\top W_p-\alpha_p WW^\top\|_F$ (Thm 1 n/a)", fontsize=9)
    lines(ax[5], t, q["norm_W"], color=color, label=label)
    ax[5].set_title(r"$\|W\|_F$", fontsize=9)
    for a in ax[:6]:
        a.set_xlabel("t")
