"""``directpred diagnose`` on a tiny run: data problems become a note, model errors are not hidden; the plotting
modules leave matplotlib's backend alone."""

from __future__ import annotations

import subprocess
import sys

import pytest

from directpred.config import load_config
from directpred.data.datasets import DataError
from directpred.diagnostics import report
from directpred.train import Trainer


@pytest.fixture
def run_dir(tiny_overrides, tmp_path):
    Trainer(load_config(None, tiny_overrides + ["train.max_steps=2"]), tmp_path / "run").fit()
    return tmp_path / "run"


def test_unloadable_data_is_a_note_and_the_report_still_comes(run_dir, monkeypatch):
    row, lines = report.diagnose(run_dir, batches=1)
    assert row["rankme_z"] is not None and not any("no batch metrics" in line for line in lines)

    def unreadable(*args, **kwargs):
        raise DataError("the archive is truncated")

    monkeypatch.setattr(report, "load_data", unreadable)
    row, lines = report.diagnose(run_dir, batches=1)
    assert "rankme_z" not in row or row["rankme_z"] is None
    assert "note: no batch metrics: the data could not be loaded (DataError: the archive is truncated)" in lines


def test_diagnose_takes_a_str_as_its_siblings_do(run_dir):
    """diagnose("RUN") raised AttributeError: 'str' object has no attribute 'is_dir'."""
    _, lines = report.diagnose(str(run_dir), batches=1)
    assert lines[0].startswith("checkpoint ") and lines == report.diagnose(run_dir, batches=1)[1]
    ckpt = str(run_dir / "checkpoints" / "last.pt")
    assert report.resolve_checkpoint(ckpt) == (run_dir / "checkpoints" / "last.pt", run_dir)
    assert report.resolve_checkpoint(str(run_dir)) == (run_dir / "checkpoints" / "last.pt", run_dir)


def test_a_model_error_is_not_reported_as_missing_data(run_dir, monkeypatch):
    real = report.build_method

    def broken(cfg):
        method = real(cfg)

        def forward(*args, **kwargs):
            raise RuntimeError("a bug in the model")

        method.forward = forward
        return method

    monkeypatch.setattr(report, "build_method", broken)
    with pytest.raises(RuntimeError, match="a bug in the model"):
        report.diagnose(run_dir, batches=1)


def test_plotting_modules_keep_the_callers_backend(tmp_path):
    code = (
        "import matplotlib; matplotlib.use('pdf'); "
        "from directpred.diagnostics import plots; import directpred.theory.plots, directpred.theory.figures; "
        "import directpred.cli; directpred.cli.build_parser(); "
        "fig, axes = plots.new_figure(); plots.plot_curves(axes[0][0], {'a': ([0, 1], [1.0, 0.5])}, ylabel='y'); "
        f"plots.save_figure(fig, {str(tmp_path / 'f.png')!r}); "
        "print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "pdf"
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_whose_config_has_an_unknown_key_names_the_file_and_the_fix(tmp_path, capsys):
    """A checkpoint of another directpred version (a config key this one lacks): diagnose names the checkpoint,
    the key and the version to use, instead of a bare 'unknown config key'."""
    from directpred.cli import main
    from directpred.config import Config
    from directpred.train.checkpoint import save_checkpoint

    config = Config().to_dict()
    config["train"]["foo"] = 1
    ckpt = tmp_path / "other_version.pt"
    save_checkpoint(ckpt, {"model": {}, "config": config, "step": 1, "epoch": 0, "git_commit": "0123456789abcdef"})
    assert main(["diagnose", str(ckpt), "--no-data"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(
        f"directpred: config error: {ckpt}: the configuration stored in this checkpoint does not load here (unknown "
        "config key 'train.foo'."
    )
    assert err.endswith(
        "); it was written by another version of directpred (git commit 0123456789ab): run the command with that "
        "version"
    )


@pytest.mark.parametrize("predictor", ["directpred", "linear"])
def test_the_eps_note_comes_with_directpred_only(predictor, tiny_overrides, tmp_path):
    """The p_j line says that DirectPred's eps lowers the slope only where W_p is DirectPred's."""
    over = tiny_overrides + ["train.max_steps=2", f"predictor.name={predictor}"]
    Trainer(load_config(None, over), tmp_path / "run").fit()
    _, lines = report.diagnose(tmp_path / "run", batches=1)
    (line,) = [x for x in lines if x.startswith("p_j vs s_j")]
    assert ("DirectPred's eps lowers it" in line) == (predictor == "directpred")
    assert "(0.5 for the law" in line


def test_a_partitioned_run_is_diagnosed_with_the_matrices_that_predict(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    Trainer(load_config(None, [*tiny_overrides, "train.max_steps=2", "predictor.partitions=2"]), run).fit()
    row, lines = report.diagnose(run, batches=1)
    assert any(line.startswith("W_p (batch mean of the partitioned predictor's per-sample W_p(f))") for line in lines)
    assert row["alignment"] is not None and row["alignment"] < 1 - 1e-4  # not the global F^'s own matrix (1 exactly)
    _, lines = report.diagnose(run, use_data=False)  # a mean over a batch: without data, said so
    assert (
        "W_p: this predictor's is a mean over a batch; run with data (without --no-data, --batches >= 1) for it"
        in lines
    )
