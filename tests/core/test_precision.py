"""train.precision=bf16 on the CPU: the step runs under autocast, the predictor's statistics stay float32."""

from __future__ import annotations

import pytest
import torch

from directpred.config import ConfigError, load_config
from directpred.data.order import epoch_order
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
