"""The "optimal" linear predictor plugged in every ``freq`` steps (paper Table 1, the authors' ``solve`` mode).

W_p solves the normal equations of the regression of the target onto the prediction,
``W_p E[f f^T] = 1/2 (E[f_a f^T] + E[f f_a^T])``, where ``f`` is the online projection of one view and ``f_a`` the
target projection of the *other* view (the EMA target in BYOL, the online projection under a stop-gradient in
SimSiam): the same pairs the loss compares. Both expectations are running estimates with the rate ``rho`` of Eq. 19
(``rho = 0``: the current batch only, Table 1's "no EMA"). With the ridge term,

    W_p = S (F^ + lambda I)^{-1},   S = (C + C^T) / 2,   C = E[f_a f^T],   lambda = ridge * tr(F^) / d,

computed in float64 with ``torch.linalg.solve``. The paper reports that this predictor fails (about 35-40 % on
STL-10); it is here to reproduce that finding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from directpred import distributed
from directpred.heads.base import Predictor
from directpred.heads.correlation import CorrelationEstimator, full_precision
from directpred.linalg import symmetric_part


class OptimalPredictor(CorrelationEstimator, Predictor):
    """Least-squares W_p from running estimates of ``E[f f^T]`` (``corr``) and ``E[f_a f^T]`` (``cross``).

    Protocol: ``update(z, z_target)`` with ``z`` (N, d) the online projections (both views stacked) and
    ``z_target`` (N, d) row-aligned: row i is the target projection of the view that row i of ``z`` predicts.
    ``uses_target = True`` tells the method to pass it.

    Args:
        dim: feature dimension d.
        rho: moving-average rate of both estimates (0: the current batch only).
        freq: solve every ``freq`` updates; SGD steps on W_p in between (Table 1's "plug-in freq").
        ridge: ``lambda = ridge * tr(F^) / d`` is added to F^'s diagonal before solving (relative to the mean
            eigenvalue, so it does not depend on the feature scale).
        average: ``"ema"`` or ``"cumulative"``.

    Examples:
        >>> import torch
        >>> op = OptimalPredictor(4, rho=0.0)
        >>> z = torch.cat([torch.eye(4), -torch.eye(4)])  # F^ = I/4, which commutes with the target map D
        >>> D = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        >>> op.update(z, z_target=z @ D)  # E[f_a f^T] = D F^, so W_p = D (up to the ridge)
        >>> torch.allclose(op.weight, D, atol=1e-3)
        True
    """

    uses_target = True
    cross: torch.Tensor

    def __init__(self, dim: int, *, rho: float = 0.3, freq: int = 1, ridge: float = 1e-4, average: str = "ema") -> None:
        super().__init__(dim, rho=rho, average=average, zero_mean=False)
        if isinstance(freq, bool) or int(freq) != freq or freq < 1:
            raise ValueError(f"freq={freq!r} must be an integer >= 1")
        if not ridge >= 0:
            raise ValueError(f"ridge={ridge} must be >= 0")
        freq = int(freq)
        self.freq, self.ridge = freq, ridge
        self.weight = nn.Parameter(torch.eye(dim), requires_grad=freq > 1)
        self.register_buffer("cross", torch.zeros(dim, dim))  # C = E[f_a f^T], (d, d)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, d) -> (B, d)
        return F.linear(z, self.weight.to(z.dtype))

    @torch.no_grad()
    def update(self, z: torch.Tensor, z_target: torch.Tensor | None = None) -> None:
        """Fold the pairs into both estimates (float32, autocast off); solve on the 1st, (freq+1)-th, ... call.

        A no-op in eval mode.
        """
        if not self.training:
            return
        if z_target is None:
            raise ValueError("the optimal predictor needs z_target: the target projections paired with z")
        self.check_input(z)
        if z_target.shape != z.shape:
            raise ValueError(f"z_target {tuple(z_target.shape)} must have z's shape {tuple(z.shape)}")
        set_now = int(self.count) % self.freq == 0
        with full_precision(z.device):
            zt = z_target.detach().float()
            w = self._weight_of_new_batch()
            cross_sum = zt.t() @ z.detach().float()
            stats = torch.cat([cross_sum.flatten(), cross_sum.new_tensor([z.shape[0]])])
            distributed.all_reduce_sum(stats)
            batch_cross = stats[:-1].view(self.dim, self.dim) / stats[-1]
            if not torch.isfinite(batch_cross).all():
                if stats[-1] == 0:
                    raise ValueError(f"the predictor's update got an empty batch z of shape {tuple(z.shape)}")
                # The fault only, as CorrelationEstimator: the trainer adds the advice.
                raise FloatingPointError("NaN/inf in E_B[f_a f^T] (the network has diverged)")
            super().update(z)  # F^ (also checks finiteness and advances count)
            self.cross.lerp_(batch_cross.to(self.cross.dtype), w)  # float32 stats into a .double() module's
            if set_now:
                self.weight.copy_(self.solve())

    def solve(self) -> torch.Tensor:
        """``W_p = S (F^ + lambda I)^{-1}`` (d, d) from the current estimates, in float64."""
        Fh = self.corr.double()
        Fh = symmetric_part(Fh)
        S = symmetric_part(self.cross.double())
        lam = self.ridge * float(Fh.diagonal().sum()) / self.dim
        if lam <= 0:
            lam = self.ridge if self.ridge > 0 else 1e-12
        A = Fh + lam * torch.eye(self.dim, dtype=torch.float64, device=Fh.device)
        X = torch.linalg.solve(A, S)  # A X = S, so X^T A = S (A, S symmetric): W_p = X^T
        return X.t().to(self.weight.dtype)
