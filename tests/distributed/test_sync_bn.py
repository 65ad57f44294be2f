"""``train.sync_bn``: every BatchNorm of the online branch AND of BYOL's target becomes a SyncBatchNorm; on CPU
processes the setting is refused with a message naming it (torch's SyncBatchNorm runs only on GPUs).

The target runs in train mode, so its BatchNorms normalise with batch statistics too; converting only the online
branch left the targets on per-process statistics while one process (and BYOL's cross-replica BN) uses the global
batch's.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from directpred import distributed
from directpred.config import ConfigError, load_config
from directpred.methods import build_method


def _norms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("method, has_target", [("byol", True), ("simsiam", False)])
def test_sync_bn_converts_online_and_target(tiny_overrides, method, has_target):
    from directpred.train.loop import convert_sync_batchnorm

    siamese = build_method(load_config(None, tiny_overrides + [f"method.name={method}"]))
    keys = list(siamese.state_dict())
    convert_sync_batchnorm(siamese)
    branches = {"online": siamese.online, **({"target": siamese.target} if has_target else {})}
    assert (siamese.target is not None) == has_target
    for name, module in branches.items():
        assert _norms(module) and all(isinstance(m, nn.SyncBatchNorm) for m in _norms(module)), name
    assert list(siamese.state_dict()) == keys  # checkpoints load as before
    if has_target:  # the EMA still pairs target and online buffers (copied) and parameters
        with torch.no_grad():
            for b in siamese.online.encoder.buffers():
                b.add_(1)
        siamese.update_target(0.5)
        for t, o in zip(siamese.target.buffers(), siamese.online.encoder.buffers()):
            assert torch.equal(t, o)


@pytest.fixture
def gloo_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_sync_bn_on_cpu_processes_is_refused_naming_the_key(gloo_group, tiny_overrides, tmp_path, monkeypatch):
    """Before: torch's 'SyncBatchNorm layers only work with GPU modules' from inside DDP's constructor."""
    from directpred.train.loop import Trainer

    monkeypatch.setattr(distributed, "world_size", lambda: 2)  # the multi-process branch, in one process
    cfg = load_config(None, tiny_overrides + ["train.max_steps=1", "train.sync_bn=true"])
    with pytest.raises(ConfigError, match=r"^train.sync_bn=true needs CUDA devices .* set train.sync_bn=false"):
        Trainer(cfg, tmp_path / "run").setup()
