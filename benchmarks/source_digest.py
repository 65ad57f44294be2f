"""A digest of the code a benchmark ran: SHA-256 over the paths and bytes of every file under ``directpred/``,
``benchmarks/`` (its ``results/`` excepted), ``configs/`` and ``sweeps/``, in sorted order.

A device machine's copy of the working tree may carry git metadata older than its files (a GPU session recorded
``b45403f+dirty`` for the files of ``89d8432``), so ``git rev-parse HEAD`` there does not identify the code. Run this
there and on a clean checkout of a commit here: equal digests mean the same code.

Usage (repository root):  python benchmarks/source_digest.py
"""

from __future__ import annotations

import hashlib
from pathlib import Path

ROOTS = ("directpred", "benchmarks", "configs", "sweeps")


def source_digest(repo: Path = Path(".")) -> str:
    """The SHA-256 hex digest of the code under ``repo`` (see the module docstring)."""
    h = hashlib.sha256()
    files = sorted(
        p.relative_to(repo)
        for root in ROOTS
        for p in (repo / root).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.relative_to(repo).parts[:2] != ("benchmarks", "results")
    )
    for f in files:
        h.update(f.as_posix().encode() + b"\0" + (repo / f).read_bytes() + b"\0")
    return h.hexdigest()


if __name__ == "__main__":
    print(source_digest())
