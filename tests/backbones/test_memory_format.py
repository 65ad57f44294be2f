"""The channels-last guard (issue 9): oneDNN's CPU backward of narrow strided 1x1 convolutions is broken on AVX2.

The reduced case runs in a subprocess with the AVX2 code path forced (``ATEN_CPU_CAPABILITY=avx2``,
``ONEDNN_MAX_CPU_ISA=AVX2``), so a crash cannot take the test process with it and the test means the same on AVX2,
AVX-512 and AMX machines.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from directpred.backbones import resnet, resolve_channels_last, unsafe_channels_last_convs
from directpred.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}

REDUCED = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from directpred.backbones import resolve_channels_last
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 1, stride=2, bias=False)
    x = torch.randn(16, 4, 32, 32)
    ref = conv.double()
    xd = x.double().requires_grad_(True)
    ref(xd).sum().backward()
    g_ref = ref.weight.grad.clone()
    conv = conv.float()
    conv.weight.grad = None
    fmt = torch.channels_last if resolve_channels_last(sys.argv[1], conv, torch.device("cpu")) \\
        else torch.contiguous_format
    conv = conv.to(memory_format=fmt)
    xin = x.contiguous(memory_format=fmt).requires_grad_(True)
    conv(xin).sum().backward()
    err = (conv.weight.grad.double() - g_ref).abs().max().item()
    print(f"format={'channels_last' if fmt is torch.channels_last else 'contiguous'} max_err={err:.2e}")
    sys.exit(0 if err < 1e-3 else 3)
""")


def run_reduced(setting: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **AVX2, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", REDUCED, setting], env=env, capture_output=True, text=True, timeout=120
    )


def test_reduced_case_runs_through_the_guard_on_avx2():
    """The issue's crashing convolution, under ``auto``, takes the default format and gets correct gradients."""
    proc = run_reduced("auto")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "format=contiguous" in proc.stdout
    assert "default memory format" in proc.stderr  # said once in the log


def test_true_on_the_reduced_case_is_refused_with_the_reason():
    conv = nn.Conv2d(4, 8, 1, stride=2, bias=False)
    with pytest.raises(ConfigError, match=r"channels_last=true is refused.*4 < 8 input channels.*oneDNN"):
        resolve_channels_last(True, conv, torch.device("cpu"))


@pytest.mark.parametrize(
    "conv, unsafe",
    [
        (nn.Conv2d(4, 8, 1, stride=2), True),
        (nn.Conv2d(7, 8, 1, stride=(2, 1)), True),
        (nn.Conv2d(8, 16, 1, stride=2), False),  # wide enough
        (nn.Conv2d(4, 8, 1, stride=1), False),  # not strided
        (nn.Conv2d(4, 8, 3, stride=2), False),  # not 1x1
    ],
)
def test_which_convolutions_are_unsafe(conv, unsafe):
    assert bool(unsafe_channels_last_convs(nn.Sequential(conv))) is unsafe
    assert resolve_channels_last("auto", conv, torch.device("cpu")) is not unsafe


@pytest.mark.parametrize("width, expected", [(4, False), (6, False), (8, True), (16, True)])
def test_auto_by_resnet_width(width, expected):
    """The ResNet shortcut of layer2 has ``width`` input channels: narrow CPU networks drop channels-last."""
    net = resnet("resnet18", width=width, cifar_stem=True)
    assert resolve_channels_last("auto", net, torch.device("cpu")) is expected
    assert resolve_channels_last(False, net, torch.device("cpu")) is False
    assert resolve_channels_last("auto", net, torch.device("cuda")) is True  # the bug is oneDNN's, CPU only


def test_config_accepts_auto_true_false_only():
    assert load_config(None, []).train.channels_last == "auto"
    assert load_config(None, ["train.channels_last=true"]).train.channels_last is True
    assert load_config(None, ["train.channels_last=false"]).train.channels_last is False
    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config(None, ["train.channels_last=maybe"])


def test_trainer_guard_and_refusal(tiny_overrides, tmp_path):
    """The Trainer of a width-4 network uses the default format under auto, and refuses true before any step."""
    from directpred.train.loop import Trainer

    cfg = load_config(None, tiny_overrides + ["train.max_steps=1"])
    trainer = Trainer(cfg, tmp_path / "auto").setup()
    assert trainer.channels_last is False
    conv1 = trainer.method.online.encoder.backbone.conv1.weight
    assert conv1.is_contiguous() and not conv1.is_contiguous(memory_format=torch.channels_last)
    cfg = load_config(None, tiny_overrides + ["train.channels_last=true"])
    with pytest.raises(ConfigError, match="refused"):
        Trainer(cfg, tmp_path / "true").setup()


def test_fallback_note_once_per_process_and_only_for_training(tiny_overrides, tmp_path, monkeypatch, capsys):
    """A width-4 run: `train` says it once (not again for the probe's backbone), `eval` takes the same decision
    without a word (no backward pass there), and the decision itself is unchanged."""
    from directpred.backbones import memory_format
    from directpred.cli import main

    note = "train.channels_last=auto: using the default memory format"
    monkeypatch.setattr(memory_format, "_said", False)  # a fresh process
    run = tmp_path / "run"
    command = ["train", "configs/cpu/quickstart.yaml", "--out", str(run)]
    for override in tiny_overrides + ["train.max_steps=1"]:
        command += ["--set", override]
    assert main(command) == 0
    assert capsys.readouterr().err.count(note) == 1
    monkeypatch.setattr(memory_format, "_said", False)
    assert main(["eval", str(run), "--no-linear"]) == 0
    assert capsys.readouterr().err.count(note) == 0
    net = resnet("resnet18", width=4, cifar_stem=True)
    assert resolve_channels_last("auto", net, torch.device("cpu"), training=False) is False
    assert resolve_channels_last("auto", net, torch.device("cpu")) is False
