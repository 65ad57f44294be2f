"""distributed.exit_process: the exit code is kept and Python's exit handlers (logging, trackers) still run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
