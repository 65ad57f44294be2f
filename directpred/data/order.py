"""Data order of a run: which images a step sees, and the random generator of its augmentation draws.

Both are pure functions of the run's seed and the epoch or global step, the same on every rank; this is what makes a
resumed run (and one with N processes) see exactly the batches and views of an uninterrupted single-process run.
"""

from __future__ import annotations

import torch


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of the training set in ``epoch`` (the same on every rank)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of the augmentation draws of global ``step``."""
    return torch.Generator().manual_seed((seed * 2_654_435_761 + 7919 * (step + 1)) % (2**63 - 1))
