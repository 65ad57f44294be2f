"""train.precision=bf16 on the CPU: the step runs under autocast, the predictor's statistics stay float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from directpred.config import ConfigError, load_config
from directpred.data.order import epoch_order
from directpred.runtime import resolve_precision
from directpred.train import Trainer


def test_bf16_training_step_on_cpu(tiny_overrides, tmp_path):
    fp32 = Trainer(load_config(None, tiny_overrides + ["train.max_steps=2"]), tmp_path / "fp32").setup()
    bf16 = Trainer(
        load_config(None, tiny_overrides + ["train.max_steps=2", "train.precision=bf16"]), tmp_path / "bf16"
    ).setup()
    assert fp32.autocast_dtype is None and bf16.autocast_dtype == torch.bfloat16
    init = {k: v.clone() for k, v in bf16.method.online.encoder.state_dict().items()}
    order = epoch_order(len(fp32.data.pretrain), fp32.cfg.train.seed, 0)
    a, b = fp32.train_step(fp32._batch(order, 0)), bf16.train_step(bf16._batch(order, 0))
    assert a.out.z1.dtype == torch.float32 and b.out.z1.dtype == torch.bfloat16  # the forward ran under autocast
    assert float(b.loss) == pytest.approx(float(a.loss), rel=0.05)  # same initialisation and views
    pred = bf16.method.predictor  # F^ and W_p in float32 from the bf16 projections (first update: the batch term)
    assert pred.corr.dtype == pred.weight.dtype == torch.float32
    z = torch.cat([b.out.z1, b.out.z2]).float()
    torch.testing.assert_close(pred.corr, z.T @ z / len(z), rtol=1e-5, atol=1e-6)
    after = bf16.method.online.encoder.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(init[k], after[k]) for k in init if init[k].is_floating_point())  # it stepped
    assert bf16.scaler.is_enabled() is False  # GradScaler only for fp16


def test_fp16_on_cpu_is_refused(tiny_overrides, tmp_path):
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA device"):
        Trainer(load_config(None, tiny_overrides + ["train.precision=fp16"]), tmp_path / "r").setup()


@pytest.mark.parametrize(
    "amx,cap,expected",
    [
        (True, None, torch.bfloat16),
        (False, None, None),  # AVX512-BF16 without tiles: fp32 (bf16 measured slower there)
        (True, "AVX2", None),  # oneDNN capped below AMX cannot use the tiles
        (True, "avx512_core_bf16", None),
        (True, "AVX512_CORE_AMX", torch.bfloat16),
        (True, "ALL", torch.bfloat16),
    ],
)
def test_auto_precision_on_the_cpu_follows_amx_and_the_onednn_cap(monkeypatch, amx, cap, expected):
    monkeypatch.setattr(torch._C._cpu, "_init_amx", lambda: amx)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    if cap is not None:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    if cap is not None:  # oneDNN's older name caps it the same way
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
        monkeypatch.setenv("DNNL_MAX_CPU_ISA", cap)
        assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("fp32", torch.device("cpu")) is None  # explicit settings are taken as given
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


def test_hardware_names_the_code_path_the_process_runs():
    """A forced AVX2 code path (as on the AVX2-only machines) is what a run records, not the CPU's best."""
    code = (
        "import json, torch; from directpred.runtime import describe_hardware; "
        "print(json.dumps(describe_hardware(torch.device('cpu'))))"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    hw = json.loads(out.stdout)
    assert hw["cpu_capability"] == "AVX2" and hw["amx"] is False
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    models = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
    if models:  # Linux: the model name, read here independently
        assert hw["cpu"] == models[0]
