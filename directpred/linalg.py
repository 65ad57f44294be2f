"""Matrix helpers shared by the heads, the diagnostics and the theory; for torch tensors and numpy arrays alike.

No imports: the numpy-only theory toolkit uses them without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:  # for the type checker only: importing torch here would load it for the theory toolkit
    import numpy as np
    import torch

T = TypeVar("T", "torch.Tensor", "np.ndarray")


def symmetric_part(A: T) -> T:
    """The symmetric part ``(A + Aᵀ)/2`` over the last two axes (batched), for a tensor or an array.

    Computed as ``A/2 + Aᵀ/2``: the same numbers (halving is exact), but no overflow for entries near the float
    maximum, where ``A + Aᵀ`` would be infinite.

    Example:
        >>> import numpy as np
        >>> symmetric_part(np.array([[1.0, 2.0], [0.0, 1.0]])).tolist()
        [[1.0, 1.0], [1.0, 1.0]]
    """
    return 0.5 * A + 0.5 * A.swapaxes(-1, -2)
