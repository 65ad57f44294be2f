"""What can stop training, as exceptions, and the non-finite guard of a training step.

The library raises; only the command line turns these into messages and exit codes (``directpred.cli.train``).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from directpred import distributed

if TYPE_CHECKING:
    from directpred.methods import Siamese


class TrainingError(RuntimeError):
    """Training cannot go on (changed config on resume, unwritable run directory, ...); the message says what to do."""


class TrainingDiverged(TrainingError):
    """A non-finite loss, gradient or predictor statistic, beyond what ``train.skip_nonfinite`` allows."""


class TrainingInterrupted(Exception):
    """Training stopped on request (``Trainer.request_stop``, e.g. from a SIGINT/SIGTERM handler) after a step.

    The checkpoint of that step has been written. ``signum`` is the signal that asked for the stop (None for a stop
    requested otherwise, e.g. by another process of a multi-process run). The message gives the command to resume
    with: under torchrun (``world`` processes) the same launch, as a run resumes only with its global batch.
    """

    def __init__(
        self,
        signum: int | None,
        step: int,
        checkpoint: Path,
        run_dir: Path,
        *,
        world: int = 1,
        evaluating: bool = False,
    ) -> None:
        self.signum, self.step, self.checkpoint, self.run_dir = signum, step, checkpoint, run_dir
        name = signal.Signals(signum).name if signum else "stop"
        launch = f"torchrun <the same options: {world} processes> -m directpred" if world > 1 else "directpred"
        where = " (training done, in the final evaluation)" if evaluating else ""
        then = " (it evaluates the trained model)" if evaluating else ""
        super().__init__(
            f"Stopped by {name} at step {step}{where}; checkpoint written to {checkpoint}."
            f"\nResume with: {launch} train --resume {run_dir}{then}"
        )


class NonFiniteGuard:
    """``train.skip_nonfinite``: detect a non-finite step and undo it, or stop with :class:`TrainingDiverged`.

    A skipped step changes nothing but the step counter: :meth:`snapshot` copies what a forward pass changes (every
    buffer: BatchNorm statistics, F^ and its counters; the predictor's parameters, which DirectPred sets in
    ``update``) and :meth:`undo` restores it; the optimiser has not stepped yet.
    """

    def __init__(self, method: Siamese, allowed: int) -> None:
        self.method, self.allowed = method, allowed

    def snapshot(self) -> dict[str, torch.Tensor] | None:
        if not self.allowed:
            return None
        keep = {n for n, _ in self.method.named_buffers()}
        keep |= {f"online.predictor.{n}" for n, _ in self.method.online.predictor.named_parameters()}
        return {k: v.detach().clone() for k, v in self.method.state_dict().items() if k in keep}

    def fault(self, loss: torch.Tensor, *, check_grads: bool) -> str | None:
        """Why this step cannot be taken (after backward), or None. ``check_grads``: without a GradScaler (fp16
        skips inf steps itself).

        With several processes the answer is agreed: one all-reduce of the two flags (loss, gradient) per step, so
        every process skips or steps together. A process's own checks alone would split them: under a GradScaler a
        NaN loss on one process skips the step there (no ``scaler.update``) while the others step, halve their
        scale, update the EMA and (``update_at=after_step``) enter the predictor's all-reduce alone.
        """
        if not distributed.is_distributed():
            if not torch.isfinite(loss):
                return f"non-finite loss ({loss.item()})"
            if check_grads and not bool(torch.isfinite(self._grad_max_norm())):
                return "non-finite gradient (the loss was finite)"
            return None
        # The two flags summed over the processes: how many had a non-finite loss, a non-finite gradient.
        flags = torch.zeros(2, device=loss.device)
        flags[0] = (~torch.isfinite(loss.detach())).float()
        if check_grads:
            flags[1] = (~torch.isfinite(self._grad_max_norm())).float()
        bad_loss, bad_grad = (int(n) for n in distributed.all_reduce_sum(flags).tolist())  # the step's one sync
        world = distributed.world_size()
        if bad_loss:
            if not torch.isfinite(loss):
                return f"non-finite loss ({loss.item()}) on {bad_loss} of {world} processes"
            return f"non-finite loss on {bad_loss} of {world} processes (this one's was finite: {loss.item():.6g})"
        if bad_grad:
            return f"non-finite gradient on {bad_grad} of {world} processes (the loss was finite)"
        return None

    def _grad_max_norm(self) -> torch.Tensor:
        """The online branch's largest |gradient| entry: inf/NaN exactly when an entry is (a 2-norm could overflow
        on large finite gradients); 0 without gradients."""
        grads = [p.grad for p in self.method.online.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, float("inf")) if grads else torch.zeros(())

    def undo(self, snapshot: dict[str, torch.Tensor] | None) -> None:
        """Restore the snapshot: undo the BatchNorm / F^ / W_p updates of the step."""
        if snapshot is not None:  # taken whenever a skip is allowed
            self.method.load_state_dict(snapshot, strict=False)


# Settings whose size can make training diverge; named in the message when a run sets them off their defaults.
DIVERGENCE_SUSPECTS = (
    "optim.lr",
    "optim.alpha_p",
    "optim.weight_decay",
    "optim.predictor_weight_decay",
    "predictor.eps",
    "predictor.c",
    "method.ema",
)


def fault_message(
    fault: str,
    step: int,
    lr: float,
    run_dir: Path,
    last_checkpoint: tuple[Path, int] | None,
    changed: dict[str, Any] | None = None,
) -> str:
    """What went wrong at ``step``, the likely causes and how to go on. ``changed``: the run's settings of
    :data:`DIVERGENCE_SUSPECTS` that differ from their defaults (a predictor.eps of 1e300 diverged with a message
    that blamed only the learning rate)."""
    others = {k: v for k, v in (changed or {}).items() if k != "optim.lr"}
    also = (
        f" The run also sets {', '.join(f'{k}={v}' for k, v in others.items())} off their defaults: a value too "
        "large there diverges too."
        if others
        else ""
    )
    if last_checkpoint is not None:
        path, at = last_checkpoint
        where = (
            f"The last good checkpoint is {path} (step {at}); resume from it with `directpred train "
            f"--resume {run_dir}` (changing optim.lr on resume needs --force)."
        )
    else:
        where = (
            "No checkpoint was written yet (train.checkpoint_every_steps writes them within an epoch); "
            "restart with a lower optim.lr."
        )
    return (
        f"{fault} at step {step}; training stopped. Likely causes: a learning rate too high for this "
        f"batch size (optim.lr={lr}), fp16 overflow (try train.precision=bf16 or fp32), or corrupt "
        f"inputs.{also} Nothing from this step was written. {where} To skip isolated bad steps instead, set "
        f"train.skip_nonfinite to the number of steps that may be skipped."
    )
