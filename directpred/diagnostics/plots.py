"""Figures of training runs and sweeps (``directpred plot``, ``directpred sweep``): with the theory's
:mod:`directpred.theory.plots`, the only module importing matplotlib. Object-oriented API only (``Figure``, no pyplot):
no global backend is chosen or switched, so notebooks keep theirs. Primitives take an ``ax``.

Over 300 lines: the primitives, the run figures and the sweep figures share the helpers and belong together.

Examples:
    >>> fig, axes = new_figure()
    >>> plot_curves(axes[0][0], {"run": ([0, 1, 2], [1.0, 0.5, 0.2])}, ylabel="loss")
    >>> save_figure(fig, "/tmp/loss.png")  # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from directpred.config import ConfigError, read_json_object

ALIGN_TOP = 32  # eigenvectors shown in the alignment heat map (the rest of F^'s spectrum is ~1e-4 of s_max)

Curve = tuple[Sequence[float], Sequence[float | None]]


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 5.0, height: float = 3.6) -> tuple[Figure, np.ndarray]:
    """A figure with ``nrows x ncols`` axes of ``width x height`` inches each; ``axes[row][col]``."""
    fig = Figure(figsize=(width * ncols, height * nrows))
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG (folders created) with a tight layout."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


def plot_curves(
    ax: Axes,
    curves: Mapping[str, Curve],
    *,
    ylabel: str,
    xlabel: str = "step",
    title: str = "",
    logy: bool = False,
    hlines: Mapping[str, float] | None = None,
    markers: Mapping[str, float | None] | None = None,
    dim_markers: Mapping[str, float | None] | None = None,
) -> None:
    """One line per run (label -> (x, y)); ``None`` values in y are gaps.

    Args:
        ax: where to draw.
        curves: the runs to overlay.
        ylabel, xlabel, title: labels.
        logy: logarithmic y axis.
        hlines: reference levels, label -> y (drawn dashed, e.g. a collapse threshold).
        markers: label -> x of an event (e.g. the step a run was flagged collapsed), drawn as a dotted line in
            the run's colour.
        dim_markers: the same for a second kind of event (the dimensional-collapse warning), dash-dotted.
    """
    for label, (x, y) in curves.items():
        yy = np.array([np.nan if v is None else float(v) for v in y])
        (line,) = ax.plot(np.asarray(x, dtype=float), yy, label=label, marker="." if len(yy) < 30 else None)
        for events, style in ((markers, ":"), (dim_markers, "-.")):
            x_event = events.get(label) if events else None
            if x_event is not None:
                ax.axvline(float(x_event), color=line.get_color(), ls=style, lw=1.2)
    for text, level in (hlines or {}).items():
        ax.axhline(level, color="grey", ls="--", lw=0.8)
        ax.annotate(text, (0.01, level), xycoords=("axes fraction", "data"), fontsize=7, color="grey", va="bottom")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if curves:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def plot_heatmap(
    ax: Axes,
    steps: Sequence[float],
    values: np.ndarray,
    *,
    ylabel: str,
    title: str = "",
    cbar_label: str = "",
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "viridis",
) -> None:
    """A (time x index) heat map: ``values[t, j]`` at report step ``steps[t]``, index j on the y axis.

    Used for the spectrum ``log10(s_j / s_max)`` and the per-eigenvector alignment ``cos(W_p u_j, u_j)`` over
    training (eigenvectors in descending order of s_j, so the top of F's spectrum is at the bottom).
    """
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        return
    x_edges = _edges(np.asarray(steps, dtype=float))
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


# ------------------------------------------------------------------------------------------------------------
# Run figures (directpred plot)


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    from directpred.train.logger import read_metrics

    rows = read_metrics(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir}: no metrics.jsonl rows; give a run directory made by `directpred train`")
    return rows


def _number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _series(rows: list[dict[str, Any]], kind: str, key: str, x: str = "step") -> tuple[list, list]:
    """(x, value) of the ``kind`` rows that have ``key``; a value that is not a number (a hand-edited line) is left
    out with a warning instead of stopping the figure."""
    pts = [(r[x], r.get(key)) for r in rows if r.get("kind") == kind and key in r and x in r]
    bad = [p for p in pts if not (_number(p[0]) and _number(p[1]))]
    if bad:
        warnings.warn(
            f"metrics.jsonl: {len(bad)} {kind} row(s) with a {key} or {x} that is not a number (first: {bad[0]!r}) "
            "left out of the plots",
            stacklevel=2,
        )
        pts = [p for p in pts if _number(p[0]) and _number(p[1])]
    return [p[0] for p in pts], [p[1] for p in pts]


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        return {}
    return read_json_object(path, "the plots leave out its final values") or {}


def _labels(run_dirs: list[Path]) -> list[str]:
    names = [p.name or str(p) for p in run_dirs]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(run_dirs, names)]


def make_plots(run_dirs: list[Path], out_dir: Path) -> list[Path]:
    """Write the PNG figures of ``run_dirs`` into ``out_dir``; returns their paths.

    ``overview.png`` overlays the runs (loss, kNN top-1, alignment weighted and unweighted, asymmetry, RankMe
    of the projections and of the representation, std of the normalised projections, loss per term, and the
    correlation of p_j with sqrt(s_j)); ``spectra_<run>.png`` shows, per run, heat
    maps of F^'s spectrum and of the per-eigenvector alignment over training (the paper's Fig. 2 view).
    """
    from directpred.diagnostics.hook import LOSS_PER_TERM_MAX, STD_RATIO_MAX  # torch: not for the theory's plots

    runs = {label: (d, _rows(d), _summary(d)) for label, d in zip(_labels(run_dirs), run_dirs)}
    flagged = {label: s.get("collapse_step") for label, (_, _, s) in runs.items()}
    dim_flagged = {label: s.get("dim_collapse_step") for label, (_, _, s) in runs.items()}
    ranks = {"markers": flagged, "dim_markers": dim_flagged}
    written = []

    fig, axes = new_figure(2, 5, width=4.4, height=3.4)
    # (row, column, log kind, metric, y label, title, further plot_curves arguments); the kNN panel is (0, 1)
    std_line = {f"collapse threshold {STD_RATIO_MAX}": STD_RATIO_MAX}
    loss_line = {f"collapse threshold {LOSS_PER_TERM_MAX}": LOSS_PER_TERM_MAX}
    panels: list[tuple[int, int, str, str, str, str, dict[str, Any]]] = [
        (0, 0, "train", "loss", "loss", "training loss (2 - 2cos, summed over views)", {"markers": flagged}),
        (
            0,
            2,
            "diag",
            "alignment_weighted",
            "sum_j s_j cos(W_p u_j, u_j) / sum_j s_j",
            "alignment, weighted by s_j (Thm 3, Fig. 2)",
            {"markers": flagged},
        ),
        (0, 3, "diag", "alignment", "mean_j cos(W_p u_j, u_j)", "alignment, mean over all u_j", {"markers": flagged}),
        (0, 4, "diag", "asymmetry", "||W_p - W_p^T|| / ||W_p||", "asymmetry of W_p", {}),
        (1, 0, "diag", "rankme_z", "RankMe", "effective rank of the projections z", ranks),
        (1, 1, "diag", "rankme_h", "RankMe", "effective rank of the representation h", ranks),
        (
            1,
            2,
            "diag",
            "z_std_ratio",
            "sqrt(d) * std of z/|z|",
            "per-dim std of normalised projections",
            {"hlines": std_line, "markers": flagged},
        ),
        (
            1,
            3,
            "diag",
            "loss_per_term",
            "loss per term",
            "loss per 2 - 2cos term",
            {"logy": True, "hlines": loss_line, "markers": flagged},
        ),
        (1, 4, "diag", "p_sqrt_s_corr", "corr(p_j, sqrt(s_j))", "p_j vs sqrt(s_j) (Eqs. 14, 18)", {}),
    ]
    for row, col, kind, key, ylabel, title, extra in panels:
        series = {k: _series(r, kind, key) for k, (_, r, _) in runs.items()}
        plot_curves(axes[row][col], series, ylabel=ylabel, title=title, **extra)
    ax = axes[0][1]
    knn: dict[str, tuple[list, list]] = {}
    for k, (_, r, _s) in runs.items():
        x, y = _series(r, "eval", "knn_top1")
        fx, fy = _series(r, "final", "knn_top1")
        if x or fx:
            knn[k] = (x + fx, y + fy)
    if knn:
        plot_curves(ax, knn, ylabel="kNN top-1 (%)", title="kNN accuracy (online backbone)")
    else:
        note(ax, "no kNN evaluations in these runs")
    written.append(save_figure(fig, out_dir / "overview.png"))

    for label, (_, r, _) in runs.items():
        diag = [
            row
            for row in r
            if row.get("kind") == "diag" and isinstance(row.get("s"), list) and all(map(_number, row["s"]))
        ]
        fig, axes = new_figure(1, 2, width=5.5, height=3.8)
        if diag:
            steps = [row["step"] for row in diag]
            s = np.array([[np.nan if v is None else v for v in row["s"]] for row in diag], dtype=float)
            rel = np.log10(np.clip(s / np.nanmax(s, axis=1, keepdims=True), 1e-8, None))
            plot_heatmap(
                axes[0][0],
                steps,
                rel,
                ylabel="eigenvalue index j (largest first)",
                title=f"{label}: spectrum of F^, log10(s_j / s_max)",
                cbar_label="log10",
                vmin=max(-8.0, float(np.nanmin(rel))),
                vmax=0.0,
            )
            if all(row.get("align") for row in diag):
                a = np.array(
                    [[np.nan if v is None else v for v in row["align"][:ALIGN_TOP]] for row in diag], dtype=float
                )
                plot_heatmap(
                    axes[0][1],
                    steps,
                    a,
                    ylabel="eigenvector u_j of F^ (largest s_j first)",
                    title=f"{label}: cos(W_p u_j, u_j), top {a.shape[1]} u_j",
                    cbar_label="cosine",
                    vmin=-1.0,
                    vmax=1.0,
                    cmap="RdBu_r",
                )
            else:
                note(axes[0][1], "no predictor matrix (alignment not defined)")
        else:
            note(axes[0][0], "no diagnostics rows (diag.every=0?)")
            note(axes[0][1], "")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        written.append(save_figure(fig, out_dir / f"spectra_{safe}.png"))
    return written


# ------------------------------------------------------------------------------------------------------------
# Sweep figures (directpred sweep)


def sweep_figures(res: dict[str, Any], out: Path) -> list[Path]:
    """``results.png`` (linear best and kNN per cell with error bars, the paper's value as a cross) and
    ``knn_curves.png`` (kNN vs epoch, mean over seeds, one line per cell)."""
    cells = res["cells"]
    names = [c["cell"] for c in cells]
    fig, axes = new_figure(width=max(5.0, 0.9 * len(cells) + 2), height=4.2)
    ax = axes[0][0]
    for i, (key, label, dx) in enumerate((("linear_top1_best", "linear best", -0.12), ("knn_top1", "kNN", 0.12))):
        xs = [j + dx for j, c in enumerate(cells) if c[key]["mean"] is not None]
        ys = [c[key]["mean"] for c in cells if c[key]["mean"] is not None]
        es = [c[key]["std"] or 0.0 for c in cells if c[key]["mean"] is not None]
        if xs:
            ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=3, label=label, color=f"C{i}")
    papers = [(j, c["paper"]) for j, c in enumerate(cells) if c["paper"]]
    if papers:
        ax.errorbar(
            [j - 0.36 for j, _ in papers],
            [p["mean"] for _, p in papers],
            yerr=[p["std"] or 0.0 for _, p in papers],
            fmt="x",
            color="k",
            capsize=3,
            label="paper",
        )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_xlim(-0.7, len(names) - 0.3)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"{res['sweep']}: mean ± std over seeds")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # no finished run and no paper value: nothing to label
        ax.legend(fontsize=8)
    paths = [save_figure(fig, out / "results.png")]

    fig, axes = new_figure(width=6.0, height=4.2)
    ax = axes[0][0]
    for c in cells:
        if c["knn_curve"]:
            ax.plot(
                [p[0] for p in c["knn_curve"]],
                [p[1] for p in c["knn_curve"]],
                marker="o",
                ms=3,
                label=f"{c['cell']} (n={c['n'] - len(c['nonfinite'])})",
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title(f"{res['sweep']}: kNN during training, mean over seeds")
    ax.grid(alpha=0.3)
    if any(c["knn_curve"] for c in cells):
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "knn_curves.png"))
    return paths
