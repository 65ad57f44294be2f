"""The online probe under two gloo processes whose shares of the batch hold different numbers of labelled images
(STL-10's unlabelled images are mixed in): its weights and logged counts equal one process's on the whole batch."""

from __future__ import annotations

import types
from pathlib import Path

import torch
import torch.multiprocessing as mp
from conftest import gloo_process

from directpred.train.callbacks import OnlineProbeCallback, StepResult

B, D, CLASSES, STEPS = 12, 5, 3, 4
SPLIT = 8  # rank 0 takes rows 0..7, rank 1 rows 8..11


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS):
        h = torch.randn(B, D, generator=g)
        y = torch.randint(0, CLASSES, (B,), generator=g)
        y[:5] = -1  # rank 0's share has 3 labelled images, rank 1's 4
        out.append((h, y))
    return out


def _run(rows: slice, world: int) -> tuple[dict, list]:
    rows_logged: list = []
    trainer = types.SimpleNamespace(
        world=world,
        step=0,
        last_step=STEPS,
        epoch=0,
        device=torch.device("cpu"),
        data=types.SimpleNamespace(num_classes=CLASSES),
        cfg=types.SimpleNamespace(
            eval=types.SimpleNamespace(online_probe=True, online_probe_lr=0.5), train=types.SimpleNamespace(log_every=2)
        ),
        logger=types.SimpleNamespace(log=lambda row, group: rows_logged.append(row)),
    )
    cb = OnlineProbeCallback()
    cb.on_fit_start(trainer)
    for h, y in _batches():
        trainer.step += 1
        out = types.SimpleNamespace(h1=h[rows])
        cb.on_step_end(trainer, StepResult(torch.tensor(0.0), 0.1, 0.99, out, labels=y[rows]))
    assert cb.probe is not None
    return {k: v.detach().clone() for k, v in cb.probe.state_dict().items()}, rows_logged


def _worker(rank: int, store: str, out: str) -> None:
    with gloo_process(rank, 2, store):
        torch.save(_run(slice(0, SPLIT) if rank == 0 else slice(SPLIT, B), 2), f"{out}.{rank}")


def test_probe_under_unequal_labelled_shares_equals_one_process(tmp_path: Path) -> None:
    out = str(tmp_path / "probe")
    mp.spawn(_worker, args=(str(tmp_path / "store"), out), nprocs=2, join=True)
    weights, rows = _run(slice(0, B), 1)
    assert [r["step"] for r in rows] == [2, 4]
    for rank in range(2):
        got_weights, got_rows = torch.load(f"{out}.{rank}")
        for k in weights:
            torch.testing.assert_close(got_weights[k], weights[k], rtol=1e-5, atol=1e-6, msg=k)
        for got, want in zip(got_rows, rows, strict=True):
            assert got["step"] == want["step"] and got["probe_train_top1"] == want["probe_train_top1"]
            assert abs(got["probe_loss"] - want["probe_loss"]) < 1e-6
