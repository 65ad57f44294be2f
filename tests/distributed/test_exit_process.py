"""distributed.exit_process: the exit code is kept and Python's exit handlers (logging, trackers) still run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_exit_process_keeps_the_code_and_runs_exit_handlers():
    code = (
        "import atexit, sys\n"
        "from directpred import distributed\n"
        "atexit.register(lambda: print('handler ran', flush=True))\n"
        "print('before', end='')\n"  # unflushed output must not be lost
        "distributed.exit_process(3)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3
    assert proc.stdout == "beforehandler ran\n"


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its new parent, counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("killed", ["after the request", "during the imports before it"])
def test_a_torchrun_worker_dies_with_its_launcher_killed_outright(killed, tmp_path):
    """torchrun starts its workers in sessions of their own: a launcher killed with SIGKILL left them running as
    orphans (holding the GPU and the run's lock). A worker that called die_with_launcher is killed with it, and
    lives on while the launcher does; one whose launcher died in the seconds of imports before the call (its parent
    already init) kills itself at the call."""
    import os
    import signal
    import time

    pid_file, go = tmp_path / "worker.pid", tmp_path / "go"
    script = tmp_path / "worker.py"
    late = killed != "after the request"
    script.write_text(
        "import os, time\n"
        "import directpred\n"  # what `-m directpred` imports first: it notes the launcher
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        + (f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\n" if late else "")
        + "from directpred import distributed\n"
        "assert distributed.die_with_launcher()\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(script)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (pid_file.is_file() and pid_file.read_text()) and time.time() < deadline:
            assert launcher.poll() is None, "torchrun ended before its worker started"
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        time.sleep(1.0)
        assert _alive(worker)  # the launcher lives: so does its worker
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=30)
        go.write_text("")
        deadline = time.time() + 30
        while _alive(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(worker)
    finally:
        launcher.kill()
        if pid_file.is_file() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
