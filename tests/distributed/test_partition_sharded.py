"""Feature-dependent W_p (predictor.partitions) under two gloo processes with unequal shares of the batch: the
thresholds, every cell's F^ and W_p equal one process's on the whole batch (the threshold is the global batch's mean,
not the mean of the per-rank means)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp
from conftest import gloo_process

from directpred.heads.directpred import PartitionedDirectPred

SIZES = (13, 7)  # rows of each rank's share
KEYS = ("theta", "cell_corr", "cell_weight", "corr", "weight")


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(sum(SIZES), 6, generator=g) + torch.linspace(-1, 2, 6) for _ in range(3)]


def _worker(rank: int, store: str, out: str) -> None:
    with gloo_process(rank, len(SIZES), store):
        head = PartitionedDirectPred(6, partitions=3, rho=0.5, seed=1)
        lo = sum(SIZES[:rank])
        for z in _batches():
            head.update(z[lo : lo + SIZES[rank]])
        torch.save({k: getattr(head, k).detach().clone() for k in KEYS}, f"{out}.{rank}")


def test_partitions_under_unequal_shards_equal_one_process(tmp_path: Path) -> None:
    out = str(tmp_path / "state")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=len(SIZES), join=True)
    single = PartitionedDirectPred(6, partitions=3, rho=0.5, seed=1)
    for z in _batches():
        single.update(z)
    for rank in range(len(SIZES)):
        got = torch.load(f"{out}.{rank}")
        for k in KEYS:
            torch.testing.assert_close(got[k], getattr(single, k).detach(), rtol=1e-5, atol=1e-5, msg=k)
