"""The running estimate F^ of the predictor-input correlation E[f f^T] (paper Eq. 19).

``F^ <- rho F^ + (1 - rho) E_B[f f^T]``, with the batch term ``z^T z / B`` (never per-sample outer products), summed
over all processes before it is averaged, so every rank holds the same F^. The first update takes the batch term
as it is (as the authors' ``Accumulator`` does); ``average="cumulative"`` keeps the simple average of all batch terms
instead (the paper's "simple average", reported to differ little).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from directpred import distributed
from directpred.linalg import symmetric_part


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Autocast off on ``device``: the predictor's statistics (F^, eigh, W_p) are float32 whatever the training
    precision (``train.precision=bf16/fp16`` would otherwise run ``z^T z`` and ``U diag(p) U^T`` in half precision).
    """
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def nonfinite_input_error(z: torch.Tensor) -> FloatingPointError:
    """The error for a batch whose all-reduced ``E_B[f f^T]`` is not finite, told from this process's own batch ``z``
    (B, d): NaN/inf in ``z``, its squares overflowing float32, or (several processes) another process's inputs."""
    if not torch.isfinite(z).all():
        what = "NaN/inf in the predictor's inputs f"
    elif not torch.isfinite(z.t() @ z).all():
        what = (
            f"the predictor's inputs f reach |f| = {z.abs().max().item():.3g}, whose squares overflow "
            "float32 in E_B[f f^T]"
        )
    else:  # only with several processes: this one's inputs and their E_B[f f^T] are finite
        what = (
            "NaN/inf or a float32 overflow in E_B[f f^T] from another process's predictor inputs f; this "
            f"process's are finite, |f| <= {z.abs().max().item():.3g}"
        )
    # What went wrong only: the trainer puts it in its own message (the step, the likely causes, the last good
    # checkpoint and how to resume), which advice here would only repeat.
    return FloatingPointError(f"{what} (the network has diverged)")


class CorrelationEstimator(nn.Module):
    """Moving average F^ of ``E[f f^T]`` over training batches.

    All state is in buffers (``corr``, ``mean``, ``count``), so ``state_dict()`` carries it into checkpoints.

    Args:
        dim: feature dimension d.
        rho: moving-average rate of Eq. 19 (0.3 in the paper's best runs: F^ spans only 1-2 batches).
        average: ``"ema"`` (Eq. 19) or ``"cumulative"`` (simple average of every batch term).
        zero_mean: use the covariance ``F^ - m m^T`` instead of the correlation (the paper reports this hurts).

    Examples:
        >>> est = CorrelationEstimator(4, rho=0.3)
        >>> est.update(torch.randn(32, 4))
        >>> est.matrix().shape
        torch.Size([4, 4])
    """

    corr: torch.Tensor
    mean: torch.Tensor
    count: torch.Tensor

    def __init__(self, dim: int, *, rho: float = 0.3, average: str = "ema", zero_mean: bool = False) -> None:
        super().__init__()
        if isinstance(dim, bool) or int(dim) != dim or dim < 1:
            raise ValueError(f"dim={dim!r} (the feature dimension d) must be an integer >= 1")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho={rho} must lie in [0, 1)")
        if average not in ("ema", "cumulative"):
            raise ValueError(f"average={average!r} must be 'ema' or 'cumulative'")
        self.dim, self.rho, self.average, self.zero_mean = dim, rho, average, zero_mean
        self.register_buffer("corr", torch.zeros(dim, dim))  # F^, (d, d)
        self.register_buffer("mean", torch.zeros(dim))  # running E[f], used when zero_mean
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # batches seen

    def _weight_of_new_batch(self) -> float:
        n = int(self.count)
        if n == 0:
            return 1.0
        return 1.0 / (n + 1) if self.average == "cumulative" else 1.0 - self.rho

    def check_input(self, z: torch.Tensor, name: str = "z") -> None:
        """Raise ``ValueError`` unless ``z`` is (B, d) with this estimator's d."""
        if z.ndim != 2 or z.shape[1] != self.dim:
            raise ValueError(f"expected {name} of shape (B, {self.dim}), got {tuple(z.shape)}")

    @torch.no_grad()
    def update(self, z: torch.Tensor) -> None:
        """Fold the batch ``z`` (B, d) into F^ in float32 (autocast off). Call only in training steps.

        Raises:
            ValueError: ``z`` is not (B, d), or the batch is empty (on every process).
            FloatingPointError: ``z`` holds NaN/inf, or its squares overflow float32.
        """
        self.check_input(z)
        with full_precision(z.device):
            self._fold(z.detach().float())

    def _fold(self, z: torch.Tensor) -> None:
        # One all-reduce carries sum z z^T, sum z and B, so ranks with different batch sizes average correctly.
        stats = torch.cat([(z.t() @ z).flatten(), z.sum(0), z.new_tensor([z.shape[0]])])
        distributed.all_reduce_sum(stats)
        n = stats[-1]
        d = self.dim
        batch_corr = stats[: d * d].view(d, d) / n
        batch_mean = stats[d * d : d * d + d] / n
        if not torch.isfinite(batch_corr).all():
            if n == 0:  # 0/0 above; checked only here, so the normal path gains no device sync
                raise ValueError(f"the predictor's update got an empty batch z of shape {tuple(z.shape)}")
            raise nonfinite_input_error(z)
        w = self._weight_of_new_batch()
        self.corr.lerp_(batch_corr.to(self.corr.dtype), w)
        self.mean.lerp_(batch_mean.to(self.mean.dtype), w)
        self.count += 1

    def matrix(self) -> torch.Tensor:
        """The current F^ (d, d); the covariance if ``zero_mean``."""
        if self.zero_mean:
            return self.corr - torch.outer(self.mean, self.mean)
        return self.corr


def symmetric_eigh(M: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Eigendecomposition of a symmetric matrix with a fallback that always returns finite factors.

    Tries ``torch.linalg.eigh`` in ``dtype`` (float32 or float64, also under mixed precision). If that raises or
    returns non-finite values, retries in float64 with a small diagonal jitter, and warns.

    Returns:
        ``(s, U, fell_back)``: eigenvalues ascending (d,), eigenvectors as columns (d, d), in ``M``'s dtype, and
        whether the fallback was needed.

    Raises:
        FloatingPointError: if ``M`` itself holds NaN or infinity.
    """
    if not torch.isfinite(M).all():
        raise FloatingPointError("F^ holds NaN or infinity; the predictor inputs diverged (lower optim.lr).")
    out_dtype = M.dtype if M.dtype in (torch.float32, torch.float64) else torch.float32
    A = symmetric_part(M)
    try:
        s, U = torch.linalg.eigh(A.to(dtype))
        if torch.isfinite(s).all() and torch.isfinite(U).all():
            return s.to(out_dtype), U.to(out_dtype), False
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        pass
    A64 = A.double()
    scale = float(A64.diagonal().abs().mean().clamp(min=1e-12))
    eye = torch.eye(A.shape[0], dtype=torch.float64, device=A.device)
    for jitter in (1e-10, 1e-7, 1e-4):
        try:
            s, U = torch.linalg.eigh(A64 + jitter * scale * eye)
        except RuntimeError:
            continue
        if torch.isfinite(s).all() and torch.isfinite(U).all():
            warnings.warn(
                f"eigh of F^ failed in {dtype}; fell back to float64 with jitter {jitter:g}*mean(diag)",
                RuntimeWarning,
                stacklevel=2,
            )
            return (s - jitter * scale).to(out_dtype), U.to(out_dtype), True
    raise FloatingPointError("the eigendecomposition of F^ failed even in float64 with jitter")
