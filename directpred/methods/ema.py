"""The EMA target rule of BYOL (paper Eq. 4 in discrete form) and its momentum schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``theta_a <- m theta_a + (1 - m) theta`` for every parameter; buffers (BatchNorm statistics) are copied.

    ``1 - m`` is ``alpha * beta`` in the paper's notation (Eq. 4 with step size alpha).

    Examples:
        >>> target, online = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
        >>> _ = target.weight.data.fill_(1.0), online.weight.data.fill_(3.0)
        >>> ema_update(target, online, momentum=0.75)
        >>> target.weight.data.tolist()  # 0.75 * 1 + 0.25 * 3
        [[1.5, 1.5]]
    """
    if not 0.0 <= momentum <= 1.0:  # outside, the target would extrapolate away from both networks
        raise ValueError(f"EMA momentum={momentum} must lie in [0, 1] (method.ema)")
    t_params: list[torch.Tensor] = [p for p in target.parameters()]
    o_params = [p.detach() for p in online.parameters()]
    if len(t_params) != len(o_params):
        raise ValueError("target and online networks differ in structure")
    torch._foreach_lerp_(t_params, o_params, 1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)


def ema_momentum(step: int, total_steps: int, base: float, schedule: str = "constant") -> float:
    """Target momentum at ``step``: constant (the paper's 0.996) or BYOL's cosine increase from ``base`` to 1.

    ``m(k) = 1 - (1 - base) (cos(pi k / K) + 1) / 2``.

    Examples:
        >>> [round(ema_momentum(k, 100, 0.996, "cosine"), 6) for k in (0, 50, 100)]
        [0.996, 0.998, 1.0]
    """
    if schedule == "constant":
        return base
    if schedule == "cosine":
        k = min(max(step, 0), total_steps)
        return 1.0 - (1.0 - base) * (math.cos(math.pi * k / max(total_steps, 1)) + 1.0) / 2.0
    raise ValueError(f"unknown EMA schedule {schedule!r}; use 'constant' or 'cosine'")
