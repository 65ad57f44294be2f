"""The dimensional-collapse warning: its rule on synthetic batches, its state over a run and a resume, and a replay
of the runs committed under docs/results (the evidence docs/diagnostics.md gives for its thresholds)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml
from torch import nn

from directpred.config import Config
from directpred.diagnostics import hook as diag_mod
from directpred.diagnostics.hook import Diagnostics, looks_collapsed, looks_dim_collapsed, replay
from directpred.heads import LinearPredictor
from directpred.methods.siamese import StepOutput

REPO = Path(__file__).resolve().parents[2]
D, B, FEAT = 64, 64, 64  # large enough that a few directions are a small fraction: max ranks 64 (N = 128)


class FakeMethod(nn.Module):
    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor


def make_cfg() -> Config:
    cfg = Config()
    cfg.diag.every = 2
    cfg.projector.out_dim = D
    return cfg


def low_rank(g: torch.Generator, n: int, width: int, k: int) -> torch.Tensor:
    """n samples spread over k random directions of R^width (rank k, not one point)."""
    basis = torch.linalg.qr(torch.randn(width, k, generator=g))[0].T  # (k, width), orthonormal rows
    return torch.randn(n, k, generator=g) @ basis + 1e-4 * torch.randn(n, width, generator=g)


def step_output(g: torch.Generator, k: int | None) -> StepOutput:
    """Both views' projections and representations; of rank k (None: full rank)."""
    if k is None:
        z, h = torch.randn(2 * B, D, generator=g), torch.randn(2 * B, FEAT, generator=g)
    else:
        z, h = low_rank(g, 2 * B, D, k), low_rank(g, 2 * B, FEAT, k)
    z1, z2, h1, h2 = z[:B], z[B:], h[:B], h[B:]
    return StepOutput(torch.tensor(0.3), h1, h2, z1, z2, z1, z2, z2, z1)


def run(diag: Diagnostics, steps: range, k: int | None, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = [diag.observe(step, step_output(g, k)) for step in steps]
    return [r for r in rows if r is not None]


def test_a_few_spread_directions_are_flagged_at_the_second_report_and_are_not_complete_collapse(caplog):
    diag = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
    rows = run(diag, range(1, 9), k=2)
    first = rows[0]
    assert first["h_rank_max"] == first["z_rank_max"] == 64
    assert 1.5 < first["rankme_z"] < 2.5 and 1.5 < first["rankme_h"] < 2.5  # RankMe of two spread directions
    assert first["z_std_ratio"] > 0.1  # spread within them: the collapse rule (one point) does not fire
    assert looks_dim_collapsed(first) and not looks_collapsed(first) and first["dim_collapsed"] == 0
    assert diag.dim.flagged and diag.dim.step == 4 and [r["dim_collapsed"] for r in rows] == [0, 1, 1, 1]
    assert not diag.collapsed
    s = diag.summary()
    assert (s["dim_collapsed"], s["dim_collapse_step"], s["collapsed"]) == (True, 4, False)
    assert "rankme_h=" in s["dim_collapse_evidence"] and "2 report steps in a row" in s["dim_collapse_evidence"]
    warned = [r.getMessage() for r in caplog.records if r.name == "directpred.diagnostics.hook"]
    assert len(warned) == 1 and "DIMENSIONAL COLLAPSE at step 4" in warned[0]


def test_healthy_and_moderately_low_ranks_are_not_flagged():
    # full rank; then 8 directions: rankme 8 is above 0.05 * 64 = 3.2 for z, so the pair does not look collapsed
    for k in (None, 8):
        diag = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
        rows = run(diag, range(1, 11), k=k)
        assert not diag.dim.flagged and all(r["dim_collapsed"] == 0 for r in rows), k
        assert diag.summary()["dim_collapse_step"] is None


def test_the_final_report_alone_flags_and_is_recorded_in_the_summary():
    diag = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
    run(diag, range(1, 4), k=None)  # one healthy periodic report
    out = step_output(torch.Generator().manual_seed(1), k=2)
    diag.observe(4, out)  # one dimensionally collapsed report: not two in a row
    assert not diag.dim.flagged
    row = diag.final_report(4, out)
    assert row["looks_dim_collapsed"] == 1 and row["dim_collapsed"] == 1
    s = diag.summary()
    assert s["dim_collapsed"] is True and s["dim_collapse_step"] == 4
    assert s["dim_collapse_evidence"].startswith("final report: ") and s["final_looks_dim_collapsed"] == 1
    assert s["final_rankme_h"] < diag_mod.DIM_RANK_H_FRACTION * s["final_h_rank_max"]


def test_resume_continues_the_streak_and_old_checkpoints_load():
    a = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
    run(a, range(1, 3), k=2)  # one dimensionally collapsed report
    b = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
    b.load_state_dict(a.state_dict())
    assert b.dim.streak == 1
    run(b, range(3, 5), k=2, seed=1)
    assert b.dim.flagged and b.dim.step == 4
    old = {k: v for k, v in a.state_dict().items() if k != "dim"}  # a checkpoint from before the warning
    c = Diagnostics(make_cfg(), FakeMethod(LinearPredictor(D)))
    c.load_state_dict(old)
    assert (c.dim.flagged, c.dim.streak, c.collapse.streak) == (False, 0, a.collapse.streak)


def test_rule_fires_exactly_below_both_thresholds_documented_in_the_docs():
    doc = (REPO / "docs" / "diagnostics.md").read_text()
    assert f"`rankme_h < {diag_mod.DIM_RANK_H_FRACTION} · min(N, D)`" in doc
    assert f"`rankme_z < {diag_mod.DIM_RANK_Z_FRACTION} · min(N, d)`" in doc
    limits = {"rankme_h": diag_mod.DIM_RANK_H_FRACTION * 100, "rankme_z": diag_mod.DIM_RANK_Z_FRACTION * 200}
    below = {k: v * 0.99 for k, v in limits.items()}
    maxes = {"h_rank_max": 100, "z_rank_max": 200}
    assert looks_dim_collapsed({**below, **maxes})
    for k, v in limits.items():  # either rank at its threshold: not flagged; a missing signal never flags
        assert not looks_dim_collapsed({**below, k: v, **maxes}), k
        assert not looks_dim_collapsed({**below, k: None, **maxes}), k


def _committed_runs() -> list[Path]:
    return sorted(p.parent for p in (REPO / "docs" / "results").glob("*/runs/*/*/metrics.jsonl"))


def test_replay_of_the_committed_runs_matches_training_and_the_documented_flags():
    """Every run committed under docs/results, replayed: the collapse rule flags the steps training recorded in
    summary.json, and the dimensional rule flags exactly the runs docs/diagnostics.md names, at its steps (for the
    held-out runs, which logged the warning live, also the step training recorded)."""
    runs = _committed_runs()
    # 47 the levels were chosen on, 8 held out, 24 of the eps sweeps (§1e), 12 of c_j (§1f), 12 of alpha_p (§1g),
    # 12 of IsoLoss (§1h), 12 of c_j at freq 2 (§1i), 6 of fp32/bf16 on the AMX Xeon (§1j), 16 of weight decay (§1k),
    # 18 of the optimal predictor (§1l), 9 of the partitions (§1m), 21 of §1's seeds 3-5, 12 of the two-layer
    # predictor, regular or tied, with or without biases (§1n), 12 of its seeds 3-5, 3 of the freq = 5 hybrid (§1o),
    # §1o's rerun of §1c's seed 0, the two 12-epoch runs (§1p) and 6 of Table 2's weight decay (§1q)
    assert len(runs) == 233
    dim_flags = {}
    for run_dir in runs:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["backbone"]["name"] == "resnet18"  # features of width 8 x width; N = 2 x batch (one process)
        h_rank_max = min(2 * cfg["train"]["batch_size"], 8 * cfg["backbone"]["width"])
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        got = replay(rows, h_rank_max=h_rank_max)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert got["collapse_step"] == summary["collapse_step"], run_dir
        if "dim_collapse_step" in summary:  # trained with the warning: the replay judges as training did
            assert got["dim_collapse_step"] == summary["dim_collapse_step"], run_dir
        if got["dim_collapse_step"] is not None:
            dim_flags[str(run_dir.relative_to(REPO / "docs" / "results"))] = got["dim_collapse_step"]
    assert dim_flags == {
        "cpu_no_ema/runs/directpred_forward/seed0": 100,
        "cpu_no_ema/runs/directpred_forward/seed1": 100,
        "cpu_no_ema/runs/directpred_forward/seed2": 100,
        "cpu_no_ema_4ep/runs/linear_sym/seed0": 700,
        # the held-out check (sweeps/cpu/dim_warning_heldout.yaml, seed 3), predicted before it ran
        "dim_warning_heldout/runs/no_ema_directpred/seed3": 100,
        "dim_warning_heldout/runs/no_ema_linear_sym_4ep/seed3": 750,
        "dim_warning_heldout_4ep/runs/no_ema_linear_sym_4ep/seed4": 1450,  # seeds 4 and 5, predicted likewise
        "dim_warning_heldout_4ep/runs/no_ema_linear_sym_4ep/seed5": 1000,
        # Fig. 6 at CPU scale (§1g, sweeps/cpu/cifar10_alpha_p.yaml): alpha_p = 2 flagged, alpha_p = 5 in three of
        # four seeds (seed 5 spans 20.7 dimensions), alpha_p = 10 not
        "cpu_alpha_p/runs/alpha_p=2.0/seed0": 550,
        "cpu_alpha_p/runs/alpha_p=2.0/seed3": 400,
        "cpu_alpha_p/runs/alpha_p=2.0/seed4": 800,
        "cpu_alpha_p/runs/alpha_p=2.0/seed5": 700,
        "cpu_alpha_p/runs/alpha_p=5.0/seed0": 650,
        "cpu_alpha_p/runs/alpha_p=5.0/seed3": 1250,
        "cpu_alpha_p/runs/alpha_p=5.0/seed4": 450,
        # IsoLoss at CPU scale (§1h): both SimSiam cells, IsoLoss later
        "cpu_isoloss/runs/simsiam/seed0": 100,
        "cpu_isoloss/runs/simsiam/seed1": 100,
        "cpu_isoloss/runs/simsiam/seed2": 100,
        "cpu_isoloss/runs/simsiam_isoloss/seed0": 350,
        "cpu_isoloss/runs/simsiam_isoloss/seed1": 390,
        "cpu_isoloss/runs/simsiam_isoloss/seed2": 300,
        # Table 5 at CPU scale (§1k): the symmetric predictor without EMA, with decay on W_p only or none
        "cpu_weight_decay/runs/pred_wd,sym/seed0": 800,
        "cpu_weight_decay/runs/pred_wd,sym/seed3": 750,
        "cpu_weight_decay/runs/no_wd,sym/seed0": 1300,
        "cpu_weight_decay/runs/no_wd,sym/seed3": 800,
        "cpu_weight_decay/runs/no_wd,sym/seed5": 1150,  # and the collapse rule by the final report (step 1560)
        # Table 3's two-layer rows with EMA (§1n): the tied (symmetric) predictor in five of twelve runs, each ending
        # above its seed's untrained network in linear best (docs/diagnostics.md, "Flagged runs against their own
        # seed's untrained network")
        "cpu_mlp_symmetric/runs/symmetric=true,mlp_bias=false/seed1": 100,
        "cpu_mlp_symmetric/runs/symmetric=true,mlp_bias=false/seed2": 100,
        "cpu_mlp_symmetric/runs/symmetric=true,mlp_bias=true/seed1": 100,
        "cpu_mlp_symmetric_6seeds/runs/symmetric=true,mlp_bias=false/seed3": 100,
        "cpu_mlp_symmetric_6seeds/runs/symmetric=true,mlp_bias=true/seed3": 100,
        # Table 1 at CPU scale (§1l): the optimal plug-in, every cell and seed, at the second report
        **{
            f"cpu_optimal/runs/{row},freq={freq}/seed{seed}": 100
            for row in ("ema", "no_ema")
            for freq in (1, 2, 5)
            for seed in (0, 1, 2)
        },
    }


def test_replay_of_an_extended_run_drops_the_first_runs_final_verdict_as_training_does():
    low = {"rankme_h": 1.0, "rankme_z": 1.0, "z_rank_max": 128, "h_rank_max": 128}
    high = {**low, "rankme_h": 100.0}
    first = [{"kind": "diag", "step": 10, **high}, {"kind": "diag_final", "step": 12, **low}]
    assert replay(first)["dim_collapse_step"] == 12  # the first run ends flagged by its final report
    extended = first + [{"kind": "diag", "step": s, **high} for s in (20, 30)]
    extended.append({"kind": "diag_final", "step": 36, **high})
    assert replay(extended)["dim_collapse_step"] is None  # training resumed from the state before that report
    again = first + [{"kind": "diag", "step": s, **low} for s in (20, 30)]
    assert replay(again)["dim_collapse_step"] == 30  # and the periodic rule counts afresh from there


def test_replay_without_h_rank_max_never_flags_dimensional_collapse():
    rows = [{"kind": "diag", "step": s, "rankme_h": 1.0, "rankme_z": 1.0, "z_rank_max": 128} for s in (10, 20)]
    assert replay(rows)["dim_collapse_step"] is None
    assert replay(rows, h_rank_max=128)["dim_collapse_step"] == 20


def test_diagnose_reports_the_rule_on_its_batches_and_the_warning_kept_in_the_checkpoint(tiny_overrides, tmp_path):
    from directpred.config import load_config
    from directpred.diagnostics import report
    from directpred.train import Trainer

    run_dir = tmp_path / "run"
    summary = Trainer(load_config(None, tiny_overrides + ["train.max_steps=2"]), run_dir).fit()
    assert summary["dim_collapsed"] is False and summary["final_looks_dim_collapsed"] == 0
    row, lines = report.diagnose(run_dir, batches=1)
    verdict = "LOOKS DIMENSIONALLY COLLAPSED" if looks_dim_collapsed(row) else "healthy"
    assert f"dimensional-collapse rule on this batch: {verdict}" in lines
    assert "training-time dimensional-collapse warning: not flagged" in lines

    ckpt = run_dir / "checkpoints" / "last.pt"
    state = torch.load(ckpt, weights_only=False)
    state["diagnostics"]["dim"].update(collapsed=True, collapse_step=7, collapse_evidence="rankme_h=2 of max 32")
    torch.save(state, ckpt)
    _, lines = report.diagnose(run_dir, use_data=False)
    assert (
        "training-time dimensional-collapse warning: DIMENSIONALLY COLLAPSED at step 7: rankme_h=2 of max 32" in lines
    )
    del state["diagnostics"]["dim"]  # as a checkpoint written before the warning existed
    torch.save(state, ckpt)
    _, lines = report.diagnose(run_dir, use_data=False)
    assert "training-time dimensional-collapse warning: not kept by the version that wrote this checkpoint" in lines
    assert "training-time collapse detector: not flagged" in lines


def test_the_end_of_run_lines_name_each_flag_and_its_step():
    from directpred.cli.train import verdict_lines

    assert verdict_lines({"collapsed": False, "dim_collapsed": False}) == []
    assert verdict_lines({"knn_top1": 30.0}) == []  # diagnostics off or an old summary: nothing claimed
    lines = verdict_lines({"collapsed": True, "collapse_step": 40, "dim_collapsed": True, "dim_collapse_step": 100})
    assert len(lines) == 2 and "COLLAPSED (collapse rule) at step 40" in lines[0]
    assert "dimensional collapse (warning) at step 100" in lines[1]


def test_the_collapse_warning_says_the_run_stops_when_diag_stop_on_collapse_is_set(caplog):
    """With diag.stop_on_collapse=true the warning says the run stops now; it advised setting it before."""
    g = torch.Generator().manual_seed(0)
    z = torch.ones(2 * B, D) + 1e-6 * torch.randn(2 * B, D, generator=g)  # one point: the collapse rule fires
    h = torch.ones(2 * B, FEAT) + 1e-6 * torch.randn(2 * B, FEAT, generator=g)
    out = StepOutput(torch.tensor(0.0), h[:B], h[B:], z[:B], z[B:], z[:B], z[B:], z[B:], z[:B])
    for stop in (False, True):
        caplog.clear()
        cfg = make_cfg()
        cfg.diag.stop_on_collapse = stop
        diag = Diagnostics(cfg, FakeMethod(LinearPredictor(D)))
        for step in range(1, 5):
            diag.observe(step, out)
        assert diag.collapsed and diag.collapse_step == 4
        warned = [r.getMessage() for r in caplog.records if "COLLAPSED" in r.getMessage()]
        assert len(warned) == 1 and warned[0].endswith(diag_mod.COLLAPSE_STOP if stop else diag_mod.COLLAPSE_WARNING)
        assert ("the run stops here" in warned[0]) is stop and ("stops such runs" in warned[0]) is not stop
