"""Frozen features under two gloo processes when a split holds fewer images than processes (a rank embeds none) and
when the ranks hold unequal shares: every rank returns all rows, equal to one process's features in the same order,
in memory and streamed (the gathers of :func:`directpred.eval.stream_eval.evaluate_stream`)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import gloo_process, write_folder

from directpred.config import load_config
from directpred.data.augment import recipe
from directpred.data.stream import FolderReader, load_stream_data
from directpred.distributed import gather_strided, interleave_strided
from directpred.eval.features import extract_features
from directpred.eval.linear_probe import LinearProbe
from directpred.eval.stream_eval import evaluate_stream, stream_features

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
    return gather_strided(torch.cat([f for f, _ in batches])), gather_strided(torch.cat([y for _, y in batches]))


def _probe_inputs(net: torch.nn.Module, folder: str) -> tuple[torch.Tensor, ...]:
    """What evaluate_stream hands the authors' probe (x_train, y_train, x_test, y_test) on a streamed folder."""
    seen: list[tuple[torch.Tensor, ...]] = []
    fit = LinearProbe.fit

    def recording_fit(self: LinearProbe, *args: torch.Tensor) -> LinearProbe:
        seen.append(args)
        return fit(self, *args)

    over = ["data.dataset=folder", f"data.path={folder}", "data.stream=true", "data.image_size=8", "eval.knn_k=1"]
    cfg = load_config(None, [*over, "eval.linear_protocol=authors", "eval.linear_epochs=1"])
    LinearProbe.fit = recording_fit  # type: ignore[method-assign]
    try:
        evaluate_stream(net, load_stream_data(cfg.data), cfg, recipe("cifar", 8)[1], torch.device("cpu"))
    finally:
        LinearProbe.fit = fit  # type: ignore[method-assign]
    return seen[0]


def _worker(rank: int, store: str, out: str, folders: list[str]) -> None:
    with gloo_process(rank, WORLD, store):
        net = _backbone()
        net(torch.zeros(2, 3, 8, 8))  # materialise the lazy layer (same seed: same weights on every rank)
        for n in SIZES:
            feats = extract_features(net, _images(n), recipe("cifar", 8)[1], batch_size=4)
            torch.save(feats, f"{out}.{n}.{rank}")
        for i, folder in enumerate(folders):
            torch.save(_streamed(net, folder), f"{out}.stream{i}.{rank}")
        torch.save(_probe_inputs(net, folders[1]), f"{out}.probe.{rank}")


def test_fewer_images_than_processes_gathers_every_row(tmp_path: Path) -> None:
    out = str(tmp_path / "feats")
    one = str(write_folder(tmp_path / "one", n_train=2, n_test=1, n_classes=1, size=8))  # one test image
    three = str(write_folder(tmp_path / "three", n_train=1, n_test=1, n_classes=3, size=8))  # labels 0, 1, 2
    procs = mp.spawn(_worker, args=(str(tmp_path / "store"), out, [one, three]), nprocs=WORLD, join=False)
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
    for i, (folder, order) in enumerate(((one, [0]), (three, [0, 1, 2]))):
        feats, labels = _streamed(net, folder)  # one process: the data set's order
        assert feats.shape == (len(order), 5) and labels.tolist() == order
        for rank in range(WORLD):  # rank 0 streamed rows 0 and 2, rank 1 row 1: gathered back as 0, 1, 2
            got_feats, got_labels = torch.load(f"{out}.stream{i}.{rank}")
            torch.testing.assert_close(got_feats, feats, rtol=1e-5, atol=1e-6)
            assert got_labels.tolist() == order
    # The authors' probe on streamed data sees the rows in the single-process order (its seeded shuffle then draws the
    # same minibatches whatever the number of processes).
    single = _probe_inputs(net, three)
    assert single[1].tolist() == single[3].tolist() == [0, 1, 2]
    for rank in range(WORLD):
        got = torch.load(f"{out}.probe.{rank}")
        for a, b in zip(got, single):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_strided_rows_gathered_in_rank_blocks_come_back_in_data_set_order(world: int) -> None:
    """What gather_cat returns for rows sharded by stride (rank r: rows r, r+world, ...), with a fake world: the
    interleave restores 0..N-1 for every N, fewer rows than ranks included, for features (N, D) and labels (N,)."""
    for n in range(0, 3 * world + 2):
        rows = torch.arange(n)
        blocks = torch.cat([rows[r::world] for r in range(world)])
        assert interleave_strided(blocks, world).tolist() == rows.tolist()
        feats = torch.randn(n, 3, generator=torch.Generator().manual_seed(n))
        blocks = torch.cat([feats[r::world] for r in range(world)])
        assert torch.equal(interleave_strided(blocks, world), feats)
