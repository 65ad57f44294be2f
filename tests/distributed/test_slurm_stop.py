"""A stop as Slurm delivers it (``scancel``, a time limit, preemption): SIGTERM to every process of the job step at
once, by pid: torchrun, its ranks and their DataLoader workers. torchrun passes its own SIGTERM on to the ranks as
well. The ranks must still stop after a step, together, with a checkpoint, and the run must resume from it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_mixed_folder
from test_ddp import REPO, as_args, torchrun

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the processes in Linux /proc")


def _tree(pid: int) -> dict[int, int]:
    """``{child pid: parent pid}`` of every process under ``pid``."""
    found: dict[int, int] = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return found
    for task in tasks:
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue
        for child in map(int, children):
            found[child] = pid
            found.update(_tree(child))
    return found


@pytest.mark.slow
def test_slurm_style_sigterm_to_every_process_stops_after_a_step_and_resumes(tiny_overrides, tmp_path):
    data = write_mixed_folder(tmp_path / "data", n_per_class=10, classes=3)
    run = tmp_path / "run"
    over = tiny_overrides + [
        f"data.path={data}",
        "data.image_size=24",
        "data.augment=imagenet",
        "data.stream=true",
        "data.workers=1",
        "train.batch_size=4",
        "train.epochs=400",  # far longer than the test waits
        "train.checkpoint_every_steps=1000000",  # the only mid-run checkpoint is the stop's
        "eval.knn_k=5",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "directpred"]
    proc = subprocess.Popen(
        [*cmd, "train", "configs/cpu/quickstart.yaml", "--out", str(run), *as_args(over)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        # Wait until both ranks train and each has its DataLoader worker (a grandchild of torchrun's child).
        deadline = time.time() + 120
        while time.time() < deadline:
            tree = _tree(proc.pid)
            ranks = [p for p, parent in tree.items() if parent == proc.pid]
            workers = [p for p, parent in tree.items() if parent in ranks]
            if len(ranks) == 2 and len(workers) >= 2 and (run / "metrics.jsonl").is_file():
                break
            time.sleep(0.05)
        else:
            pytest.fail("the two ranks and their DataLoader workers did not start")
        for pid in [proc.pid, *tree]:  # as Slurm does: every process, by pid, at once
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "is killed by signal" not in err, err[-3000:]
    stopped = [line for line in err.splitlines() if "Stopped by SIGTERM at step " in line]
    assert stopped, err[-3000:]
    step = int(stopped[0].split("Stopped by SIGTERM at step ")[1].split(";")[0])
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == step > 0 and state["world_size"] == 2
    # The run goes on from that checkpoint (two more steps) and finishes.
    torchrun(["--resume", str(run), "--set", f"train.max_steps={step + 2}"], cwd=REPO)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == step + 2
