"""Library messages go through Python logging (``directpred.*`` loggers); the command line shows them on stderr as
before (INFO and up; ``-q`` warnings only; ``-v`` debug too), once each."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest

from directpred.backbones import memory_format
from directpred.cli import configure_logging, main
from directpred.diagnostics import hook

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "cpu" / "quickstart.yaml"


@pytest.mark.parametrize(
    "verbosity,shown", [(-1, ["WARNING: w"]), (0, ["i", "WARNING: w"]), (1, ["d", "i", "WARNING: w"])]
)
def test_configured_levels_and_format(verbosity, shown, capsys):
    configure_logging(verbosity)
    configure_logging(verbosity)  # idempotent: one handler, each message once
    log = logging.getLogger("directpred.some.module")
    log.debug("d")
    log.info("i")
    log.warning("w")
    logging.getLogger("other.library").warning("not ours")  # other libraries' loggers are left alone
    assert capsys.readouterr().err.splitlines() == shown


def test_python_warnings_are_shown_as_log_records(capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        configure_logging(-1)
        warnings.warn("step 7: loss is nan; step skipped", RuntimeWarning, stacklevel=1)
    assert capsys.readouterr().err == "WARNING: RuntimeWarning: step 7: loss is nan; step skipped\n"


def test_collapse_warning_reaches_stderr_through_the_cli_handler(capsys):
    configure_logging(0)
    hook.log.warning("the run looks COLLAPSED at step %d: %s", 4, "evidence")
    assert capsys.readouterr().err == "WARNING: the run looks COLLAPSED at step 4: evidence\n"


@pytest.mark.parametrize("flag", [[], ["-q"]])
def test_train_command_shows_library_warnings_once(flag, tiny_overrides, tmp_path, capsys, monkeypatch):
    # backbone.width=4 on the CPU: the channels-last guard logs a warning (directpred.backbones.memory_format),
    # once per process, for the trained network (not again for the evaluated backbone, which has no backward pass).
    monkeypatch.setattr(memory_format, "_said", False)
    sets = [a for o in tiny_overrides + ["train.max_steps=1"] for a in ("--set", o)]
    assert main([*flag, "train", str(QUICKSTART), "--out", str(tmp_path / "run"), *sets]) == 0
    lines = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.startswith("WARNING: train.channels_last=auto: using the default memory format")
    ]
    assert len(lines) == 1 and "online.encoder.backbone.layer2" in lines[0]


def test_quiet_and_verbose_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        main(["-q", "-v", "train"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_a_process_other_than_0_shows_only_what_can_be_its_own(capsys):
    """Under torchrun every process ran the same config checks and data loading, and printed each of their notes and
    warnings once per process. Process 1 now shows errors and RuntimeWarnings (a corrupt image of its own shard, a
    step skipped for its own non-finite loss), prefixed with its rank; -v shows everything again."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            configure_logging(0, rank=1)
            log = logging.getLogger("directpred.some.module")
            log.info("a note")
            log.warning("a warning process 0 gives too")
            warnings.warn("predictor.rho=0.5 has no effect", UserWarning, stacklevel=1)
            warnings.warn("replaced 1 corrupt image(s)", RuntimeWarning, stacklevel=1)
            log.error("an error")
            assert capsys.readouterr().err.splitlines() == [
                "WARNING: process 1: RuntimeWarning: replaced 1 corrupt image(s)",
                "ERROR: an error",
            ]
            configure_logging(1, rank=1)
            log.info("a note")
            warnings.warn("predictor.rho=0.5 has no effect", UserWarning, stacklevel=1)
            assert capsys.readouterr().err.splitlines() == [
                "a note",
                "WARNING: UserWarning: predictor.rho=0.5 has no effect",
            ]
            configure_logging(0, rank=0)  # process 0 shows all
            warnings.warn("predictor.rho=0.5 has no effect", UserWarning, stacklevel=1)
            assert capsys.readouterr().err == "WARNING: UserWarning: predictor.rho=0.5 has no effect\n"
    finally:
        configure_logging(0)


@pytest.mark.parametrize(
    "command", [["export", "RUN", "--out", "b.pt"], ["plot", "RUN"], ["theory", "figures", "--out", "figs"]]
)
@pytest.mark.parametrize("rank", [0, 1])
def test_a_command_that_does_not_run_under_torchrun_is_refused_once(command, rank, monkeypatch, capsys):
    """export, embed, diagnose, plot, ... ran their whole job in every torchrun process (every line printed and every
    file written N times): refused, by process 0's one line, before any work."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    try:
        assert main(command) == 2
    finally:
        configure_logging(0)
    err = capsys.readouterr().err
    if rank:
        assert err == ""
    else:
        assert err.startswith(f"directpred: config error: `directpred {command[0]}` does not run under torchrun")
        assert "run it as a single process, without torchrun (only train and eval use several processes)" in err


@pytest.mark.parametrize("rank", [0, 1])
def test_a_process_stopped_by_another_says_so_in_one_line(rank, monkeypatch, capsys):
    """Process 1 repeated process 0's error at length ("process 0 could not load the data, so this process stops
    too: <the whole message>"), and a process whose peer had died printed a 50-line gloo traceback that buried the
    peer's one-line error. Both are one short line now; process 0's own error is printed as before."""
    from directpred import distributed
    from directpred.cli import train as train_cli
    from directpred.data.datasets import DataError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setattr(distributed, "is_main", lambda: rank == 0)
    monkeypatch.setattr(distributed, "broadcast_object", lambda obj: "x.tar.gz is neither a directory nor a tar")

    def failing_setup(args):
        def load():
            raise DataError("x.tar.gz is neither a directory nor a tar")

        distributed.on_main(load, "load the data", DataError)

    monkeypatch.setattr(train_cli, "run", failing_setup)
    try:
        assert main(["train", "c.yaml"]) == 1
        first = capsys.readouterr().err
        monkeypatch.setattr(
            train_cli,
            "run",
            lambda args: (_ for _ in ()).throw(
                RuntimeError(
                    "[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:1234"
                )
            ),
        )
        assert main(["train", "c.yaml"]) == 1
        second = capsys.readouterr().err
    finally:
        configure_logging(0)
    if rank:
        assert first == "directpred: process 1 stops too: process 0 could not load the data (process 0 prints why)\n"
    else:
        assert first == "directpred: error: x.tar.gz is neither a directory nor a tar\n"
    assert second == (
        f"directpred: process {rank} stops too: another process of the group failed or was stopped (it prints why) "
        "[RuntimeError: [../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [::1]:1234]\n"
    )


def test_command_txt_under_torchrun_is_the_torchrun_command():
    from directpred.cli.train import command_line

    argv = ["/site/directpred/__main__.py", "train", "c.yaml", "--set", "train.epochs=2"]
    assert command_line(argv, {}) == "python -m directpred train c.yaml --set train.epochs=2"
    one_machine = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}
    assert command_line(argv, one_machine) == (
        "torchrun --standalone --nproc_per_node=4 -m directpred train c.yaml --set train.epochs=2"
    )
    two_machines = {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8"}
    assert command_line(["/usr/bin/directpred", "train", "c.yaml"], two_machines) == (
        "torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:PORT --no-python "
        "/usr/bin/directpred train c.yaml"
    )
