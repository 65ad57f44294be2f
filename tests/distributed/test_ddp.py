"""Two gloo processes (torchrun) train exactly what one process computes on the same global batch.

CPU has no SyncBatchNorm, so under DDP each rank normalises its own half batch and rank 0's BatchNorm running
statistics are the ones broadcast and saved. The single-process reference below emulates exactly that (per-half
forward passes, gradients averaged over the halves, rank 0's running statistics), while the DirectPred correlation
F^ is computed once from all samples, as the all-reduce in every rank does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from directpred.backbones import resolve_channels_last
from directpred.config import load_config
from directpred.data.augment import TwoViewAugment
from directpred.data.datasets import load_data
from directpred.data.order import epoch_order, step_generator
from directpred.data.views import view_recipes
from directpred.losses import two_view_loss
from directpred.methods import build_method, ema_momentum
from directpred.train.optim import build_optimizer, lr_factor, set_lr

REPO = Path(__file__).resolve().parents[2]
WORLD = 2


def torchrun(args: list[str], cwd: Path, nproc: int = WORLD, command: str = "train") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "directpred",
        command,
        *args,
    ]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def as_args(overrides: list[str]) -> list[str]:
    out: list[str] = []
    for o in overrides:
        out += ["--set", o]
    return out


def reference(cfg, steps: int, world: int = WORLD):
    """Single-process emulation of ``world`` DDP ranks on the same global batches."""
    torch.manual_seed(cfg.train.seed)
    data = load_data(cfg.data, seed=cfg.train.seed)
    aug = TwoViewAugment(*view_recipes(cfg, data))
    method = build_method(cfg)
    fmt = (
        torch.channels_last
        if resolve_channels_last(cfg.train.channels_last, method, torch.device("cpu"))
        else torch.contiguous_format
    )  # what the trainer chooses (the guard of issue 9)
    method = method.to(memory_format=fmt)
    method.train()
    enc, pred, target = method.online.encoder, method.online.predictor, method.target
    opt = build_optimizer(cfg.optim, enc, pred)
    B = cfg.train.batch_size
    gb = B * world
    spe = len(data.pretrain) // gb
    total = spe * cfg.train.epochs
    after_step = cfg.predictor.update_at == "after_step"
    for step in range(steps):
        epoch, s = divmod(step, spe)
        idx = epoch_order(len(data.pretrain), cfg.train.seed, epoch)[s * gb : (s + 1) * gb]
        x1, x2 = aug(data.pretrain.images[idx], step_generator(cfg.train.seed, step))
        x1, x2 = (x.contiguous(memory_format=fmt) for x in (x1, x2))
        set_lr(opt, cfg.optim.lr, lr_factor(step, total, 0, cfg.optim.schedule))
        zs, snapshot = [], None
        for k in range(world):
            sl = slice(k * B, (k + 1) * B)
            zs.append((enc(x1[sl]), enc(x2[sl])))
            if k == 0:
                snapshot = [b.clone() for b in enc.buffers()]
        if not after_step:
            with torch.no_grad():
                pred.update(torch.cat([torch.cat(z) for z in zs]).detach())
        losses = []
        for k, (z1, z2) in enumerate(zs):
            sl = slice(k * B, (k + 1) * B)
            if target is None:
                t1, t2 = z1, z2
            else:
                with torch.no_grad():
                    t1, t2 = target(x1[sl]), target(x2[sl])
            losses.append(two_view_loss(pred(z1), pred(z2), t1, t2))
        opt.zero_grad()
        (sum(losses) / world).backward()  # DDP averages the ranks' gradients
        with torch.no_grad():
            for b, saved in zip(enc.buffers(), snapshot):  # rank 0's running statistics win the broadcast
                b.copy_(saved)
        opt.step()
        if after_step:  # the authors' order: F^ (all samples) and W_p after the optimiser step
            with torch.no_grad():
                pred.update(torch.cat([torch.cat(z) for z in zs]).detach())
        method.update_target(ema_momentum(step, total, cfg.method.ema, cfg.method.ema_schedule))
    return method


@pytest.mark.parametrize(
    "predictor,method_name,update_at",
    [("directpred", "byol", "forward"), ("directpred", "byol", "after_step"), ("linear", "simsiam", "forward")],
)
def test_two_processes_equal_one_process_on_the_global_batch(
    predictor, method_name, update_at, tiny_overrides, tmp_path
):
    # Two steps cover the all-reduces, momentum, the EMA target and the predictor state carried between steps.
    # Longer comparisons are not meaningful at this size: the width-4 network with BatchNorm over 8 samples
    # amplifies float rounding (different summation order in the all-reduce) ~1000x in a single step, by an amount
    # that depends on the CPU's kernels; hence a tolerance relative to each tensor's change (below).
    steps = 2
    over = tiny_overrides + [
        f"predictor.name={predictor}",
        f"method.name={method_name}",
        "train.batch_size=8",
        f"train.max_steps={steps}",
        "train.epochs=2",
        f"predictor.update_at={update_at}",
    ]
    torchrun(["configs/cpu/quickstart.yaml", "--out", str(tmp_path / "ddp"), *as_args(over)], cwd=REPO)
    got = torch.load(tmp_path / "ddp" / "checkpoints" / "last.pt", weights_only=True)
    assert got["world_size"] == WORLD and got["step"] == steps
    cfg = load_config(REPO / "configs" / "cpu" / "quickstart.yaml", over)
    ref = reference(cfg, steps).state_dict()
    model = got["model"]
    assert model.keys() == ref.keys()
    torch.manual_seed(cfg.train.seed)
    init = build_method(cfg).state_dict()
    for k, v in ref.items():
        if v.is_floating_point():
            # The two runs differ only in summation order, which BatchNorm over 8 samples of a width-4 network
            # amplifies (a channel with near-zero batch variance divides by sqrt(eps)). Measured, as a fraction of
            # each tensor's change over the two steps: 0.25 % (AVX-512) and 1.05 % (AVX2). A real fault (gradients
            # summed instead of averaged, a wrong shard, a missing all-reduce) is of the order of the change itself.
            change = (v - init[k]).abs().max().item()
            err = (model[k] - v).abs().max().item()
            assert err <= 0.05 * change + 1e-6, f"{k}: |DDP - single process| = {err:.3g}, change {change:.3g}"
        else:
            assert torch.equal(model[k], v), k
    if predictor == "directpred":  # every rank set W_p from the same all-reduced F^
        assert int(model["online.predictor.count"]) == steps
        torch.testing.assert_close(model["online.predictor.corr"], ref["online.predictor.corr"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_process_run_resumes_and_gathers_features(tiny_overrides, tmp_path):
    over = tiny_overrides + ["train.batch_size=8", "train.epochs=2", "train.checkpoint_every_steps=2"]
    # The online probe's counts of a logging window (4 steps) that the stop at step 5 cuts: summed over both ranks.
    over += ["eval.online_probe=true", "train.log_every=4"]
    # What each process prints and logs: k above the training set draws a warning in every process's evaluation.
    over += ["diag.every=4", "eval.knn_k=1000"]
    cfg_path = "configs/cpu/quickstart.yaml"
    full_run = torchrun([cfg_path, "--out", str(tmp_path / "full"), *as_args(over)], cwd=REPO)
    assert full_run.stderr.count("kNN: k=1000 is more than the") == 1, full_run.stderr  # process 0's, not both
    command = (tmp_path / "full" / "command.txt").read_text()
    assert command.startswith("torchrun --standalone --nproc_per_node=2 -m directpred train "), command
    torchrun([cfg_path, "--out", str(tmp_path / "part"), *as_args(over + ["train.max_steps=5"])], cwd=REPO)
    torchrun(["--resume", str(tmp_path / "part"), "--set", "train.max_steps=0"], cwd=REPO)
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 16
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), f"{k} differs after a 2-process resume"
    from directpred.train.logger import read_metrics

    def probe_rows(run: str) -> dict[int, float]:
        rows = read_metrics(tmp_path / run)
        return {r["step"]: r["probe_train_top1"] for r in rows if r["kind"] == "probe" and "probe_train_top1" in r}

    full, part = probe_rows("full"), probe_rows("part")
    # The logged loss is the global batch's, the mean over the processes (it was process 0's alone, while the diag
    # row's loss_per_term was averaged: loss / loss_per_term came out 2.17 for the symmetric loss's 2 terms).
    rows = read_metrics(tmp_path / "full")
    train_loss = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
    diag = [r for r in rows if r["kind"] == "diag"]
    assert [r["step"] for r in diag] == [4, 8, 12, 16]
    for r in diag:
        assert r["loss"] == pytest.approx(2 * r["loss_per_term"], rel=1e-5)
        assert r["loss"] == pytest.approx(train_loss[r["step"]], rel=1e-5)
    assert sorted(full) == [4, 8, 12, 16] and sorted(part) == [4, 5, 8, 12, 16]
    assert {s: part[s] for s in full} == pytest.approx(full, abs=1e-9)
    # kNN features were gathered from both ranks: the run's figure equals a single-process evaluation.
    summary = json.loads((tmp_path / "full" / "summary.json").read_text())
    from directpred.cli import main

    assert main(["eval", str(tmp_path / "full"), "--no-linear"]) == 0
    single = json.loads((tmp_path / "full" / "eval.json").read_text())
    assert single["knn_top1"] == pytest.approx(summary["knn_top1"], abs=1e-6)


@pytest.mark.slow
def test_a_run_directory_locked_by_another_process_stops_every_rank_at_once(tiny_overrides, tmp_path):
    """Only process 0 takes the run directory's lock. Refused, it exited while process 1 waited for it in the process
    group's rendezvous, where no signal handler runs: torchrun's SIGTERM did nothing and its SIGKILL came 30 s later.
    Now the group is joined first and every process stops with process 0's reason."""
    import fcntl

    run = tmp_path / "busy"
    run.mkdir()
    fd = os.open(run, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another directpred process writing it
    try:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
        args = ["-m", "directpred", "train", "configs/cpu/quickstart.yaml", "--out", str(run), *as_args(tiny_overrides)]
        proc = subprocess.run([*cmd, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    finally:
        os.close(fd)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert out.count(f"directpred: config error: {run} is being written by another directpred process") == WORLD, out
    assert "SIGKILL" not in out and "forcefully exiting" not in out, out
