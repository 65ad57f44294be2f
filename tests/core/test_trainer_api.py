"""The Trainer as a library: no side effects before fit, a stop request instead of signal handlers, exceptions
instead of SystemExit, callbacks in their documented order, and the CLI's mapping of a stop to exit code 128+signal."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from directpred.cli import main
from directpred.config import load_config
from directpred.methods import build_method
from directpred.train import Callback, Trainer, TrainingInterrupted
from directpred.train import loop as loop_module
from directpred.train.checkpoint import load_checkpoint


def test_constructing_a_trainer_touches_nothing(tiny_overrides, tmp_path, monkeypatch):
    def no_data(*args, **kwargs):
        raise AssertionError("data loaded at construction")

    monkeypatch.setattr(loop_module, "load_data_shared", no_data)
    trainer = Trainer(load_config(None, tiny_overrides + ["train.max_steps=1"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    assert not hasattr(trainer, "data") and not hasattr(trainer, "method")  # nothing loaded or built yet


def test_build_method_draws_from_the_global_generator_and_setup_seeds_it_with_train_seed(tiny_overrides, tmp_path):
    """What train.seed's and build_method's docstrings say: build_method(cfg) does not seed (two calls, two
    initialisations); Trainer.setup's network is the one torch.manual_seed(cfg.train.seed) + build_method(cfg) gives."""
    cfg = load_config(None, tiny_overrides + ["train.max_steps=1", "train.seed=3"])

    def weights(method):
        return {k: v.clone() for k, v in method.state_dict().items() if v.is_floating_point()}

    first, second = weights(build_method(cfg)), weights(build_method(cfg))
    assert any(not torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(cfg.train.seed)
    seeded = weights(build_method(cfg))
    trainer = Trainer(cfg, tmp_path / "run").setup()
    trainer.logger.close()
    assert all(torch.equal(seeded[k], v) for k, v in weights(trainer.method).items())


class _StopAt(Callback):
    """Asks for a stop at ``step`` and records the SIGINT/SIGTERM handlers seen during the run."""

    def __init__(self, step: int, stop=None) -> None:
        self.step, self.stop, self.handlers = step, stop, set()

    def on_step_end(self, trainer, result) -> None:
        self.handlers.add((signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)))
        if trainer.step == self.step:
            if self.stop is None:
                trainer.request_stop(signal.SIGTERM)
            else:
                self.stop.set()


@pytest.mark.parametrize("how", ["request_stop", "event"])
def test_stop_request_raises_interrupted_with_checkpoint_and_installs_no_handler(how, tiny_overrides, tmp_path):
    event = threading.Event() if how == "event" else None
    cb = _StopAt(3, event)
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    trainer = Trainer(
        load_config(None, tiny_overrides + ["train.epochs=1"]), tmp_path / "run", callbacks=[cb], stop=event
    )
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    exc = info.value
    assert exc.step == 3 and exc.checkpoint == tmp_path / "run" / "checkpoints" / "last.pt"
    assert exc.signum == (signal.SIGTERM if how == "request_stop" else None)
    assert load_checkpoint(exc.checkpoint)["step"] == 3
    assert f"--resume {tmp_path / 'run'}" in str(exc)
    assert cb.handlers == {before}  # the library never touched the process's signal handlers
    assert not (tmp_path / "run" / "summary.json").exists()  # no final evaluation after a stop


def test_git_commit_runs_once_per_run(tiny_overrides, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(loop_module, "git_commit", lambda: calls.append(1) or f"commit{len(calls)}")
    summary = Trainer(
        load_config(None, tiny_overrides + ["train.max_steps=3", "train.checkpoint_every_steps=1"]), tmp_path / "run"
    ).fit()
    assert len(calls) == 1 and summary["git_commit"] == "commit1"
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["git_commit"] == "commit1"


class _Recorder(Callback):
    def __init__(self, events: list) -> None:
        self.events = events

    def on_fit_start(self, trainer) -> None:
        self.events.append(("fit_start", trainer.step))

    def on_step_end(self, trainer, result) -> None:
        # the step is counted, its checkpoint (every 2 steps) already written by the built-in callback
        saved = trainer.last_checkpoint[1] if trainer.last_checkpoint else None
        self.events.append(("step", trainer.step, trainer.epoch, saved, result.skipped))

    def on_epoch_end(self, trainer, epoch) -> None:
        self.events.append(("epoch", epoch, trainer.last_checkpoint[1]))

    def on_loop_end(self, trainer) -> None:
        self.events.append(("loop_end", trainer.step))

    def on_train_end(self, trainer) -> None:
        self.events.append(("train_end", trainer.step))


def test_callbacks_run_in_documented_order_after_the_built_in_ones(tiny_overrides, tmp_path):
    events: list = []
    over = tiny_overrides + ["train.epochs=2", "train.max_steps=10", "train.checkpoint_every_steps=2"]
    Trainer(load_config(None, over), tmp_path / "run", callbacks=[_Recorder(events)]).fit()
    # 128 training images / batch 16 = 8 steps per epoch; the built-in checkpoint callback runs before ours.
    expected = [("fit_start", 0)]
    for s in range(1, 11):
        expected.append(("step", s, (s - 1) // 8, 2 * (s // 2) or None, False))
        if s == 8:
            expected.append(("epoch", 1, 8))
    expected += [("loop_end", 10), ("train_end", 10)]
    assert events == expected


def test_cli_maps_sigterm_to_exit_code_and_resume_message(tiny_overrides, tmp_path, monkeypatch, capsys):
    real_step = Trainer.train_step

    def step_then_signal(self, images):
        res = real_step(self, images)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the CLI's handler: a stop request
        return res

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    args = ["train", "--out", str(tmp_path / "run")]
    for o in tiny_overrides + ["train.epochs=1"]:
        args += ["--set", o]
    (tmp_path / "empty.yaml").write_text("{}\n")
    assert main([*args[:1], str(tmp_path / "empty.yaml"), *args[1:]]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert (
        f"Stopped by SIGTERM at step 2; checkpoint written to {tmp_path / 'run' / 'checkpoints' / 'last.pt'}."
        f"\nResume with: directpred train --resume {tmp_path / 'run'}"
    ) in err
    assert signal.getsignal(signal.SIGTERM) is before  # restored after the command
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2


def test_the_resume_hint_of_a_multi_process_stop_is_the_torchrun_launch(tmp_path):
    """A run resumes only with its global batch, so after a stop under torchrun the hint is not the one-process
    ``directpred train --resume`` (which refuses the checkpoint) but the same torchrun launch."""
    from directpred.train.faults import TrainingInterrupted

    run = tmp_path / "run"
    one = TrainingInterrupted(signal.SIGTERM, 17, run / "checkpoints" / "last.pt", run)
    two = TrainingInterrupted(signal.SIGTERM, 17, run / "checkpoints" / "last.pt", run, world=2)
    assert str(one).endswith(f"\nResume with: directpred train --resume {run}")
    assert str(two).endswith(
        f"\nResume with: torchrun <the same options: 2 processes> -m directpred train --resume {run}"
    )


def test_a_stop_on_an_epochs_last_step_runs_that_epochs_end_on_resume(tiny_overrides, tmp_path):
    """The epoch's end (periodic kNN, the kept epoch checkpoint) follows its last step; a stop agreed on that step
    returns first, so the resumed run must run it before the next epoch: the run then equals an uninterrupted one."""
    common = tiny_overrides + ["train.epochs=2", "eval.knn_every=1", "train.checkpoint_every=1", "eval.linear=false"]
    reference = Trainer(load_config(None, common), tmp_path / "ref").fit()
    spe = reference["steps"] // 2
    with pytest.raises(TrainingInterrupted):
        Trainer(load_config(None, common), tmp_path / "run", callbacks=[_StopAt(spe)]).fit()
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["epoch_end_pending"] is True
    assert not (tmp_path / "run" / "checkpoints" / "epoch_0001.pt").exists()
    resumed = Trainer(load_config(None, common), tmp_path / "run", resume=True).fit()
    assert [h["step"] for h in reference["knn_history"]] == [spe]  # epoch 2's kNN is the final evaluation's
    assert resumed["knn_history"] == reference["knn_history"] and resumed["knn_top1"] == reference["knn_top1"]
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "epoch_0001.pt")["step"] == spe


def test_resuming_after_the_final_checkpoint_keeps_the_final_report(tiny_overrides, tmp_path):
    """Killed after the last checkpoint but before summary.json: the resumed run has no last batch to report on, so
    the final report (and its collapse verdict) must come from the checkpoint."""
    cfg = load_config(None, tiny_overrides + ["train.epochs=1", "eval.linear=false"])
    done = Trainer(cfg, tmp_path / "run").fit()
    assert "final_rankme_z" in done and "final_looks_collapsed" in done
    (tmp_path / "run" / "summary.json").unlink()
    again = Trainer(cfg, tmp_path / "run", resume=True).fit()
    final = {k: v for k, v in done.items() if k.startswith("final_") or k == "collapsed"}
    assert {k: again[k] for k in final} == final


@pytest.mark.parametrize("gap", ["same_stop", "second_stop"])
def test_a_stop_delivered_twice_still_stops_after_the_step(tiny_overrides, tmp_path, monkeypatch, capsys, gap):
    """Slurm signals every process of a job step and torchrun passes its own SIGTERM on to the same ranks: two
    SIGTERMs a moment apart are one stop (a checkpoint at the step), while a second stop later stops at once."""
    from directpred.cli import train as train_cli

    if gap == "second_stop":
        monkeypatch.setattr(train_cli, "SAME_STOP_SECONDS", 0.0)
    real_step = Trainer.train_step

    def step_then_signals(self, images):
        res = real_step(self, images)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return res

    monkeypatch.setattr(Trainer, "train_step", step_then_signals)
    args = ["train", str(tmp_path / "empty.yaml"), "--out", str(tmp_path / "run")]
    for o in tiny_overrides + ["train.epochs=1"]:
        args += ["--set", o]
    (tmp_path / "empty.yaml").write_text("{}\n")
    if gap == "same_stop":
        assert main(args) == 128 + signal.SIGTERM
        assert "Stopped by SIGTERM at step 2" in capsys.readouterr().err
        assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["step"] == 2
    else:  # one line, not a traceback; nothing saved by this stop
        assert main(args) == 130
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "directpred train: interrupted; what it was doing is lost (a training run resumes from its last "
            "checkpoint: directpred train --resume RUN_DIR)"
        )
        assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_stop_in_the_final_evaluation_stops_it_at_once_and_a_resume_evaluates(
    tiny_overrides, tmp_path, monkeypatch, capsys
):
    """The training is over and its checkpoint written when the final evaluation (minutes of linear probe at scale)
    starts: a SIGTERM there stops it at once with the resume hint (it waited for the evaluation to end, and a second
    signal gave a traceback); the resume trains nothing and evaluates, logging one final row in all."""
    import time

    from directpred.train.logger import read_metrics

    real_evaluate = loop_module.evaluate

    def stopped_evaluation(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)  # the handler raises out of here
        raise AssertionError("the evaluation was not stopped")

    monkeypatch.setattr(loop_module, "evaluate", stopped_evaluation)
    run = tmp_path / "run"
    (tmp_path / "empty.yaml").write_text("{}\n")
    args = ["train", str(tmp_path / "empty.yaml"), "--out", str(run)]
    for o in tiny_overrides + ["train.epochs=1"]:
        args += ["--set", o]
    assert main(args) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert (
        f"Stopped by SIGTERM at step 8 (training done, in the final evaluation); checkpoint written to "
        f"{run / 'checkpoints' / 'last.pt'}.\nResume with: directpred train --resume {run} (it evaluates the trained "
        "model)"
    ) in err
    assert not (run / "summary.json").exists() and load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 8
    monkeypatch.setattr(loop_module, "evaluate", real_evaluate)
    assert main(["train", "--resume", str(run)]) == 0
    kinds = [r["kind"] for r in read_metrics(run)]
    assert kinds.count("final") == 1 and kinds.count("diag_final") == 1
    assert max(r["step"] for r in read_metrics(run)) == 8
