"""The collapse verdict in summary.json takes a final report on the final state into account, so a run shorter
than two report periods (the periodic rule needs two consecutive flagged reports) is still judged."""

from __future__ import annotations

import json

import pytest

from directpred.config import load_config
from directpred.diagnostics.hook import LOSS_PER_TERM_MAX, RANK_FRACTION_MAX, STD_RATIO_MAX
from directpred.train.loop import Trainer

# 16 steps, one periodic report (step 10) inside: the periodic rule alone can never flag this run.
SHORT = ["projector.out_dim=32", "diag.every=10", "train.max_steps=16", "train.epochs=2"]


def _run(tiny_overrides, tmp_path, name, extra):
    over = [o for o in tiny_overrides if not o.startswith("diag.every")] + SHORT + extra
    summary = Trainer(load_config(None, over), tmp_path / name).fit()
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, [r for r in rows if r["kind"] in ("diag", "diag_final")]


@pytest.mark.parametrize("every", ["10", "0"])
def test_short_collapsing_run_is_judged_collapsed_by_the_final_report(every, tiny_overrides, tmp_path):
    summary, diag = _run(
        tiny_overrides,
        tmp_path,
        "collapse",
        ["method.name=simsiam", "predictor.name=none", "optim.lr=1.0", f"diag.every={every}"],
    )
    assert [r["step"] for r in diag] == ([10, 16] if every == "10" else [16])
    final = diag[-1]
    assert final["kind"] == "diag_final" and final["looks_collapsed"] == 1 and final["collapsed"] == 1
    assert summary["collapsed"] is True and summary["collapse_step"] == 16
    assert "final report" in summary["collapse_evidence"]
    # The verdict follows the documented thresholds on the final signals recorded in the summary.
    assert summary["final_z_std_ratio"] < STD_RATIO_MAX
    assert summary["final_rankme_z"] < RANK_FRACTION_MAX * summary["final_z_rank_max"]
    assert summary["final_loss_per_term"] < LOSS_PER_TERM_MAX
    assert json.loads((tmp_path / "collapse" / "summary.json").read_text())["collapsed"] is True


def test_short_healthy_run_is_judged_not_collapsed(tiny_overrides, tmp_path):
    summary, diag = _run(tiny_overrides, tmp_path, "healthy", ["method.name=byol", "predictor.name=directpred"])
    assert diag[-1]["kind"] == "diag_final" and diag[-1]["looks_collapsed"] == 0
    assert summary["collapsed"] is False and summary["final_looks_collapsed"] == 0
    assert summary["final_z_std_ratio"] > STD_RATIO_MAX
