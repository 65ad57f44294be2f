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
