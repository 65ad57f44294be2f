"""Resume at the edges: a run that ended on an epoch boundary (train.max_steps or train.epochs reached) and is then
extended runs that epoch's end as an uninterrupted run did (periodic kNN, online probe test, kept checkpoint), and
continues its diagnostics from before its final report."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from conftest import write_folder

from directpred.cli import main
from directpred.config import ConfigError, load_config
from directpred.train import Callback, TrainingError, TrainingInterrupted
from directpred.train.checkpoint import load_checkpoint
from directpred.train.logger import read_metrics
from directpred.train.loop import Trainer


def _epoch_rows(run: Path) -> list[tuple[str, int, dict]]:
    """The ``eval`` rows and the online probe's test rows of ``metrics.jsonl``: (kind, step, values)."""
    out = []
    for row in read_metrics(run):
        if row["kind"] == "eval" or (row["kind"] == "probe" and "probe_test_top1" in row):
            out.append((row["kind"], row["step"], {k: v for k, v in row.items() if k.endswith("top1")}))
    return out


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    sa, sb = load_checkpoint(a), load_checkpoint(b)
    assert sa["step"] == sb["step"]
    assert sa["knn_history"] == sb["knn_history"], f"{a.name}: kNN history differs"
    assert sa["diagnostics"] == sb["diagnostics"], f"{a.name}: diagnostics differ"  # DirectPred: no tensors there
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), f"{a.name}: {k} differs"
    pa, pb = sa["callbacks"]["online_probe"]["probe"], sb["callbacks"]["online_probe"]["probe"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("how", ["max_steps", "epochs"])
def test_run_extended_from_an_epoch_boundary_equals_uninterrupted(how, tiny_overrides, tmp_path):
    """Stopped by train.max_steps exactly at the end of epoch 1 (or finished with train.epochs=1), then resumed to 3
    epochs: the kNN of epoch 1 (which the first run left to its final evaluation) and the online probe's test row are
    there, the kept epoch checkpoints equal the uninterrupted run's, and so do the final figures."""
    common = tiny_overrides + [
        "predictor.name=directpred",
        "eval.knn_every=1",
        "eval.online_probe=true",
        "train.checkpoint_every=1",
    ]  # 128 images, batch 16: 8 steps per epoch
    full = Trainer(load_config(None, common + ["train.epochs=3"]), tmp_path / "full").fit()
    if how == "max_steps":
        Trainer(load_config(None, common + ["train.epochs=3", "train.max_steps=8"]), tmp_path / "part").fit()
        resume_args = ["--set", "train.max_steps=0"]
    else:
        Trainer(load_config(None, common + ["train.epochs=1"]), tmp_path / "part").fit()
        resume_args = ["--set", "train.epochs=3"]
    assert main(["train", "--resume", str(tmp_path / "part"), *resume_args]) == 0
    resumed = json.loads((tmp_path / "part" / "summary.json").read_text())
    assert [h["epoch"] for h in full["knn_history"]] == [1, 2]
    assert resumed["knn_history"] == full["knn_history"]
    assert resumed["knn_top1"] == full["knn_top1"] and resumed["steps"] == full["steps"] == 24
    rows = _epoch_rows(tmp_path / "full")
    # the probe's test row at 24 is the final evaluation's; the part run's final one at 8 gave way to epoch 1's end
    assert [(kind, step) for kind, step, _ in rows] == [
        ("eval", 8),
        ("probe", 8),
        ("eval", 16),
        ("probe", 16),
        ("probe", 24),
    ]
    assert _epoch_rows(tmp_path / "part") == rows
    for name in ("epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"):
        _assert_same_checkpoint(tmp_path / "full" / "checkpoints" / name, tmp_path / "part" / "checkpoints" / name)


@pytest.mark.parametrize("record", ["written", "absent"])
def test_a_resume_on_moved_data_equals_uninterrupted_and_on_other_data_is_refused(
    record, tiny_overrides, tiny_folder, tmp_path, capsys
):
    """data.path may change on resume, for a moved copy of the data: the run then ends as the uninterrupted one. Other
    data (48 images in 3 classes instead of 128 in 4) was taken before, its steps reinterpreted inside epochs of
    another size (or, with the online probe, a size-mismatch traceback): the checkpoint records what the data order
    depends on and the resume is refused, naming the change and the ways on, with no file of the run changed. A
    checkpoint written before the record (``absent``) still resumes."""
    common = tiny_overrides + ["eval.online_probe=true", "train.epochs=2"]  # 128 images, batch 16: 8 steps an epoch
    Trainer(load_config(None, common), tmp_path / "full").fit()
    run = tmp_path / "part"
    Trainer(load_config(None, common + ["train.max_steps=5"]), run).fit()  # stopped mid-epoch 1
    ckpt = run / "checkpoints" / "last.pt"
    if record == "absent":  # as written by an earlier version
        state = torch.load(ckpt, weights_only=True)
        record = state.pop("data")
        assert re.fullmatch("pixels:[0-9a-f]{32}", record.pop("content"))  # content_fingerprint's digest
        assert record == {
            "train_images": 128,
            "classes": ["class0", "class1", "class2", "class3"],
            "image_size": 32,
            "steps_per_epoch": 8,
        }
        torch.save(state, ckpt)
    else:
        other = write_folder(tmp_path / "other", n_train=16, n_test=4, n_classes=3)

        def files() -> dict[str, bytes]:
            return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}

        before = files()
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--set", "train.max_steps=0", "--set", f"data.path={other}"]) == 1
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"directpred: error: {ckpt} was trained on other data than data.path={other} holds (training images "
            "128 -> 48; steps per epoch 8 -> 3; classes 4 -> 3); resume with the run's own data (data.path may "
            "change only to a moved copy of it), or start a new run on this data"
        )
        assert files() == before  # command.txt too: a refused command is not recorded
    moved = tmp_path / "moved"
    shutil.copytree(tiny_folder, moved)
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=0", "--set", f"data.path={moved}"]) == 0
    assert f"path: {moved}" in (run / "config.yaml").read_text()
    _assert_same_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt", ckpt)
    full, resumed = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("full", "part"))
    assert resumed["steps"] == full["steps"] == 16 and resumed["knn_top1"] == full["knn_top1"]
    assert resumed["online_probe_test_top1"] == full["online_probe_test_top1"]


def test_extended_run_forgets_the_first_runs_final_report(tiny_overrides, tmp_path):
    """The final report of a finished run (diag_final; with diag.every=0 it folds the last batch into the F^ that the
    diagnostics keep for a linear predictor) is not part of the training state: a run extended from it reports on
    its own final state exactly as the uninterrupted run does, and its checkpoints hold the same diagnostics."""
    common = tiny_overrides + ["predictor.name=linear", "diag.every=0"]
    Trainer(load_config(None, common + ["train.epochs=2"]), tmp_path / "full").fit()
    Trainer(load_config(None, common + ["train.epochs=1"]), tmp_path / "part").fit()
    assert main(["train", "--resume", str(tmp_path / "part"), "--set", "train.epochs=2"]) == 0

    def final(run: Path) -> list[dict]:
        return [r for r in read_metrics(run) if r["kind"] == "diag_final" and r["step"] == 16]

    a, b = final(tmp_path / "full"), final(tmp_path / "part")
    assert len(a) == len(b) == 1
    assert {k: v for k, v in b[0].items() if k != "time"} == {k: v for k, v in a[0].items() if k != "time"}
    da = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["diagnostics"]
    db = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["diagnostics"]
    assert da.keys() == db.keys()
    for k in da:
        if k == "estimator":
            assert all(torch.equal(da[k][n], db[k][n]) for n in da[k]), "the diagnostics' F^ differs"
        else:
            assert da[k] == db[k], k


def test_resume_below_the_checkpoint_is_refused_and_leaves_the_run_as_it_is(tiny_overrides, tmp_path, capsys):
    """Resuming a finished run with the same train.epochs reports it as it is; with train.epochs (or max_steps) below
    the checkpoint's step it is refused (naming the step, the key and the ways on), and no file of the run changes:
    evaluating the longer checkpoint under the shorter length would leave config.yaml and summary.json disagreeing,
    and every later plain resume evaluating again."""
    run = tmp_path / "r"
    first = Trainer(load_config(None, tiny_overrides + ["train.epochs=2"]), run).fit()

    def files() -> dict[str, bytes]:
        return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}

    assert main(["train", "--resume", str(run)]) == 0  # the same epochs: a no-op that reports
    before = files()
    again = json.loads((run / "summary.json").read_text())
    assert again["steps"] == first["steps"] == 16 and again["knn_top1"] == first["knn_top1"]
    expected = (
        f"{run}: the checkpoint is at step 16 (epoch 2), past train.epochs=1 (8 steps): a run cannot be made shorter. "
        "Resume without changing train.epochs to keep it as it is (or with a larger value to train on); evaluate it "
        f"with `directpred eval {run}`; for a shorter run, start a new one"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        Trainer(load_config(None, tiny_overrides + ["train.epochs=1"]), run, resume=True).fit()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--set", "train.epochs=1"]) == 2
    assert "past train.epochs=1 (8 steps): a run cannot be made shorter" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--set", "train.max_steps=10", "--force"]) == 2
    assert "past train.max_steps=10: a run cannot be made shorter" in capsys.readouterr().err
    assert files() == before  # nothing of the run changed, command.txt included: refused commands are not recorded
    assert main(["train", "--resume", str(run)]) == 0  # still finished as it was
    assert "had already finished with this configuration" in capsys.readouterr().out


def test_a_finished_run_resumed_unchanged_is_left_as_it_is(tiny_overrides, tmp_path, monkeypatch, capsys):
    """`--resume` of a finished run with nothing changed evaluates nothing and writes nothing (no file of the run
    directory changes, however often); with an eval setting changed it evaluates again, once; a resume with changes
    that is killed before its end leaves no summary.json for the next resume to mistake for its own."""
    run = tmp_path / "r"
    Trainer(load_config(None, tiny_overrides + ["train.epochs=2"]), run).fit()

    def files() -> dict[str, bytes]:  # every file of the run directory (TensorBoard's, command.txt, ...)
        return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}

    before = files()

    def finals() -> list[dict]:
        return [r for r in read_metrics(run) if r["kind"] == "final"]

    evaluated: list[int] = []
    real_finish = Trainer.finish

    def counted_finish(self, **kwargs):
        evaluated.append(self.step)
        return real_finish(self, **kwargs)

    monkeypatch.setattr(Trainer, "finish", counted_finish)
    for _ in range(2):
        assert main(["train", "--resume", str(run)]) == 0
        out = capsys.readouterr().out
        assert "had already finished with this configuration" in out and "--set train.epochs=N" in out
    assert evaluated == [] and files() == before and len(finals()) == 1

    assert main(["train", "--resume", str(run), "--set", "eval.knn_k=3"]) == 0
    assert evaluated == [16] and "already finished" not in capsys.readouterr().out
    # the new evaluation's row replaces the old one at that step (the final report stays: no step was taken)
    summary = json.loads((run / "summary.json").read_text())
    assert len(finals()) == 1 and finals()[0]["knn_top1"] == summary["knn_top1"] and summary["knn_k_used"] == 3
    assert [r["step"] for r in read_metrics(run) if r["kind"] == "diag_final"] == [16]
    assert main(["train", "--resume", str(run)]) == 0  # finished with k=3 now: nothing again
    assert evaluated == [16] and len(finals()) == 1

    def killed_finish(self, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "finish", killed_finish)
    assert main(["train", "--resume", str(run), "--set", "eval.knn_k=5"]) == 130  # stopped at once
    assert not (run / "summary.json").exists()  # the k=3 summary does not describe the k=5 config.yaml
    monkeypatch.setattr(Trainer, "finish", counted_finish)
    assert main(["train", "--resume", str(run)]) == 0
    assert evaluated == [16, 16] and json.loads((run / "summary.json").read_text())["steps"] == 16


def test_a_run_stopped_on_collapse_resumed_unchanged_is_left_as_it_is(tiny_overrides, tmp_path, capsys):
    """A run that diag.stop_on_collapse ended is finished too: resumed unchanged it trains no step more (it trained two
    more, and logged a second final row, before) and says how to train on."""
    run = tmp_path / "c"
    over = tiny_overrides + ["predictor.name=none", "method.name=simsiam", "optim.lr=0.3", "diag.every=2"]
    over += ["diag.stop_on_collapse=true", "train.epochs=30"]
    first = Trainer(load_config(None, over), run).fit()
    assert first["stopped_early"] and first["steps"] < 30 * 8  # the collapse stopped it
    rows = (run / "metrics.jsonl").read_bytes()
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert "it was stopped on collapse; train on with --set diag.stop_on_collapse=false" in out
    assert (run / "metrics.jsonl").read_bytes() == rows
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == first["steps"]
    # evaluated otherwise (as a sweep re-run with another eval.* does): evaluated again, still no step more (it
    # trained up to diag.every steps before the restored verdict stopped it again)
    assert main(["train", "--resume", str(run), "--set", "eval.knn_k=5"]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert (again["steps"], again["stopped_early"], again["knn_k_used"]) == (first["steps"], True, 5)
    ends = [(r["kind"], r["step"]) for r in read_metrics(run) if r["kind"] in ("final", "diag_final")]
    assert sorted(ends) == [("diag_final", first["steps"]), ("final", first["steps"])]  # replaced, not added to
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == first["steps"]


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, result) -> None:
        if trainer.step == self.step:
            trainer.request_stop()


def test_stop_on_the_last_step_keeps_the_final_report(tiny_overrides, tmp_path):
    """A stop that comes on the run's last step: the resumed run (which trains no step, so has no step output to
    report on) ends with the same final diagnostics and verdict as an uninterrupted run."""
    cfg = load_config(None, tiny_overrides + ["train.max_steps=3"])
    full = Trainer(cfg, tmp_path / "full").fit()
    with pytest.raises(TrainingInterrupted):
        Trainer(cfg, tmp_path / "part", callbacks=[_StopAt(3)]).fit()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # finishing a stopped run is no "nothing to train" case
        resumed = Trainer(cfg, tmp_path / "part", resume=True).fit()
    final = {k: v for k, v in full.items() if k.startswith("final_") or k.startswith("collapse")}
    assert "final_z_std_ratio" in final and "final_looks_collapsed" in final
    assert {k: resumed.get(k) for k in final} == final
    rows = [r for r in read_metrics(tmp_path / "part") if r["kind"] == "diag_final"]
    assert [r["step"] for r in rows] == [3]


def test_extending_a_cosine_schedule_on_resume_says_what_changes(tiny_overrides, tmp_path):
    """train.epochs raised on resume stretches a cosine schedule under the steps to come: a warning gives the
    learning rate and EMA momentum at the checkpoint's step under both lengths (checked against the closed forms),
    and how to stop early exactly; a constant schedule, and train.max_steps raised, change nothing and say nothing."""
    cosine = ["optim.schedule=warmup_cosine", "optim.warmup_epochs=0", "optim.lr=0.1", "method.ema=0.99"]
    cosine += ["method.ema_schedule=cosine"]
    run = tmp_path / "cos"
    Trainer(load_config(None, tiny_overrides + cosine + ["train.epochs=1"]), run).fit()  # 8 steps: lr ends at 0
    # step 8 of 16: lr 0.1 * (1 + cos(pi / 2)) / 2 = 0.05 (of 8: cos(pi), 0); EMA 1 - 0.01 (cos(pi / 2) + 1) / 2
    expected = (
        "train.epochs 1 -> 2 on resume: the cosine schedule (optim.schedule, method.ema_schedule) now runs over 16 "
        "steps instead of 8, so at step 8 the learning rate is 0.05 (was 0) and the EMA momentum is 0.995 (was 1). "
        "The 8 steps taken followed the 1-epoch schedule"
    )
    with pytest.warns(RuntimeWarning, match=re.escape(expected)):
        Trainer(load_config(None, tiny_overrides + cosine + ["train.epochs=2"]), run, resume=True).fit()

    for name, first, then in (
        ("constant", ["train.epochs=1"], ["train.epochs=2"]),
        ("max_steps", cosine + ["train.epochs=2", "train.max_steps=4"], cosine + ["train.epochs=2"]),
    ):
        run = tmp_path / name
        Trainer(load_config(None, tiny_overrides + first), run).fit()
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="train.epochs .* on resume")
            Trainer(load_config(None, tiny_overrides + then), run, resume=True).fit()


def test_a_resume_where_auto_precision_resolves_otherwise_says_so(tiny_overrides, tmp_path, monkeypatch):
    """train.precision=auto is fp32 on a CPU without AMX and bf16 on one with it: a run resumed on the other kind of
    machine (as this project's machines vary) would change precision mid-run without a word."""
    from directpred import runtime

    over = tiny_overrides + ["train.precision=auto", "train.epochs=2"]
    run = tmp_path / "run"
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: False)
    Trainer(load_config(None, over + ["train.max_steps=3"]), run).fit()  # fp32, stopped at step 3
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["precision"] == "fp32" and state["hardware"]["amx"] is False
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: True)  # the other machine: auto is bf16 there
    expected = (
        r"was trained in fp32 up to step 3 on .*; train.precision=auto runs bfloat16 here, "
        r".* --set train.precision=fp32$"
    )
    with pytest.warns(RuntimeWarning, match=expected):
        resumed = Trainer(load_config(None, over), run, resume=True)
        resumed.fit()
    assert resumed.autocast_dtype == torch.bfloat16
    with warnings.catch_warnings():  # the same machine again: nothing to say
        warnings.filterwarnings("error", message=".*was trained in")
        Trainer(load_config(None, over + ["train.epochs=3"]), run, resume=True).fit()
    # the advice works: the command line takes the precision change on resume (as it takes train.device)
    monkeypatch.setattr(runtime, "cpu_has_amx", lambda: False)
    # (config.yaml still holds the first run's max_steps=3: the Trainer API above does not rewrite it, the CLI does)
    changes = ["--set", "train.epochs=4", "--set", "train.max_steps=0", "--set", "train.precision=bf16"]
    assert main(["train", "--resume", str(run), *changes]) == 0
    assert load_checkpoint(run / "checkpoints" / "last.pt")["precision"] == "bfloat16"


def test_a_forced_change_that_no_step_would_train_with_is_refused(tiny_overrides, tmp_path, capsys):
    """`--force` with a change beyond the resumable settings on a run that has trained all its steps rewrote
    config.yaml (and evaluated again under it) though not one step trained with the change; it is refused, nothing
    of the run changes (command.txt included), and with more steps the same change is taken."""
    run = tmp_path / "r"
    Trainer(load_config(None, tiny_overrides + ["train.epochs=1"]), run).fit()

    def files() -> dict[str, bytes]:
        return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}

    before = files()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--force", "--set", "predictor.rho=0.5"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"directpred: config error: resume with changes to predictor.rho (--force): the run in {run} has trained all "
        "its 8 steps (train.epochs=1), so no step would train with them and its config.yaml would claim them; to "
        "train on with them, resume with --set train.epochs=N (N > 1) as well, or start a new run from "
        f"{run / 'config.yaml'} with --out"
    )
    assert files() == before
    # more steps that train.epochs caps: still none to train; the advice names the limit that binds
    assert main(["train", "--resume", str(run), "--force", "--set", "predictor.rho=0.5", "--set", "train.max_steps=20"])
    assert "resume with --set train.epochs=N (N > 1) as well" in capsys.readouterr().err
    # config.yaml edited by hand (or rewritten by a --force resume killed before its first checkpoint): the change
    # is judged against what the checkpoint trained with, not against config.yaml
    edited = before["config.yaml"].decode().replace("  rho: 0.3\n", "  rho: 0.5\n", 1)
    assert edited != before["config.yaml"].decode()
    (run / "config.yaml").write_text(edited)
    assert main(["train", "--resume", str(run), "--force", "--set", "eval.knn_k=5"]) == 2
    assert "resume with changes to predictor.rho (--force)" in capsys.readouterr().err
    (run / "config.yaml").write_bytes(before["config.yaml"])
    assert files() == before
    command = ["train", "--resume", str(run), "--force", "--set", "predictor.rho=0.5", "--set", "train.epochs=2"]
    assert main(command) == 0
    cfg = load_config(run / "config.yaml")
    assert (cfg.predictor.rho, cfg.train.epochs) == (0.5, 2)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 16
    recorded = (run / "command.txt").read_text().splitlines()
    assert len(recorded) == len(before["command.txt"].decode().splitlines()) + 1  # the refused one is not there


def test_a_forced_change_on_a_run_stopped_on_collapse_is_refused_while_it_stays_stopped(tiny_overrides, tmp_path):
    """A run stopped on collapse, resumed with diag.stop_on_collapse still on, trains no step: a --force change is
    refused as for a finished run; with the stop off, the steps to come train with it."""
    run = tmp_path / "r"
    Trainer(load_config(None, tiny_overrides + ["train.epochs=1", "train.max_steps=3"]), run).fit()
    ckpt = run / "checkpoints" / "last.pt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    for key in ("diagnostics", "diagnostics_before_final"):  # as the collapse rule leaves them, in training
        state[key]["collapsed"] = True
    torch.save(state, ckpt)
    forced = ["--force", "--set", "predictor.rho=0.5", "--set", "train.max_steps=0"]
    forced += ["--set", "diag.stop_on_collapse=true"]
    with pytest.raises(ConfigError, match=r"was stopped on collapse at step 3 and diag\.stop_on_collapse=true keeps"):
        _resume_forced(run, forced)
    assert load_config(run / "config.yaml").predictor.rho == 0.3
    assert main(["train", "--resume", str(run), *forced[:-1], "diag.stop_on_collapse=false"]) == 0
    assert load_config(run / "config.yaml").predictor.rho == 0.5
    assert load_checkpoint(ckpt)["step"] == 8


def _resume_forced(run: Path, forced: list[str]) -> None:
    """`directpred train --resume RUN FORCED...` as the CLI runs it, raising its error rather than printing it."""
    from directpred.config import read_run_config

    sets = [forced[i + 1] for i, a in enumerate(forced) if a == "--set"]
    cfg = load_config(None, sets, base=read_run_config(run).to_dict())
    Trainer(cfg, run, resume=True).setup()


def test_a_new_run_refused_after_its_checks_leaves_no_record(tiny_overrides, tmp_path, capsys):
    """A new run that fails while it is set up (here: no images where data.path points) writes neither config.yaml
    nor command.txt, so the same command, once the data is there, starts the run with one line in command.txt."""
    run, data = tmp_path / "r", tmp_path / "later"
    (data / "train").mkdir(parents=True)
    sets = [s for s in tiny_overrides if not s.startswith("data.path=")] + [f"data.path={data}", "train.max_steps=2"]
    command = ["train", str(Path(__file__).parents[2] / "configs" / "cpu" / "quickstart.yaml"), "--out", str(run)]
    for s in sets:
        command += ["--set", s]
    assert main(command) == 1
    assert not (run / "config.yaml").exists() and not (run / "command.txt").exists()
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "the run started in it stopped before it was set up (config.yaml is written once the data" in err
    assert err.endswith(f"nothing to resume or read; start it again with `directpred train CONFIG --out {run}`")
    write_folder(data, n_train=32, n_test=8)
    assert main(command) == 0
    assert len((run / "command.txt").read_text().splitlines()) == 1


def test_a_resume_on_other_images_of_the_same_count_and_classes_is_refused(tiny_overrides, tiny_folder, tmp_path):
    """Other images with the same count, classes and size (the training images mirrored) passed the data check
    before, and the run continued on them; the checkpoint now holds a digest of the labels and of 32 of the images,
    so the resume is refused, and nothing of the run changes."""
    from PIL import Image

    mirrored = tmp_path / "mirrored"
    shutil.copytree(tiny_folder, mirrored)
    for f in sorted((mirrored / "train").rglob("*.png")):
        Image.open(f).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(f)
    run = tmp_path / "r"
    Trainer(load_config(None, tiny_overrides + ["train.epochs=2", "train.max_steps=5"]), run).fit()

    def files() -> dict[str, bytes]:
        return {str(f.relative_to(run)): f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}

    before = files()
    cache = f"data.cache_dir={tmp_path / 'cache2'}"
    expected = (
        f"{run / 'checkpoints' / 'last.pt'} was trained on other data than data.path={mirrored} holds (other images: "
        "the same count, classes and size, but a digest of their labels and of 32 of them differs; if you replaced a "
        "corrupt file by a good copy, resume with --force); resume with the run's own data"
    )
    with pytest.raises(TrainingError, match=re.escape(expected)):
        cfg = load_config(
            None, tiny_overrides + ["train.epochs=2", "train.max_steps=0", f"data.path={mirrored}", cache]
        )
        Trainer(cfg, run, resume=True).fit()
    assert files() == before


class _Killed(Exception):
    """Stands for a SIGKILL: nothing after the raise runs, and nothing is written on the way out."""


def test_a_kill_in_an_epoch_end_after_its_step_checkpoint_runs_that_epoch_end_on_resume(
    tiny_overrides, tmp_path, monkeypatch
):
    """With train.checkpoint_every_steps dividing the epoch, the step checkpoint of an epoch's last step was written
    before that epoch's end and recorded it as done: a process killed during the epoch end (after its kNN row,
    before its kept checkpoint) resumed into the next epoch, leaving out epoch 1's kNN and epoch_0001.pt. Now the
    epoch end runs on resume, its logged rows give way to the rerun's, and the run equals the uninterrupted one."""
    from directpred.train import callbacks as cbm

    common = tiny_overrides + [
        "predictor.name=directpred",
        "eval.knn_every=1",
        "eval.online_probe=true",
        "train.checkpoint_every=1",
        "train.checkpoint_every_steps=4",
        "train.epochs=3",
    ]  # 8 steps per epoch
    Trainer(load_config(None, common), tmp_path / "full").fit()
    run = tmp_path / "part"
    keep = cbm.CheckpointCallback.on_epoch_end

    def killed_before_the_epoch_checkpoint(self, trainer, epoch):
        if epoch == 1:
            raise _Killed
        keep(self, trainer, epoch)

    monkeypatch.setattr(cbm.CheckpointCallback, "on_epoch_end", killed_before_the_epoch_checkpoint)
    with pytest.raises(_Killed):
        Trainer(load_config(None, common), run).fit()
    assert [(k, s) for k, s, _ in _epoch_rows(run)] == [("eval", 8), ("probe", 8)]  # logged before the kill
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch_end_pending"] is True
    monkeypatch.setattr(cbm.CheckpointCallback, "on_epoch_end", keep)
    Trainer(load_config(None, common), run, resume=True).fit()
    assert _epoch_rows(run) == _epoch_rows(tmp_path / "full")  # once each, as in the uninterrupted run
    for name in ("epoch_0001.pt", "epoch_0002.pt", "epoch_0003.pt", "last.pt"):
        _assert_same_checkpoint(tmp_path / "full" / "checkpoints" / name, run / "checkpoints" / name)


def test_a_stop_after_the_loops_last_check_is_not_ignored(tiny_overrides, tmp_path):
    """A SIGTERM arriving in the last epoch end or the final report (after the loop's last stop check) was ignored:
    the whole final evaluation ran and the command exited 0. The stop now ends the run after its final checkpoint,
    with the command that evaluates it."""

    class StopInTheLastEpochEnd(Callback):
        def on_epoch_end(self, trainer, epoch):
            trainer.request_stop(15)

    run = tmp_path / "run"
    cfg = load_config(None, tiny_overrides + ["train.epochs=1"])
    with pytest.raises(TrainingInterrupted, match=r"at step 8 \(training done, in the final evaluation\)"):
        Trainer(cfg, run, callbacks=[StopInTheLastEpochEnd()]).fit()
    assert not (run / "summary.json").exists()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 8
    summary = Trainer(cfg, run, resume=True).fit()  # evaluates the trained model
    assert summary["steps"] == 8 and (run / "summary.json").is_file()


def test_an_fp32_checkpoint_resumes_in_fp16(tiny_overrides, tmp_path, monkeypatch):
    """train.precision may change on resume, but an fp32 (or bf16) checkpoint's GradScaler state is empty (a disabled
    scaler saves nothing) and loading it into fp16's enabled scaler raised RuntimeError. fp16 is CUDA-only: its
    scaler is stood in for by one enabled on the CPU."""
    from directpred.train import loop

    run = tmp_path / "run"
    over = tiny_overrides + ["train.epochs=2"]
    Trainer(load_config(None, over + ["train.max_steps=3", "train.precision=fp32"]), run).fit()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["scaler"] == {}
    real = torch.amp.GradScaler
    monkeypatch.setattr(loop.torch.amp, "GradScaler", lambda *a, **k: real("cpu", enabled=True))
    trainer = Trainer(load_config(None, over + ["train.max_steps=4"]), run, resume=True)
    trainer.setup()
    assert trainer.scaler.is_enabled() and trainer.step == 3


def test_a_resume_removes_the_run_directorys_leftover_temporaries(tiny_overrides, tmp_path):
    """Only checkpoints/ was cleaned; the temporaries of summary.json, config.yaml and metrics.jsonl of a writer
    killed mid-write stayed (docs/troubleshooting.md says leftover temporaries are removed on resume)."""
    from directpred.train.checkpoint import TMP_SUFFIX

    run = tmp_path / "run"
    over = tiny_overrides + ["train.epochs=2"]
    Trainer(load_config(None, over + ["train.max_steps=3"]), run).fit()
    left = [run / f".{name}.abc123{TMP_SUFFIX}" for name in ("summary.json", "config.yaml", "metrics.jsonl")]
    left.append(run / "checkpoints" / f".last.pt.def456{TMP_SUFFIX}")
    for f in left:
        f.write_text("torn")
    Trainer(load_config(None, over), run, resume=True).fit()
    assert [f for f in left if f.exists()] == []


def test_a_run_max_steps_ended_is_told_to_raise_max_steps_not_epochs(tiny_overrides, tmp_path, capsys):
    """The hint for a finished run said `--set train.epochs=N` also where train.max_steps ended it, which trains no
    step (the limit still holds): it names train.max_steps there."""
    run = tmp_path / "r"
    Trainer(load_config(None, tiny_overrides + ["train.epochs=2", "train.max_steps=3"]), run).fit()
    assert main(["train", "--resume", str(run)]) == 0
    assert "train longer with --set train.max_steps=N (0: no limit)" in capsys.readouterr().out
