"""Frozen features under two gloo processes when a split holds fewer images than processes (a rank embeds none):
every rank returns all rows, equal to one process's features, in memory and streamed (the gathers of
:func:`directpred.eval.stream_eval.evaluate_stream`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import write_folder

from directpred.data.augment import recipe
from directpred.data.stream import FolderReader
from directpred.eval.features import extract_features
from directpred.eval.stream_eval import _gather, stream_features

WORLD = 2
SIZES = (1, 3)  # one image: rank 1 embeds none; three: unequal shares


def _backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(1), torch.nn.LazyLinear(5)
    )


def _images(n: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))


def _streamed(net: torch.nn.Module, folder: str) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(stream_features(net, FolderReader(folder, "test"), recipe("cifar", 8)[1], decode_size=8))
    return _gather(torch.cat([f for f, _ in batches])), _gather(torch.cat([y for _, y in batches]))


def _worker(rank: int, store: str, out: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        net = _backbone()
        net(torch.zeros(2, 3, 8, 8))  # materialise the lazy layer (same seed: same weights on every rank)
        for n in SIZES:
            feats = extract_features(net, _images(n), recipe("cifar", 8)[1], batch_size=4)
            torch.save(feats, f"{out}.{n}.{rank}")
        torch.save(_streamed(net, folder), f"{out}.stream.{rank}")
    finally:
        dist.destroy_process_group()


def test_fewer_images_than_processes_gathers_every_row(tmp_path: Path) -> None:
    out = str(tmp_path / "feats")
    folder = str(write_folder(tmp_path / "data", n_train=2, n_test=1, n_classes=1, size=8))  # one test image
    procs = mp.spawn(_worker, args=(str(tmp_path / "store"), out, folder), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 120
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:  # mismatched shapes in the gather hang gloo rather than fail
            for proc in procs.processes:
                proc.kill()
            pytest.fail("the processes did not finish: the feature gather hung")
    net = _backbone()
    net(torch.zeros(2, 3, 8, 8))
    for n in SIZES:
        single = extract_features(net, _images(n), recipe("cifar", 8)[1], batch_size=4)
        assert single.shape == (n, 5)
        for rank in range(WORLD):
            torch.testing.assert_close(torch.load(f"{out}.{n}.{rank}"), single, rtol=1e-5, atol=1e-6)
    feats, labels = _streamed(net, folder)
    assert feats.shape == (1, 5) and labels.tolist() == [0]
    for rank in range(WORLD):
        got_feats, got_labels = torch.load(f"{out}.stream.{rank}")
        torch.testing.assert_close(got_feats, feats, rtol=1e-5, atol=1e-6)
        assert got_labels.tolist() == [0]
