"""Faults under two gloo processes: every process takes the same branch.

A NaN image on rank 1 only, under a GradScaler (enabled on the CPU, as fp16 runs it on CUDA): the step is skipped
on both ranks (the non-finite guard's answer is all-reduced), so the loss scale, the parameters, the EMA target,
F^ and ``skipped_steps`` stay equal, and with ``update_at=after_step`` the predictor's all-reduce is not entered by
one rank alone (which hung). A checkpoint rank 0 refuses to write (non-finite weights), a run directory it refuses
(it holds a run), data it cannot decode and a summary.json it cannot write (a full disk) stop every rank with the
reason, not rank 0 alone while the others wait in a barrier.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import gloo_process, tiny_override_list

from directpred import distributed
from directpred.config import load_config

REPO = Path(__file__).resolve().parents[2]
WORLD = 2
STEPS = 3
NAN_STEP = 1  # rank 1's first view holds a NaN image at this step


def _nan_step(out: str, overrides: list[str]) -> None:
    from directpred.train.loop import Trainer

    cfg = load_config(REPO / "configs/cpu/quickstart.yaml", overrides)
    trainer = Trainer(cfg, Path(out).parent / "run").setup()
    trainer.scaler = torch.amp.GradScaler("cpu", enabled=True)  # what fp16 uses on CUDA
    views = trainer.views

    def poisoned(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = views(images)
        if trainer.step == NAN_STEP and distributed.rank() == 1:
            x1 = x1.clone()
            x1[0] = float("nan")
        return x1, x2

    trainer.views = poisoned  # type: ignore[method-assign]
    batches = trainer.source.labelled_batches(0, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipped = [trainer.train_step(next(batches)[0]).skipped for _ in range(STEPS)]
    method = trainer.method
    state = {
        **{f"online.{k}": v for k, v in method.online.named_parameters()},
        **{f"target.{k}": v for k, v in (method.target.named_parameters() if method.target else [])},
        **{f"predictor.{k}": v for k, v in method.online.predictor.state_dict().items()},
    }
    torch.save(
        {
            "scale": trainer.scaler.get_scale(),
            "skipped_steps": trainer.skipped_steps,
            "step": trainer.step,
            "skipped": skipped,
            "state": {k: v.detach().clone() for k, v in state.items()},
            "warnings": [str(w.message) for w in caught if "step skipped" in str(w.message)],
        },
        f"{out}.{distributed.rank()}",
    )


NAN_CASES = [("linear", "forward"), ("directpred", "after_step")]


@pytest.mark.slow  # the first test of the file pays fault_runs: 16-19 s on the loaded 2-core machine
@pytest.mark.parametrize("predictor,update_at", NAN_CASES)
def test_nan_loss_on_one_rank_skips_the_step_on_every_rank(predictor, update_at, fault_runs):
    out = str(fault_runs / f"nan_{predictor}_{update_at}" / "result")
    ranks = [torch.load(f"{out}.{r}") for r in range(WORLD)]
    for r in ranks:
        # Skipped once, on both ranks; the scale neither halved (scaler.update on the skipping rank's peers) nor grew.
        assert (r["skipped_steps"], r["step"], r["skipped"]) == (1, STEPS, [False, True, False])
        assert r["scale"] == 2.0**16
    assert ranks[0]["state"].keys() == ranks[1]["state"].keys()
    differ = [k for k, v in ranks[0]["state"].items() if not torch.equal(v, ranks[1]["state"][k])]
    assert not differ, f"the ranks' weights diverged: {differ[:5]}"
    (own,), (other,) = ranks[1]["warnings"], ranks[0]["warnings"]
    assert own.startswith(f"step {NAN_STEP + 1}: non-finite loss (nan) on 1 of 2 processes; step skipped")
    assert other.startswith(f"step {NAN_STEP + 1}: non-finite loss on 1 of 2 processes (this one's was finite: ")


def _inf_save(out: str, overrides: list[str]) -> None:
    from directpred.train.checkpoint import CheckpointError
    from directpred.train.loop import Trainer

    cfg = load_config(REPO / "configs/cpu/quickstart.yaml", overrides)
    trainer = Trainer(cfg, Path(out).parent / "run").setup()
    trainer.save()  # a good checkpoint first: it is kept
    with torch.no_grad():
        next(trainer.method.online.parameters()).fill_(float("inf"))
    t0 = time.monotonic()
    try:
        trainer.save()
        result = "no error"
    except CheckpointError as exc:
        result = str(exc)
    torch.save({"error": result, "seconds": time.monotonic() - t0}, f"{out}.{distributed.rank()}")


def _refused_setup(out: str, overrides: list[str]) -> None:
    """Trainer.setup where rank 0 alone fails (its run directory check, or decoding the data first)."""
    from directpred.train.loop import Trainer

    cfg = load_config(REPO / "configs/cpu/quickstart.yaml", overrides)
    t0 = time.monotonic()
    try:
        Trainer(cfg, Path(out).parent / "run").setup()
        result = "no error"
    except Exception as exc:
        result = f"{type(exc).__name__}: {exc}"
    torch.save({"error": result, "seconds": time.monotonic() - t0}, f"{out}.{distributed.rank()}")


def _full_disk_summary(out: str, overrides: list[str]) -> None:
    """A run to its end whose summary.json rank 0 cannot write (a full disk)."""
    from directpred.train import loop

    def no_space(path, obj):
        raise OSError(28, "No space left on device", str(path))

    write = loop.atomic_write_json
    if distributed.rank() == 0:
        loop.atomic_write_json = no_space
    cfg = load_config(REPO / "configs/cpu/quickstart.yaml", [*overrides, "train.max_steps=1"])
    t0 = time.monotonic()
    try:
        loop.Trainer(cfg, Path(out).parent / "run").fit()
        result = "no error"
    except Exception as exc:
        result = f"{type(exc).__name__}: {exc}"
    finally:
        loop.atomic_write_json = write
    torch.save({"error": result, "seconds": time.monotonic() - t0}, f"{out}.{distributed.rank()}")


def _one_rank_stopped(out: str, overrides: list[str], when: str) -> None:
    """SIGTERM's stop reaching rank 1 alone (Slurm signals each rank by pid, a few ms apart): mid-epoch, or after
    the loop's last stop check (in the last epoch end). Each rank records how its fit ended."""
    import signal

    from directpred.train import Callback, TrainingInterrupted
    from directpred.train.loop import Trainer

    class StopRank1(Callback):
        def on_step_end(self, trainer, result):
            if when == "mid" and trainer.step == 2 and distributed.rank() == 1:
                trainer.request_stop(signal.SIGTERM)

        def on_epoch_end(self, trainer, epoch):
            if when == "late" and distributed.rank() == 1:
                trainer.request_stop(signal.SIGTERM)

    cfg = load_config(REPO / "configs/cpu/quickstart.yaml", [*overrides, "train.epochs=1"])
    try:
        Trainer(cfg, Path(out).parent / "run", callbacks=[StopRank1()]).fit()
        result = "finished"
    except TrainingInterrupted as exc:
        result = f"TrainingInterrupted({exc.signum}, {exc.step}): {exc}"
    except Exception as exc:
        result = f"{type(exc).__name__}: {exc}"
    torch.save({"error": result}, f"{out}.{distributed.rank()}")


SCENARIOS = {
    "nan": (_nan_step, "the step after the NaN"),
    "stop_mid": (lambda out, over: _one_rank_stopped(out, over, "mid"), "the stop rank 1 alone got mid-epoch"),
    "stop_late": (lambda out, over: _one_rank_stopped(out, over, "late"), "the stop rank 1 got in the last epoch end"),
    "setup": (_refused_setup, "the other rank's setup"),
    "summary": (_full_disk_summary, "the other rank's summary"),
    "inf": (_inf_save, "the other rank's save"),
}


def _faults_worker(rank: int, store: str, jobs: list[tuple[str, str, list[str]]]) -> None:
    """Every scenario in turn, in one gloo group of :data:`WORLD` processes; each writes ``{out}.{rank}``."""
    with gloo_process(rank, WORLD, store):
        for kind, out, overrides in jobs:
            SCENARIOS[kind][0](out, overrides)


@pytest.fixture(scope="module")
def fault_runs(tiny_folder, tmp_path_factory) -> Path:
    """The scenarios of this file, run one after the other by one launch of the two processes: each launch costs two
    interpreter start-ups, torch imports and data decodes (10-17 s on the 2-core machine), the scenarios under a
    second. The checkpoint rank 0 refuses comes last (it stops every rank with an error each catches)."""
    root = tmp_path_factory.mktemp("faults")
    common = tiny_override_list(tiny_folder, root / "cache")
    jobs = [
        (
            "nan",
            str(root / f"nan_{predictor}_{update_at}" / "result"),
            common
            + [
                "train.batch_size=8",
                "method.name=byol",
                f"predictor.name={predictor}",
                f"predictor.update_at={update_at}",
                "train.skip_nonfinite=3",
            ],
        )
        for predictor, update_at in NAN_CASES
    ]
    # rank 0 refuses the run directory (it holds a run), or cannot decode the data (not an archive)
    (root / "rundir" / "run" / "checkpoints").mkdir(parents=True)
    (root / "rundir" / "run" / "checkpoints" / "last.pt").write_bytes(b"")
    (root / "bad.tar.gz").write_bytes(b"\x1f\x8b not a gzip stream")
    jobs.append(("setup", str(root / "rundir" / "result"), common))
    jobs.append(("setup", str(root / "data" / "result"), [*common, f"data.path={root / 'bad.tar.gz'}"]))
    jobs.append(("summary", str(root / "summary" / "result"), common))
    jobs.append(("stop_mid", str(root / "stop_mid" / "result"), common))
    jobs.append(("stop_late", str(root / "stop_late" / "result"), common))
    jobs.append(("inf", str(root / "inf" / "result"), common))
    procs = mp.spawn(_faults_worker, args=(str(root / "store"), jobs), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 150 * len(jobs)
    while not procs.join(timeout=1):
        if time.monotonic() > deadline:  # a collective entered by one rank alone hangs gloo rather than fails
            for proc in procs.processes:
                proc.kill()
            kind, out, _ = next(j for j in jobs if not all(Path(f"{j[1]}.{r}").is_file() for r in range(WORLD)))
            pytest.fail(f"the processes did not finish: {SCENARIOS[kind][1]} ({Path(out).parent.name}) hung")
    return root


@pytest.mark.slow  # fault_runs: 16-19 s on the loaded 2-core machine, once for the file
def test_a_checkpoint_rank_0_refuses_stops_every_rank(fault_runs):
    out = str(fault_runs / "inf" / "result")
    tmp_path = fault_runs / "inf"
    (mine, seconds0), (theirs, seconds1) = (
        (r["error"], r["seconds"]) for r in (torch.load(f"{out}.{k}") for k in (0, 1))
    )
    refused = "refusing to write a checkpoint holding NaN/inf in 'model.online.encoder.backbone.conv1.weight'"
    assert mine.startswith(refused)
    assert theirs == f"process 0 could not write the checkpoint, so this process stops too: {mine}"
    assert max(seconds0, seconds1) < 30  # not the 30-minute barrier timeout
    assert torch.load(tmp_path / "run/checkpoints/last.pt", weights_only=True)["step"] == 0  # the good one is kept


@pytest.mark.slow  # fault_runs: once for the file
@pytest.mark.parametrize(
    "case,refused,what",
    [
        (
            "rundir",
            "TrainingError: {root}/rundir/run already holds a run; continue it with",
            "prepare the run directory",
        ),
        ("data", "DataError: {root}/bad.tar.gz is neither a directory nor a tar archive", "load the data"),
    ],
)
def test_a_setup_rank_0_fails_stops_every_rank_with_its_reason(fault_runs, case, refused, what):
    """Before: the other processes waited in a barrier (30 minutes, or until a launcher killed them) for rank 0."""
    out = str(fault_runs / case / "result")
    (mine, seconds0), (theirs, seconds1) = (
        (r["error"], r["seconds"]) for r in (torch.load(f"{out}.{k}") for k in (0, 1))
    )
    assert mine.startswith(refused.format(root=fault_runs)), mine
    kind = mine.split(":")[0]
    other = "TrainingError" if case == "rundir" else "DataError"
    assert theirs == f"{other}: process 0 could not {what}, so this process stops too: {mine[len(kind) + 2 :]}"
    assert max(seconds0, seconds1) < 30


@pytest.mark.slow  # fault_runs: once for the file
def test_a_summary_rank_0_cannot_write_stops_every_rank_with_its_reason(fault_runs):
    out = str(fault_runs / "summary" / "result")
    (mine, seconds0), (theirs, seconds1) = (
        (r["error"], r["seconds"]) for r in (torch.load(f"{out}.{k}") for k in (0, 1))
    )
    assert mine.startswith("OSError: [Errno 28] No space left on device: "), mine
    assert theirs == f"TrainingError: process 0 could not write summary.json, so this process stops too: {mine[9:]}"
    assert max(seconds0, seconds1) < 60


@pytest.mark.slow  # fault_runs: once for the file
@pytest.mark.parametrize("when,step", [("mid", 2), ("late", 4)])
def test_a_stop_one_rank_got_stops_every_rank_under_its_signal(fault_runs, when, step):
    """Mid-epoch, the other rank stopped too but as "Stopped by stop" (exit 1, not 143): the stop was agreed, its
    signal not. After the loop's last check (the last epoch end), the stopped rank raised alone and rank 0 went on
    into the final evaluation's collectives and died there (gloo: connection closed by peer)."""
    out = str(fault_runs / f"stop_{when}" / "result")
    results = [torch.load(f"{out}.{k}")["error"] for k in (0, 1)]
    for r in results:  # 128 images, batch 32: 4 steps in the epoch
        assert r.startswith(f"TrainingInterrupted(15, {step}): Stopped by SIGTERM at step {step}"), r
    assert ("(training done, in the final evaluation)" in results[0]) == (when == "late")
