"""BYOL and SimSiam as one composition: encoder + projector + predictor + loss + target rule.

They differ only in the target branch: BYOL regresses an EMA copy of the online encoder, SimSiam the online
encoder itself (with a stop-gradient). Paper §1: ``J = 1/2 E ||W_p f_1 - StopGrad(f_2a)||^2`` with the cosine form.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from directpred.config import Config
from directpred.heads.base import Predictor
from directpred.losses import isoloss_prediction, two_view_loss
from directpred.methods.ema import ema_update


class Encoder(nn.Module):
    """Backbone followed by the projector: images (B, 3, H, W) -> projections f (B, d)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


UPDATE_AT = ("forward", "after_step")


def update_predictor(
    predictor: Predictor, z1: torch.Tensor, z2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor
) -> None:
    """``predictor.update`` on both views' projections (detached, no_grad), with the row-aligned targets of the
    other view (``z1`` predicts ``t2``, ``z2`` predicts ``t1``) for predictors that use them (``uses_target``)."""
    with torch.no_grad():
        z = torch.cat([z1, z2]).detach()
        if getattr(predictor, "uses_target", False):
            predictor.update(z, z_target=torch.cat([t2, t1]).detach())
        else:
            predictor.update(z)


class OnlineBranch(nn.Module):
    """Encoder and predictor: the part that receives gradients (and that DDP wraps).

    With ``update_at="forward"``, in training mode ``forward`` calls ``predictor.update`` on both views'
    projections, detached and under ``no_grad``, before predicting, so a DirectPred W_p reflects F^ including the
    current batch. With ``"after_step"`` the forward pass only predicts (with the current W_p) and the trainer
    calls :meth:`Siamese.update_predictor` after the optimiser step (the authors' order). In eval mode the
    predictor's statistics are never touched.
    """

    def __init__(self, encoder: Encoder, predictor: Predictor, *, update_at: str = "forward") -> None:
        super().__init__()
        if update_at not in UPDATE_AT:
            raise ValueError(f"update_at={update_at!r} must be 'forward' or 'after_step'")
        self.encoder = encoder
        self.predictor = predictor
        self.update_at = update_at

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, t1: torch.Tensor | None = None, t2: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """``(h1, h2, z1, z2, p1, p2)``: backbone features, projections and predictions of both views.

        ``t1``, ``t2``: the target projections of the views (BYOL), needed by a predictor with ``uses_target``
        when it updates in the forward pass; ``None`` means the online projections (SimSiam).
        """
        # Separate passes per view: BatchNorm statistics per view, as in BYOL and the authors' code.
        h1, h2 = self.encoder.backbone(x1), self.encoder.backbone(x2)
        z1, z2 = self.encoder.projector(h1), self.encoder.projector(h2)
        if self.training and self.update_at == "forward":
            # Here, between projecting and predicting, because DDP allows one forward call per backward.
            update_predictor(self.predictor, z1, z2, z1 if t1 is None else t1, z2 if t2 is None else t2)
        return h1, h2, z1, z2, self.predictor(z1), self.predictor(z2)


@dataclass
class StepOutput:
    """What one training step produced."""

    loss: torch.Tensor
    h1: torch.Tensor  # backbone features of view 1 (the representation), (B, D)
    h2: torch.Tensor
    z1: torch.Tensor  # online projections of view 1 (the predictor's input f), (B, d)
    z2: torch.Tensor
    p1: torch.Tensor  # predictions W_p f, (B, d)
    p2: torch.Tensor
    t1: torch.Tensor  # targets of view 1 (EMA projections for BYOL, online ones for SimSiam), (B, d)
    t2: torch.Tensor


class Siamese(nn.Module):
    """BYOL (``target="ema"``) or SimSiam (``target="online"``).

    Args:
        encoder: the online backbone + projector.
        predictor: any predictor of :mod:`directpred.heads`.
        target: ``"ema"`` (BYOL) or ``"online"`` (SimSiam).
        target_init: ``"copy"`` (BYOL) or ``"random"`` (an independent random init, as the authors' code does).
        symmetric_loss: see :func:`directpred.losses.two_view_loss`.
        stop_gradient: see :func:`directpred.losses.two_view_loss`.
        make_encoder: builds a fresh encoder; needed for ``target_init="random"``.
        update_at: ``"forward"`` (update the predictor's statistics and W_p in the forward pass, before predicting)
            or ``"after_step"`` (the authors' order: the trainer calls :meth:`update_predictor` after the optimiser
            step, so step t predicts with W_p from F^ up to step t-1).
        isoloss: the loss's gradient reaches the projections as if W_p were the identity (IsoLoss, see
            :func:`directpred.losses.isoloss_prediction`); the loss value and the predictions are unchanged. Needs a
            predictor without trainable parameters (set in closed form), since W_p gets no gradient.
    """

    def __init__(
        self,
        encoder: Encoder,
        predictor: Predictor,
        *,
        target: str = "ema",
        target_init: str = "copy",
        symmetric_loss: bool = True,
        stop_gradient: bool = True,
        make_encoder: Callable[[], Encoder] | None = None,
        update_at: str = "forward",
        isoloss: bool = False,
    ) -> None:
        super().__init__()
        if target not in ("ema", "online"):
            raise ValueError(f"target={target!r} must be 'ema' (BYOL) or 'online' (SimSiam)")
        trained = [name for name, q in predictor.named_parameters() if q.requires_grad]
        if isoloss and trained:
            raise ValueError(
                f"isoloss=True passes no gradient to the predictor, but {type(predictor).__name__} has trainable "
                f"parameters ({', '.join(trained)}); use a predictor set in closed form (DirectPred, DirectCopy or "
                "the optimal predictor with freq=1) or isoloss=False"
            )
        self.isoloss = isoloss
        self.online = OnlineBranch(encoder, predictor, update_at=update_at)
        self.symmetric_loss, self.stop_gradient = symmetric_loss, stop_gradient
        self.target: Encoder | None = None
        if target == "ema":
            if target_init == "copy":
                self.target = copy.deepcopy(encoder)
            elif target_init == "random":
                if make_encoder is None:
                    raise ValueError("target_init='random' needs make_encoder")
                self.target = make_encoder()
            else:
                raise ValueError(f"target_init={target_init!r} must be 'copy' or 'random'")
            self.target.requires_grad_(False)

    @property
    def encoder(self) -> Encoder:
        """The online encoder (what evaluation uses)."""
        return self.online.encoder

    @property
    def predictor(self) -> Predictor:
        """The online branch's predictor (the same module as ``online.predictor``: its state is the model's)."""
        return self.online.predictor

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, *, online: nn.Module | None = None) -> StepOutput:
        """Loss of one batch of view pairs (B, 3, H, W) each.

        ``online``: what to call as the online branch instead of ``self.online``, e.g. the trainer's
        ``DistributedDataParallel`` wrapper around it (kept out of this module's state).
        """
        call = self.online if online is None else online
        target = self.target
        updates_now = (
            self.online.training
            and self.online.update_at == "forward"
            and getattr(self.predictor, "uses_target", False)
        )
        if target is not None and updates_now:  # the predictor's update in the forward pass needs the targets first
            with torch.no_grad():
                t1, t2 = target(x1), target(x2)
            h1, h2, z1, z2, p1, p2 = call(x1, x2, t1, t2)
        else:
            h1, h2, z1, z2, p1, p2 = call(x1, x2)
            if target is None:  # SimSiam: the target is the online projection (stop-gradient in the loss)
                t1, t2 = z1, z2
            else:
                with torch.no_grad():
                    t1, t2 = target(x1), target(x2)
        q1, q2 = (isoloss_prediction(p1, z1), isoloss_prediction(p2, z2)) if self.isoloss else (p1, p2)
        loss = two_view_loss(q1, q2, t1, t2, symmetric=self.symmetric_loss, stop_gradient=self.stop_gradient)
        return StepOutput(loss, h1, h2, z1, z2, p1, p2, t1, t2)

    @torch.no_grad()
    def update_predictor(self, out: StepOutput) -> None:
        """With ``update_at="after_step"`` and in training mode: fold this step's detached projections (both
        views; the update all-reduces over processes) into the predictor's statistics and set W_p on its schedule.
        Call after the optimiser step. Nothing otherwise."""
        if self.online.update_at == "after_step" and self.online.training:
            update_predictor(self.predictor, out.z1, out.z2, out.t1, out.t2)

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA step of the target (BYOL); nothing for SimSiam."""
        if self.target is not None:
            ema_update(self.target, self.online.encoder, momentum)


def build_method(cfg: Config) -> Siamese:
    """The method of a :class:`directpred.config.Config`.

    The weights are drawn from torch's global generator, which ``build_method`` does not seed: ``cfg.train.seed``
    is read only for the hyperplanes of ``predictor.partitions``. Two calls give two different initialisations.
    ``Trainer.setup`` (and ``directpred eval --untrained``) call ``torch.manual_seed(cfg.train.seed)`` right before
    building; do the same for the initialisation a run with this config starts from::

        torch.manual_seed(cfg.train.seed)
        method = build_method(cfg)
    """
    from directpred.backbones import build_backbone
    from directpred.heads import MLP, build_predictor

    def make_encoder() -> Encoder:
        backbone = build_backbone(cfg.backbone)
        projector = MLP(
            backbone.out_dim, cfg.projector.hidden_dim, cfg.projector.out_dim, bn_affine=cfg.projector.bn_affine
        )
        return Encoder(backbone, projector)

    encoder = make_encoder()
    predictor = build_predictor(
        cfg.projector.out_dim, cfg.predictor, bn_affine=cfg.projector.bn_affine, seed=cfg.train.seed
    )
    return Siamese(
        encoder,
        predictor,
        target="ema" if cfg.method.name == "byol" else "online",
        target_init=cfg.method.target_init,
        symmetric_loss=cfg.method.symmetric_loss,
        stop_gradient=cfg.method.stop_gradient,
        make_encoder=make_encoder,
        update_at=cfg.predictor.update_at,
        isoloss=cfg.method.isoloss,
    )
