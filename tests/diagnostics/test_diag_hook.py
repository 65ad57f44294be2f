"""The Diagnostics hook on synthetic step outputs: cadence, the collapse rule, summary and resume state."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import gloo_process
from torch import nn

from directpred.config import Config
from directpred.diagnostics import hook as diag_mod
from directpred.diagnostics.hook import Diagnostics, looks_collapsed
from directpred.heads import MLP, DirectPred, IdentityPredictor, LinearPredictor
from directpred.methods.siamese import StepOutput

REPO = Path(__file__).resolve().parents[2]
D, B, FEAT = 16, 32, 24


class FakeMethod(nn.Module):
    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor


def make_cfg(every: int = 2) -> Config:
    cfg = Config()
    cfg.diag.every = every
    cfg.projector.out_dim = D
    return cfg


def step_output(g: torch.Generator, *, collapsed: bool, loss: float) -> StepOutput:
    if collapsed:  # every sample projects to (almost) the same vector
        base = torch.randn(1, D, generator=g)
        z1 = base + 1e-3 * torch.randn(B, D, generator=g)
        z2 = base + 1e-3 * torch.randn(B, D, generator=g)
    else:
        z1, z2 = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    h1, h2 = torch.randn(B, FEAT, generator=g), torch.randn(B, FEAT, generator=g)
    return StepOutput(torch.tensor(loss), h1, h2, z1, z2, z1, z2, z2, z1)


def run(diag: Diagnostics, steps: range, *, collapsed: bool, loss: float, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for step in steps:
        row = diag.observe(step, step_output(g, collapsed=collapsed, loss=loss))
        if row is not None:
            rows.append(row)
    return rows


def test_reports_every_n_steps_and_rows_are_json():
    diag = Diagnostics(make_cfg(every=3), FakeMethod(LinearPredictor(D)))
    g = torch.Generator().manual_seed(0)
    got = [s for s in range(1, 10) if diag.observe(s, step_output(g, collapsed=False, loss=1.5)) is not None]
    assert got == [3, 6, 9]
    row = diag.observe(12, step_output(g, collapsed=False, loss=1.5))
    json.dumps(row)  # serialisable
    for key in (
        "s",
        "wp_eig",
        "align",
        "alignment",
        "asymmetry",
        "p_s_slope",
        "rankme_h",
        "rankme_z",
        "z_std_ratio",
        "loss_per_term",
        "collapsed",
    ):
        assert key in row
    assert len(row["s"]) == D and row["s"] == sorted(row["s"], reverse=True)


def test_healthy_outputs_are_not_flagged():
    diag = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
    rows = run(diag, range(1, 21), collapsed=False, loss=1.5)
    assert not diag.collapsed and all(r["collapsed"] == 0 for r in rows)
    assert rows[-1]["z_std_ratio"] == pytest.approx(1.0, abs=0.15)  # isotropic Gaussian projections
    assert diag.summary()["collapsed"] is False and diag.summary()["collapse_step"] is None


def test_collapsed_outputs_are_flagged_at_the_second_report(caplog):
    diag = Diagnostics(make_cfg(), FakeMethod(IdentityPredictor(D)))
    rows = run(diag, range(1, 11), collapsed=True, loss=0.001)
    assert looks_collapsed(rows[0]) and rows[0]["collapsed"] == 0  # one report is not enough
    assert diag.collapsed and diag.collapse_step == 4 and rows[1]["collapsed"] == 1
    s = diag.summary()
    assert s["collapsed"] is True and s["collapse_step"] == 4 and "z_std_ratio" in s["collapse_evidence"]
    warned = [r for r in caplog.records if r.name == "directpred.diagnostics.hook" and r.levelname == "WARNING"]
    assert len(warned) == 1 and "COLLAPSED" in warned[0].getMessage()  # logged once, with the evidence
    assert "rankme_z" in warned[0].getMessage()


def test_low_loss_alone_is_not_collapse():
    # a healthy spread of projections with a small loss (views agree) must not be flagged
    diag = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
    run(diag, range(1, 11), collapsed=False, loss=0.01)
    assert not diag.collapsed


def test_a_single_collapsed_looking_report_resets():
    diag = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
    run(diag, range(1, 3), collapsed=True, loss=0.001)
    run(diag, range(3, 5), collapsed=False, loss=1.0)
    run(diag, range(5, 7), collapsed=True, loss=0.001)
    assert not diag.collapsed and diag.streak == 1


def test_uses_the_predictor_F_hat_when_it_keeps_one():
    dp = DirectPred(D)
    diag = Diagnostics(make_cfg(), FakeMethod(dp))
    assert diag.own_estimator is None
    g = torch.Generator().manual_seed(0)
    for step in (1, 2):
        out = step_output(g, collapsed=False, loss=1.0)
        dp.update(torch.cat([out.z1, out.z2]))  # what the method does in a training step
        row = diag.observe(step, out)
    # DirectPred's W_p is built from its own F^: aligned and symmetric by construction, p_j ∝ sqrt(s_j) + eps
    assert row["alignment"] == pytest.approx(1.0, abs=1e-4)
    assert row["asymmetry"] == pytest.approx(0.0, abs=1e-5)
    assert row["p_sqrt_s_corr"] == pytest.approx(1.0, abs=1e-4)
    s_top = max(row["s"])
    assert s_top == pytest.approx(float(torch.linalg.eigvalsh(dp.matrix().double()).max()), rel=1e-4)


def test_own_estimator_tracks_the_projection_correlation():
    diag = Diagnostics(make_cfg(every=1), FakeMethod(LinearPredictor(D)))
    g = torch.Generator().manual_seed(0)
    out = step_output(g, collapsed=False, loss=1.0)
    diag.observe(1, out)  # first batch: F^ is this batch's E[f f^T]
    z = torch.cat([out.z1, out.z2])
    assert torch.allclose(diag.own_estimator.matrix(), z.T @ z / z.shape[0], atol=1e-5)


def test_mlp_predictor_gets_a_jacobian_alignment():
    diag = Diagnostics(make_cfg(), FakeMethod(MLP(D, 32, D)))
    rows = run(diag, range(1, 5), collapsed=False, loss=1.0)
    assert -1.0 <= rows[-1]["alignment"] <= 1.0 and math.isfinite(rows[-1]["asymmetry"])


def test_state_dict_round_trip_continues_the_detector():
    a = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
    run(a, range(1, 3), collapsed=True, loss=0.001)  # one collapsed-looking report
    b = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
    b.load_state_dict(a.state_dict())
    assert b.streak == 1 and torch.equal(b.own_estimator.corr, a.own_estimator.corr)
    run(b, range(3, 5), collapsed=True, loss=0.001)
    assert b.collapsed and b.collapse_step == 4


def test_rule_fires_exactly_below_all_three_thresholds_documented_in_the_docs():
    doc = (REPO / "docs" / "diagnostics.md").read_text()
    assert f"`z_std_ratio < {diag_mod.STD_RATIO_MAX}`" in doc
    assert f"`rankme_z < {diag_mod.RANK_FRACTION_MAX} · min(N, d)`" in doc
    assert f"`loss_per_term < {diag_mod.LOSS_PER_TERM_MAX}`" in doc
    limits = {
        "z_std_ratio": diag_mod.STD_RATIO_MAX,
        "rankme_z": diag_mod.RANK_FRACTION_MAX * 64,
        "loss_per_term": diag_mod.LOSS_PER_TERM_MAX,
    }
    below = {k: v * 0.99 for k, v in limits.items()}
    assert looks_collapsed({**below, "z_rank_max": 64})
    for k, v in limits.items():  # any one signal at its threshold: healthy
        assert not looks_collapsed({**below, k: v, "z_rank_max": 64}), k
        assert not looks_collapsed({**below, k: None, "z_rank_max": 64}), k  # a missing signal never flags


def _two_rank_worker(rank: int, init_file: str, results: str) -> None:
    import torch.distributed as dist

    with gloo_process(rank, 2, init_file):
        diag = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
        g = torch.Generator().manual_seed(rank)
        flags, ranks = [], []
        for step in range(1, 9):
            # rank 0 sees collapsed projections, rank 1 healthy ones: the averaged signals decide for both
            collapsed = rank == 0 or step > 4
            row = diag.observe(step, step_output(g, collapsed=collapsed, loss=0.001))
            if row is not None:
                flags.append(row["collapsed"])
                ranks.append(row["rankme_h"])  # per-rank batches differ: averaged, the rows agree
        corr = diag.own_estimator.corr.clone()
        dist.all_reduce(corr)
        torch.save(
            {
                "flags": flags,
                "ranks": ranks,
                "step": diag.collapse_step,
                "corr_equal": bool(torch.allclose(corr / 2, diag.own_estimator.corr, atol=1e-5)),
            },
            f"{results}.{rank}",
        )


def test_two_processes_decide_alike(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path / "res")), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"res.{r}") for r in (0, 1))
    assert r0["flags"] == r1["flags"] == [0, 0, 0, 1]  # flagged only once both ranks' batches look collapsed
    assert r0["step"] == r1["step"] == 8
    assert r0["ranks"] == r1["ranks"] and len(r0["ranks"]) == 4
    assert r0["corr_equal"] and r1["corr_equal"]  # F^ is all-reduced: the same on both ranks


def test_logger_writes_spectra_as_tensorboard_histograms(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from directpred.train.logger import RunLogger, read_metrics

    diag = Diagnostics(make_cfg(every=1), FakeMethod(LinearPredictor(D)))
    row = diag.observe(1, step_output(torch.Generator().manual_seed(0), collapsed=False, loss=1.0))
    logger = RunLogger(tmp_path)
    logger.log({"step": 1, **row}, group="diag")
    logger.close()
    assert read_metrics(tmp_path)[0]["s"] == row["s"]
    acc = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    assert "diag/s" in acc.Tags()["histograms"] and "diag/alignment" in acc.Tags()["scalars"]


def test_the_package_exports_the_hook_and_its_metrics_and_stays_free_of_torch_until_used():
    """`from directpred.diagnostics import Diagnostics, diagnostic_row, predictor_matrix` failed (ImportError): the
    names lived only in the submodules. They come lazily, so the theory's plots still import no torch."""
    import subprocess
    import sys

    import directpred.diagnostics as pkg
    from directpred.diagnostics import Diagnostics as exported
    from directpred.diagnostics import diagnostic_row, metrics, predictor_matrix

    assert exported is Diagnostics and diagnostic_row is diag_mod.diagnostic_row
    assert predictor_matrix is metrics.predictor_matrix
    assert set(pkg.__all__) == {"Diagnostics", "diagnostic_row", "predictor_matrix"}
    with pytest.raises(AttributeError, match="module 'directpred.diagnostics' has no attribute 'diagnose'"):
        pkg.diagnose  # noqa: B018 - the report is a layer above (directpred.diagnostics.report.diagnose)
    code = (
        "import sys, directpred.diagnostics, directpred.theory.plots; assert 'torch' not in sys.modules; "
        "from directpred.diagnostics import predictor_matrix; assert 'torch' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
