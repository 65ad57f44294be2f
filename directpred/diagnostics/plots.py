"""Figures of training runs: the only module importing matplotlib (Agg); every function takes an ``ax``.

Examples:
    >>> fig, axes = new_figure()
    >>> plot_curves(axes[0][0], {"run": ([0, 1, 2], [1.0, 0.5, 0.2])}, ylabel="loss")
    >>> save_figure(fig, "/tmp/loss.png")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

Curve = tuple[Sequence[float], Sequence[float | None]]


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 5.0,
               height: float = 3.6) -> tuple[Figure, np.ndarray]:
    """A figure with ``nrows x ncols`` axes of ``width x height`` inches each; ``axes[row][col]``."""
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (folders created) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(ax: Axes, curves: Mapping[str, Curve], *, ylabel: str, xlabel: str = "step", title: str = "",
                logy: bool = False, hlines: Mapping[str, float] | None = None,
                markers: Mapping[str, float | None] | None = None) -> None:
    """One line per run (label -> (x, y)); ``None`` values in y are gaps.

    Args:
        ax: where to draw.
        curves: the runs to overlay.
        ylabel, xlabel, title: labels.
        logy: logarithmic y axis.
        hlines: reference levels, label -> y (drawn dashed, e.g. a collapse threshold).
        markers: label -> x of an event (e.g. the step a run was flagged collapsed), drawn as a dotted line in
            the run's colour.
    """
    for label, (x, y) in curves.items():
        yy = np.array([np.nan if v is None else float(v) for v in y])
        (line,) = ax.plot(np.asarray(x, dtype=float), yy, label=label, marker="." if len(yy) < 30 else None)
        if markers and markers.get(label) is not None:
            ax.axvline(float(markers[label]), color=line.get_color(), ls=":", lw=1.2)
    for text, level in (hlines or {}).items():
        ax.axhline(level, color="grey", ls="--", lw=0.8)
        ax.annotate(text, (0.01, level), xycoords=("axes fraction", "data"), fontsize=7, color="grey",
                    va="bottom")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if curves:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_heatmap(ax: Axes, steps: Sequence[float], values: np.ndarray, *, ylabel: str, title: str = "",
                 cbar_label: str = "", vmin: float | None = None, vmax: float | None = None,
                 cmap: str = "viridis") -> None:
    """A (time x index) heat map: ``values[t, j]`` at report step ``steps[t]``, index j on the y axis.

    Used for the spectrum ``log10(s_j / s_max)`` and the per-eigenvector alignment ``cos(W_p u_j, u_j)`` over
    training (eigenvectors in descending order of s_j, so the top of F's spectrum is at the bottom).
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        return
    steps = np.asarray(steps, dtype=float)
    x_edges = _edges(steps)
    y_edges = np.arange(values.shape[1] + 1) - 0.5
    mesh = ax.pcolormesh(x_edges, y_edges, values.T, shading="flat", vmin=vmin, vmax=vmax, cmap=cmap)
    cb = ax.figure.colorbar(mesh, ax=ax)
    if cbar_label:
        cb.set_label(cbar_label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)


def _edges(x: np.ndarray) -> np.ndarray:
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = 0.5 * (x[1:] + x[:-1])
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def note(ax: Axes, text: str) -> None:
    """An empty panel saying why it is empty."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])
