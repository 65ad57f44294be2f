"""Heads: projector and every predictor, behind one protocol.

Every predictor is a :class:`Predictor` (an ``nn.Module``) with ``forward(z) -> p`` and ``update(z)``; the method
calls ``update`` under ``torch.no_grad()`` in training steps only (a no-op for predictors trained by gradient descent,
and in eval mode for every predictor). A predictor with ``uses_target = True`` (the ``optimal`` one) is called as
``update(z, z_target=...)`` with the row-aligned target projections. The statistics (F^, eigh, W_p) run in float32
with autocast off. Linear predictors expose ``weight`` (W_p, (d, d)).

Use in your own loop::

    from directpred.heads import DirectPred
    predictor = DirectPred(128, rho=0.3, eps=0.1, freq=1)
    ...
    z1, z2 = projector(backbone(x1)), projector(backbone(x2))
    if predictor.training:
        with torch.no_grad():
            predictor.update(torch.cat([z1, z2]))     # F^ <- rho F^ + (1-rho) z^T z / B; sets W_p every freq calls
    p1, p2 = predictor(z1), predictor(z2)              # z @ W_p^T
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from directpred.config import Config, PredictorConfig
from directpred.heads.base import Predictor
from directpred.heads.correlation import CorrelationEstimator, symmetric_eigh
from directpred.heads.directpred import DirectCopy, DirectPred, PartitionedDirectPred, directpred_eigenvalues
from directpred.heads.linear import IdentityPredictor, LinearPredictor
from directpred.heads.mlp import MLP
from directpred.heads.optimal import OptimalPredictor

__all__ = [
    "Predictor",
    "MLP",
    "LinearPredictor",
    "IdentityPredictor",
    "DirectPred",
    "DirectCopy",
    "PartitionedDirectPred",
    "OptimalPredictor",
    "CorrelationEstimator",
    "symmetric_eigh",
    "directpred_eigenvalues",
    "PREDICTORS",
    "register_predictor",
    "build_predictor",
]

PREDICTORS: dict[str, Callable[..., Predictor]] = {}


def register_predictor(name: str) -> Callable[[Callable[..., Predictor]], Callable[..., Predictor]]:
    """Decorator adding a predictor builder ``fn(dim, cfg) -> Predictor`` under ``name``."""

    def deco(fn: Callable[..., Predictor]) -> Callable[..., Predictor]:
        PREDICTORS[name] = fn
        return fn

    return deco


@register_predictor("directpred")
def _directpred(dim: int, cfg: PredictorConfig, *, seed: int = 0, **_: object) -> Predictor:
    make: Callable[..., DirectPred] = DirectPred  # PartitionedDirectPred takes the same options
    if cfg.partitions > 0:  # the hyperplanes are drawn from the run's seed (train.seed)
        make = partial(PartitionedDirectPred, partitions=cfg.partitions, seed=seed)
    return make(
        dim,
        rho=cfg.rho,
        eps=cfg.eps,
        freq=cfg.freq,
        eps_mode=cfg.eps_mode,
        c=cfg.c,
        zero_mean=cfg.zero_mean,
        average=cfg.average,
    )


@register_predictor("directcopy")
def _directcopy(dim: int, cfg: PredictorConfig, **_: object) -> Predictor:
    return DirectCopy(dim, rho=cfg.rho, eps=cfg.eps, freq=cfg.freq, zero_mean=cfg.zero_mean, average=cfg.average)


@register_predictor("optimal")
def _optimal(dim: int, cfg: PredictorConfig, **_: object) -> Predictor:
    return OptimalPredictor(dim, rho=cfg.rho, freq=cfg.freq, ridge=cfg.ridge, average=cfg.average)


@register_predictor("linear")
def _linear(dim: int, cfg: PredictorConfig, **_: object) -> Predictor:
    return LinearPredictor(dim, bias=cfg.bias, symmetric=cfg.symmetric)


@register_predictor("mlp")
def _mlp(dim: int, cfg: PredictorConfig, *, bn_affine: bool = False, **_: object) -> Predictor:
    return MLP(dim, cfg.hidden_dim, dim, bias=cfg.mlp_bias, bn_affine=bn_affine, tied=cfg.symmetric)


@register_predictor("none")
def _none(dim: int, cfg: PredictorConfig, **_: object) -> Predictor:
    return IdentityPredictor(dim)


def build_predictor(dim: int, cfg: PredictorConfig, *, bn_affine: bool = False, seed: int = 0) -> Predictor:
    """Build the predictor named by ``cfg.name``.

    ``bn_affine`` is the BatchNorm setting of the two-layer predictor (shared with the projector); ``seed`` (the
    run's ``train.seed``) draws the random hyperplanes of ``partitions``.

    Raises:
        TypeError: ``cfg`` is not a predictor section, e.g. the whole :class:`~directpred.config.Config` (pass its
            ``cfg.predictor``).
        ValueError: an unknown ``cfg.name``.
    """
    if isinstance(cfg, Config):
        raise TypeError(
            "build_predictor takes the predictor section of a Config, a PredictorConfig, not the whole Config: "
            "call build_predictor(dim, cfg.predictor, ...)"
        )
    if not hasattr(cfg, "name"):
        raise TypeError(
            f"build_predictor takes a PredictorConfig (e.g. cfg.predictor of a Config), got {type(cfg).__name__}"
        )
    if cfg.name not in PREDICTORS:
        raise ValueError(f"unknown predictor {cfg.name!r}; choose one of {sorted(PREDICTORS)}")
    return PREDICTORS[cfg.name](dim, cfg, bn_affine=bn_affine, seed=seed)
