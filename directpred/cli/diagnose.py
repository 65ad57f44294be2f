"""``directpred plot`` (figures of one or more runs) and ``directpred diagnose`` (report of one checkpoint).

Both read what training wrote: ``metrics.jsonl`` (rows of kind ``train``, ``eval``, ``final`` and ``diag``),
``summary.json`` and the checkpoints. See docs/diagnostics.md for what each number means.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from directpred.config import ConfigError

ALIGN_TOP = 32  # eigenvectors shown in the alignment heat map (the rest of F^'s spectrum is ~1e-4 of s_max)
PLOT_EPILOG = """examples:
  directpred plot runs/full/byol_directpred runs/full/byol_linear --out docs/figures/diagnostics
  directpred diagnose runs/full/byol_linear
  directpred diagnose runs/full/byol_linear/checkpoints/epoch_0001.pt --batches 4
"""


# ------------------------------------------------------------------------------------------------------------
# plot


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    from directpred.train.logger import read_metrics

    rows = read_metrics(run_dir)
    if not rows:
        raise ConfigError(f"{run_dir}: no metrics.jsonl rows; give a run directory made by "
                          "`directpred train`")
    return rows


def _series(rows: list[dict[str, Any]], kind: str, key: str, x: str = "step") -> tuple[list, list]:
    pts = [(r[x], r.get(key)) for r in rows if r.get("kind") == kind and key in r and x in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


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
    import numpy as np

    from directpred.diagnostics import plots
    from directpred.diagnostics.hook import LOSS_PER_TERM_MAX, STD_RATIO_MAX

    runs = {label: (d, _rows(d), _summary(d)) for label, d in zip(_labels(run_dirs), run_dirs)}
    flagged = {label: s.get("collapse_step") for label, (_, _, s) in runs.items()}
    written = []

    fig, axes = plots.new_figure(2, 5, width=4.4, height=3.4)
    ax = axes[0][0]
    plots.plot_curves(ax, {k: _series(r, "train", "loss") for k, (_, r, _) in runs.items()}, ylabel="loss",
                      title="training loss (2 - 2cos, summed over views)", markers=flagged)
    ax = axes[0][1]
    knn: dict[str, tuple[list, list]] = {}
    for k, (_, r, _s) in runs.items():
        x, y = _series(r, "eval", "knn_top1")
        fx, fy = _series(r, "final", "knn_top1")
        if x or fx:
            knn[k] = (x + fx, y + fy)
    if knn:
        plots.plot_curves(ax, knn, ylabel="kNN top-1 (%)", title="kNN accuracy (online backbone)")
    else:
        plots.note(ax, "no kNN evaluations in these runs")
    ax = axes[0][2]
    plots.plot_curves(ax, {k: _series(r, "diag", "alignment_weighted") for k, (_, r, _) in runs.items()},
                      ylabel="sum_j s_j cos(W_p u_j, u_j) / sum_j s_j",
                      title="alignment, weighted by s_j (Thm 3, Fig. 2)", markers=flagged)
    ax = axes[0][3]
    plots.plot_curves(ax, {k: _series(r, "diag", "alignment") for k, (_, r, _) in runs.items()},
                      ylabel="mean_j cos(W_p u_j, u_j)", title="alignment, mean over all u_j",
                      markers=flagged)
    ax = axes[0][4]
    plots.plot_curves(ax, {k: _series(r, "diag", "asymmetry") for k, (_, r, _) in runs.items()},
                      ylabel="||W_p - W_p^T|| / ||W_p||", title="asymmetry of W_p")
    ax = axes[1][0]
    plots.plot_curves(ax, {k: _series(r, "diag", "rankme_z") for k, (_, r, _) in runs.items()},
                      ylabel="RankMe", title="effective rank of the projections z", markers=flagged)
    ax = axes[1][1]
    plots.plot_curves(ax, {k: _series(r, "diag", "rankme_h") for k, (_, r, _) in runs.items()},
                      ylabel="RankMe", title="effective rank of the representation h", markers=flagged)
    ax = axes[1][2]
    plots.plot_curves(ax, {k: _series(r, "diag", "z_std_ratio") for k, (_, r, _) in runs.items()},
                      ylabel="sqrt(d) * std of z/|z|", title="per-dim std of normalised projections",
                      hlines={f"collapse threshold {STD_RATIO_MAX}": STD_RATIO_MAX}, markers=flagged)
    ax = axes[1][3]
    plots.plot_curves(ax, {k: _series(r, "diag", "loss_per_term") for k, (_, r, _) in runs.items()},
                      ylabel="loss per term", title="loss per 2 - 2cos term", logy=True,
                      hlines={f"collapse threshold {LOSS_PER_TERM_MAX}": LOSS_PER_TERM_MAX}, markers=flagged)
    ax = axes[1][4]
    plots.plot_curves(ax, {k: _series(r, "diag", "p_sqrt_s_corr") for k, (_, r, _) in runs.items()},
                      ylabel="corr(p_j, sqrt(s_j))", title="p_j vs sqrt(s_j) (Eqs. 14, 18)")
    written.append(plots.save_figure(fig, out_dir / "overview.png"))

    for label, (_, r, _) in runs.items():
        diag = [row for row in r if row.get("kind") == "diag" and row.get("s")]
        fig, axes = plots.new_figure(1, 2, width=5.5, height=3.8)
        if diag:
            steps = [row["step"] for row in diag]
            s = np.array([[np.nan if v is None else v for v in row["s"]] for row in diag], dtype=float)
            rel = np.log10(np.clip(s / np.nanmax(s, axis=1, keepdims=True), 1e-8, None))
            plots.plot_heatmap(axes[0][0], steps, rel, ylabel="eigenvalue index j (largest first)",
                               title=f"{label}: spectrum of F^, log10(s_j / s_max)", cbar_label="log10",
                               vmin=max(-8.0, float(np.nanmin(rel))), vmax=0.0)
            if all(row.get("align") for row in diag):
                a = np.array([[np.nan if v is None else v for v in row["align"][:ALIGN_TOP]] for row in diag],
                             dtype=float)
                plots.plot_heatmap(axes[0][1], steps, a, ylabel="eigenvector u_j of F^ (largest s_j first)",
                                   title=f"{label}: cos(W_p u_j, u_j), top {a.shape[1]} u_j",
                                   cbar_label="cosine", vmin=-1.0, vmax=1.0, cmap="RdBu_r")
            else:
                plots.note(axes[0][1], "no predictor matrix (alignment not defined)")
        else:
            plots.note(axes[0][0], "no diagnostics rows (diag.every=0?)")
            plots.note(axes[0][1], "")
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
        written.append(plots.save_figure(fig, out_dir / f"spectra_{safe}.png"))
    return written


def cmd_plot(args: argparse.Namespace) -> int:
    run_dirs = [Path(p) for p in args.run_dirs]
    for d in run_dirs:
        if not d.is_dir():
            raise ConfigError(f"{d}: not a directory; give run directories made by `directpred train`")
    out = Path(args.out) if args.out else run_dirs[0] / "plots"
    for path in make_plots(run_dirs, out):
        print(path)
    return 0


# ------------------------------------------------------------------------------------------------------------
# diagnose


def _resolve(target: Path) -> tuple[Path, Path | None]:
    """(checkpoint file, run directory or None) of a run directory or a checkpoint path."""
    if target.is_dir():
        ckpt = target / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise ConfigError(f"{target}: no checkpoints/last.pt; give a run directory or a checkpoint file")
        return ckpt, target
    if target.is_file():
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else None
        return target, run_dir
    raise ConfigError(f"{target}: no such run directory or checkpoint file")


def diagnose(target: Path, *, batches: int = 2, use_data: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Diagnostics of one checkpoint: the metrics row and the report's lines.

    Loads the checkpoint's model, reads F^ (the predictor's own, or the one the training diagnostics kept)
    and W_p, and, with ``use_data``, runs ``batches`` training batches (two augmented views, the model in eval
    mode: nothing is updated) for the representation, projection and loss metrics. The MLP predictor's mean
    Jacobian needs these batches.
    """
    import torch

    from directpred.config import config_from_dict
    from directpred.diagnostics import metrics as spectrum
    from directpred.diagnostics.hook import diagnostic_row, looks_collapsed, single_thread
    from directpred.heads import CorrelationEstimator
    from directpred.methods import build_method
    from directpred.train.checkpoint import load_checkpoint

    ckpt, _ = _resolve(target)
    state = load_checkpoint(ckpt, map_location="cpu")
    cfg = config_from_dict(state["config"])
    cfg.train.device = "cpu"
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg)
    method.load_state_dict(state["model"])
    method.eval()
    predictor = method.predictor
    diag_state = state.get("diagnostics") or {}
    lines = [f"checkpoint {ckpt} (step {state['step']}, epoch {state['epoch']}): {cfg.method.name} + "
             f"{cfg.predictor.name} predictor, d = {cfg.projector.out_dim}"]
    notes: list[str] = []

    F_hat = None
    if isinstance(predictor, CorrelationEstimator) and int(predictor.count) > 0:
        F_hat, f_src = predictor.matrix().float(), "the predictor's F^ (buffer corr)"
    elif diag_state.get("estimator"):
        est = CorrelationEstimator(cfg.projector.out_dim, rho=cfg.diag.rho)
        est.load_state_dict(diag_state["estimator"])
        if int(est.count) > 0:
            F_hat, f_src = est.matrix().float(), "the training diagnostics' F^"

    h = z = None
    loss_per_term = None
    if use_data and batches > 0:
        try:
            from directpred.data.augment import TwoViewAugment
            from directpred.data.datasets import load_data
            from directpred.data.order import step_generator
            from directpred.data.views import view_recipes

            if cfg.data.stream:  # a streamed data set: decode only the sampled batches
                from directpred.data.stream import BatchDataset, load_stream_data

                data = load_stream_data(cfg.data)
                streamed = BatchDataset(data.pretrain.reader, data.decode_size, skip_corrupt=cfg.data.skip_corrupt)

                def images_at(idx: torch.Tensor) -> torch.Tensor:
                    return streamed[idx.tolist()].images
            else:
                data = load_data(cfg.data, seed=cfg.train.seed)

                def images_at(idx: torch.Tensor) -> torch.Tensor:
                    return data.pretrain.images[idx]
            augment = TwoViewAugment(*view_recipes(cfg, data))
            hs, zs, z1s, z2s, losses = [], [], [], [], []
            g = torch.Generator().manual_seed(cfg.train.seed + 12345)
            with torch.no_grad():
                for b in range(batches):
                    idx = torch.randperm(len(data.pretrain), generator=g)[: cfg.train.batch_size]
                    x1, x2 = augment(images_at(idx), step_generator(cfg.train.seed + 1, b))
                    out = method(x1, x2)
                    hs += [out.h1, out.h2]
                    zs += [out.z1, out.z2]
                    z1s.append(out.z1)
                    z2s.append(out.z2)
                    losses.append(float(out.loss))
            h, z = torch.cat(hs).float(), torch.cat(zs).float()
            loss_per_term = sum(losses) / len(losses) / (2 if cfg.method.symmetric_loss else 1)
        except Exception as exc:  # noqa: BLE001 - the report still works without data
            notes.append(f"no batch metrics: the data could not be loaded ({type(exc).__name__}: {exc})")
    if F_hat is None and z is not None:
        F_hat = z.t() @ z / z.shape[0]
        f_src = f"E[f f^T] of {z.shape[0]} projections of this report's batches"
    if F_hat is None:
        raise ConfigError(f"{ckpt}: no F^ in the checkpoint and no data to estimate it; rerun with data")

    W_p, kind = spectrum.predictor_matrix(predictor)
    if kind == "none" and hasattr(predictor, "fc1") and z is not None:
        W_p = 0.5 * (spectrum.mlp_mean_jacobian(predictor, torch.cat(z1s).float())
                     + spectrum.mlp_mean_jacobian(predictor, torch.cat(z2s).float()))
        kind = "jacobian"
    with single_thread():
        row = diagnostic_row(F_hat, W_p, h=h, z=z)
    if loss_per_term is not None:
        row["loss_per_term"] = loss_per_term

    def f(key: str, fmt: str = ".3f") -> str:
        v = row.get(key)
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

    s = row["s"]
    lines.append(f"F^ from {f_src}: s_max = {f('s_max', '.4g')}, effective rank (RankMe of F^^1/2) = "
                 f"{f('F_rank', '.1f')} of {len(s)}")
    if W_p is None:
        lines.append("W_p: none for this predictor (alignment not defined)")
    else:
        what = "weight" if kind == "weight" else "batch-mean Jacobian of the two-layer predictor"
        lines.append(f"W_p ({what}): alignment mean_j cos(W_p u_j, u_j) = {f('alignment')}, "
                     f"s-weighted = {f('alignment_weighted')}; asymmetry ||W-W^T||/||W|| = {f('asymmetry')}; "
                     f"commutator ||[F,W]||/(||F|| ||W||) = {f('commutator', '.3g')}")
        lines.append(f"p_j vs s_j (paper: p_j ∝ sqrt(s_j)): log-log slope = {f('p_s_slope')} "
                     "(0.5 for the law; DirectPred's eps lowers it), "
                     f"corr(p_j, sqrt(s_j)) = {f('p_sqrt_s_corr')}")
        lines.append("   j       s_j/s_max      p_j   cos(W_p u_j, u_j)")
        top = row["s"][0] or 1.0
        d = len(s)
        for j in sorted({0, 1, 2, 3, 4, d // 4, d // 2, d - 1} & set(range(d))):
            p_j, cos_j = row["p"][j] or 0.0, row["align"][j] or 0.0
            lines.append(f"  {j:3d}  {(s[j] or 0) / top:12.4g}  {p_j:8.4f}  {cos_j:8.3f}")
    if z is not None:
        lines.append(f"batch ({z.shape[0]} views): RankMe(h) = {f('rankme_h', '.1f')}, RankMe(z) = "
                     f"{f('rankme_z', '.1f')} of max {row['z_rank_max']}, "
                     f"sqrt(d)*std(z/|z|) = {f('z_std_ratio')} "
                     f"(~1 spread out, ~0 collapsed), loss per term = {f('loss_per_term', '.4f')}")
        verdict = "LOOKS COLLAPSED" if looks_collapsed(row) else "healthy"
        lines.append(f"collapse rule on this batch: {verdict}")
    if diag_state:
        flag = (f"COLLAPSED at step {diag_state.get('collapse_step')}: {diag_state.get('collapse_evidence')}"
                if diag_state.get("collapsed") else "not flagged")
        lines.append(f"training-time collapse detector: {flag}")
    lines += [f"note: {n}" for n in notes]
    return row, lines


def cmd_diagnose(args: argparse.Namespace) -> int:
    row, lines = diagnose(Path(args.target), batches=args.batches, use_data=not args.no_data)
    if args.json:
        print(json.dumps(row))
    else:
        print("\n".join(lines))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``plot`` and ``diagnose`` subcommands to the ``directpred`` parser."""
    p = subparsers.add_parser(
        "plot", help="PNG figures of one or more runs (loss, kNN, spectra, alignment, effective rank)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PLOT_EPILOG,
        description="Plot runs from their metrics.jsonl: overview.png overlays the runs; spectra_<run>.png "
                    "shows heat maps of F^'s spectrum and of the per-eigenvector alignment over training.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories made by `directpred train`")
    p.add_argument("--out", help="folder for the PNG files (default: RUN_DIR/plots of the first run)")
    p.set_defaults(func=cmd_plot)

    p = subparsers.add_parser(
        "diagnose", help="text report of the diagnostics of one checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=PLOT_EPILOG,
        description="Spectrum of F^, alignment and asymmetry of W_p, p_j vs sqrt(s_j), effective ranks and "
                    "the collapse rule, for one checkpoint (RUN_DIR means RUN_DIR/checkpoints/last.pt).")
    p.add_argument("target", metavar="RUN_DIR|CHECKPOINT", help="a run directory or a checkpoint file")
    p.add_argument("--batches", type=int, default=2,
                   help="training batches to run for the representation/projection metrics (default 2)")
    p.add_argument("--no-data", action="store_true",
                   help="do not load data: report only F^ and W_p from the checkpoint")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object instead of text")
    p.set_defaults(func=cmd_diagnose)
