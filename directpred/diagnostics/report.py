"""``directpred diagnose``: the diagnostics report of one checkpoint (text lines and the metrics row)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from directpred.config import ConfigError
from directpred.data.augment import TwoViewAugment
from directpred.data.datasets import DataBundle, DataError, load_data
from directpred.data.order import step_generator
from directpred.data.stream import BatchDataset, StreamData, load_stream_data
from directpred.data.views import view_recipes
from directpred.diagnostics import metrics as spectrum
from directpred.diagnostics.hook import diagnostic_row, looks_collapsed, looks_dim_collapsed, single_thread
from directpred.heads import CorrelationEstimator
from directpred.methods import build_method
from directpred.train.checkpoint import load_checkpoint, stored_config


def resolve_checkpoint(target: str | Path) -> tuple[Path, Path | None]:
    """(checkpoint file, run directory or None) of a run directory or a checkpoint path."""
    target = Path(target)
    if target.is_dir():
        ckpt = target / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise ConfigError(f"{target}: no checkpoints/last.pt; give a run directory or a checkpoint file")
        return ckpt, target
    if target.is_file():
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else None
        return target, run_dir
    raise ConfigError(f"{target}: no such run directory or checkpoint file")


def diagnose(target: str | Path, *, batches: int = 2, use_data: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Diagnostics of one checkpoint: the metrics row and the report's lines.

    Loads the checkpoint's model, reads F^ (the predictor's own, or the one the training diagnostics kept)
    and W_p, and, with ``use_data``, runs ``batches`` training batches (two augmented views, the model in eval
    mode: nothing is updated) for the representation, projection and loss metrics. The W_p of the MLP predictor
    and of the partitioned DirectPred (batch means) needs these batches.
    """
    ckpt, _ = resolve_checkpoint(target)
    state = load_checkpoint(ckpt, map_location="cpu", require=("model", "config"))
    cfg = stored_config(state, ckpt)
    cfg.train.device = "cpu"
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg)
    method.load_state_dict(state["model"])
    method.eval()
    predictor = method.predictor
    diag_state = state.get("diagnostics") or {}
    lines = [
        f"checkpoint {ckpt} (step {state['step']}, epoch {state['epoch']}): {cfg.method.name} + "
        f"{cfg.predictor.name} predictor, d = {cfg.projector.out_dim}"
    ]
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
            if cfg.data.stream:  # a streamed data set: decode only the sampled batches
                stream_data = load_stream_data(cfg.data)
                streamed = BatchDataset(
                    stream_data.pretrain.reader, stream_data.decode_size, skip_corrupt=cfg.data.skip_corrupt
                )
                data: DataBundle | StreamData = stream_data

                def images_at(idx: torch.Tensor) -> torch.Tensor:
                    images = streamed[idx.tolist()].images
                    assert isinstance(images, torch.Tensor)  # decoded: the BatchDataset is not raw
                    return images
            else:
                bundle = data = load_data(cfg.data, seed=cfg.train.seed)

                def images_at(idx: torch.Tensor) -> torch.Tensor:
                    return bundle.pretrain.images[idx]
        except (DataError, ConfigError, OSError) as exc:  # the report works without data; model errors propagate
            notes.append(f"no batch metrics: the data could not be loaded ({type(exc).__name__}: {exc})")
        else:
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
    if F_hat is None and z is not None:
        F_hat = z.t() @ z / z.shape[0]
        f_src = f"E[f f^T] of {z.shape[0]} projections of this report's batches"
    if F_hat is None:
        raise ConfigError(f"{ckpt}: no F^ in the checkpoint and no data to estimate it; rerun with data")

    W_p, kind = spectrum.predictor_matrix(predictor, *((torch.cat(z1s), torch.cat(z2s)) if z is not None else ()))
    with single_thread():
        row = diagnostic_row(F_hat, W_p, h=h, z=z)
    if loss_per_term is not None:
        row["loss_per_term"] = loss_per_term

    def f(key: str, fmt: str = ".3f") -> str:
        v = row.get(key)
        return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)

    s = row["s"]
    lines.append(
        f"F^ from {f_src}: s_max = {f('s_max', '.4g')}, effective rank (RankMe of F^^1/2) = "
        f"{f('F_rank', '.1f')} of {len(s)}"
    )
    if W_p is None:
        lines.append(
            "W_p: this predictor's is a mean over a batch; run with data (without --no-data, --batches >= 1) for it"
            if z is None and spectrum.needs_batch(predictor)
            else "W_p: none for this predictor (alignment not defined)"
        )
    else:
        what = {
            "weight": "weight",
            "jacobian": "batch-mean Jacobian of the two-layer predictor",
            "partitions": "batch mean of the partitioned predictor's per-sample W_p(f)",
        }[kind]
        lines.append(
            f"W_p ({what}): alignment mean_j cos(W_p u_j, u_j) = {f('alignment')}, "
            f"s-weighted = {f('alignment_weighted')}; asymmetry ||W-W^T||/||W|| = {f('asymmetry')}; "
            f"commutator ||[F,W]||/(||F|| ||W||) = {f('commutator', '.3g')}"
        )
        eps_note = "; DirectPred's eps lowers it" if cfg.predictor.name == "directpred" else ""
        lines.append(
            f"p_j vs s_j (paper: p_j ∝ sqrt(s_j)): log-log slope = {f('p_s_slope')} "
            f"(0.5 for the law{eps_note}), "
            f"corr(p_j, sqrt(s_j)) = {f('p_sqrt_s_corr')}"
        )
        lines.append("   j       s_j/s_max      p_j   cos(W_p u_j, u_j)")
        top = row["s"][0] or 1.0
        d = len(s)
        for j in sorted({0, 1, 2, 3, 4, d // 4, d // 2, d - 1} & set(range(d))):
            p_j, cos_j = row["p"][j] or 0.0, row["align"][j] or 0.0
            lines.append(f"  {j:3d}  {(s[j] or 0) / top:12.4g}  {p_j:8.4f}  {cos_j:8.3f}")
    if z is not None:
        lines.append(
            f"batch ({z.shape[0]} views): RankMe(h) = {f('rankme_h', '.1f')} of max {row['h_rank_max']}, RankMe(z) = "
            f"{f('rankme_z', '.1f')} of max {row['z_rank_max']}, "
            f"sqrt(d)*std(z/|z|) = {f('z_std_ratio')} "
            f"(~1 spread out, ~0 collapsed), loss per term = {f('loss_per_term', '.4f')}"
        )
        verdict = "LOOKS COLLAPSED" if looks_collapsed(row) else "healthy"
        lines.append(f"collapse rule on this batch: {verdict}")
        dim_verdict = "LOOKS DIMENSIONALLY COLLAPSED" if looks_dim_collapsed(row) else "healthy"
        lines.append(f"dimensional-collapse rule on this batch: {dim_verdict}")
    if diag_state:
        detectors: list[tuple[str, dict[str, Any] | None, str]] = [
            ("collapse detector", diag_state, "COLLAPSED"),
            ("dimensional-collapse warning", diag_state.get("dim"), "DIMENSIONALLY COLLAPSED"),
        ]
        for what, watch, word in detectors:
            if watch is None:  # a checkpoint written before the dimensional-collapse warning existed
                lines.append(f"training-time {what}: not kept by the version that wrote this checkpoint")
                continue
            flag = (
                f"{word} at step {watch.get('collapse_step')}: {watch.get('collapse_evidence')}"
                if watch.get("collapsed")
                else "not flagged"
            )
            lines.append(f"training-time {what}: {flag}")
    lines += [f"note: {n}" for n in notes]
    return row, lines
