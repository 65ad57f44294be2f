"""Optimisers (SGD with momentum, LARS), the predictor's own parameter group, and learning-rate schedules.

Each parameter group carries ``lr_scale``: 1 for the trunk, ``alpha_p`` for the predictor (the paper's relative
predictor learning rate). The schedule is a pure function of the step; the loop sets ``lr = base * scale * f(step)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from directpred.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as used by BYOL.

    The update of a tensor w with gradient g is scaled by ``trust * ||w|| / ||g + wd w||``. Groups with
    ``lars_exclude=True`` (biases and BatchNorm parameters) get neither weight decay nor adaptation, as in BYOL.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
    ) -> None:
        super().__init__(
            params,
            dict(
                lr=lr,
                momentum=momentum,
                weight_decay=weight_decay,
                trust_coefficient=trust_coefficient,
                lars_exclude=False,
            ),
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if not group["lars_exclude"]:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.norm(p), torch.norm(d)
                    ratio = torch.where(
                        (w_norm > 0) & (d_norm > 0),
                        group["trust_coefficient"] * w_norm / d_norm,
                        torch.ones_like(w_norm),
                    )
                    d = d.mul(ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(
    trunk: nn.Module,
    predictor: nn.Module,
    *,
    weight_decay: float,
    predictor_weight_decay: float,
    alpha_p: float,
    lars: bool = False,
) -> list[dict]:
    """Trunk (backbone + projector) and predictor groups; with LARS, biases/BN go to excluded groups."""

    def split(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        regular: list[nn.Parameter] = []
        excluded: list[nn.Parameter] = []
        for p in module.parameters():
            if p.requires_grad:
                (excluded if lars and p.ndim <= 1 else regular).append(p)
        return regular, excluded

    groups = []
    for module, scale, wd, name in (
        (trunk, 1.0, weight_decay, "trunk"),
        (predictor, alpha_p, predictor_weight_decay, "predictor"),
    ):
        regular, excluded = split(module)
        if regular:
            groups.append(dict(params=regular, lr_scale=scale, weight_decay=wd, name=name, lars_exclude=False))
        if excluded:
            groups.append(
                dict(params=excluded, lr_scale=scale, weight_decay=0.0, name=f"{name}_bias_bn", lars_exclude=True)
            )
    return groups


def build_optimizer(cfg: OptimConfig, trunk: nn.Module, predictor: nn.Module) -> torch.optim.Optimizer:
    """SGD or LARS over the trunk and predictor groups of an :class:`directpred.config.OptimConfig`."""
    pwd = cfg.weight_decay if cfg.predictor_weight_decay < 0 else cfg.predictor_weight_decay
    groups = param_groups(
        trunk,
        predictor,
        weight_decay=cfg.weight_decay,
        predictor_weight_decay=pwd,
        alpha_p=cfg.alpha_p,
        lars=cfg.name == "lars",
    )
    for g in groups:
        g["lr"] = cfg.lr * g["lr_scale"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return LARS(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, trust_coefficient=cfg.lars_eta)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's per-parameter state (momentum buffers) into ``optimizer``, keeping its group settings.

    ``Optimizer.load_state_dict`` also restores every group's settings (``lr_scale`` = alpha_p, ``weight_decay``,
    ``momentum``, ...); a run resumed with other values (``--force``) would then silently train with the old ones
    while its ``config.yaml`` records the new. Here the optimiser as built from the configuration keeps its settings.
    """
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, configured in zip(optimizer.param_groups, settings):
        group.update(configured)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate at ``step``: constant (the paper's), or linear warmup then cosine."""
    if schedule == "constant":
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "warmup_cosine":
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    raise ValueError(f"unknown schedule {schedule!r}; use constant or warmup_cosine")


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    """Apply ``base_lr * group['lr_scale'] * factor`` to every group; returns the trunk's lr."""
    for g in optimizer.param_groups:
        g["lr"] = base_lr * g.get("lr_scale", 1.0) * factor
    return base_lr * factor
