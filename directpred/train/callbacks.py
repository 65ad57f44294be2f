"""What happens around the training step: small callbacks that :meth:`Trainer.fit` calls in a fixed order.

Hooks (all optional; a :class:`Callback` does nothing by default):

* ``on_fit_start(trainer)``: after setup (and the resumed state), before the first step;
* ``on_step_end(trainer, result)``: after every step (``trainer.step`` already counts it; ``trainer.epoch`` is the
  epoch the step belongs to), also after a skipped one (``result.skipped``);
* ``on_epoch_end(trainer, epoch)``: after the last step of epoch ``epoch - 1``, i.e. ``epoch`` epochs are done
  (not when the run is stopped within the epoch);
* ``on_loop_end(trainer)``: when the loop ends in any way (done, stopped, or an exception): release resources;
* ``on_train_end(trainer)``: when training was not interrupted, before the final checkpoint and evaluation.

The order of the built-in callbacks (:func:`default_callbacks`) is the order of their effects:
:class:`DiagnosticsCallback` (its collapse verdict may request the stop), :class:`LogCallback` (``metrics.jsonl``
rows), :class:`EvalCallback` (periodic kNN; goes into the checkpoint), :class:`ProgressCallback` (the progress bar
shows what was logged and evaluated), :class:`CheckpointCallback` (last: a checkpoint holds all of the above).
Callbacks passed to the ``Trainer`` run after these. After the callbacks of a step, the loop checks the stop request.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from directpred import distributed
from directpred.eval.protocol import evaluate

if TYPE_CHECKING:
    from directpred.train.loop import Trainer


@dataclass
class StepResult:
    """What one training step returns: the loss, the learning rate and EMA momentum it used, and the method's
    output (``None`` for a step skipped under ``train.skip_nonfinite``, whose loss is NaN)."""

    loss: torch.Tensor
    lr: float
    ema: float
    out: Any = None
    skipped: bool = False


class Callback:
    """Base class: override the hooks you need (see the module docstring for when each runs)."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        pass

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        pass

    def on_loop_end(self, trainer: Trainer) -> None:
        pass

    def on_train_end(self, trainer: Trainer) -> None:
        pass


class DiagnosticsCallback(Callback):
    """Feeds every step to :class:`directpred.diagnostics.hook.Diagnostics` (a ``diag`` row every ``diag.every``
    steps; ``diag.stop_on_collapse`` stops the run), and logs the final report on the last step's batch."""

    def __init__(self) -> None:
        self.last_out: Any = None  # the last step's output: the batch of the final report

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if result.skipped:
            return
        self.last_out = result.out
        row = trainer.diagnostics.observe(trainer.step, result.out)
        if row:
            trainer.logger.log({"step": trainer.step, "epoch": trainer.epoch, **row}, group="diag")
            if trainer.diagnostics.collapsed and trainer.cfg.diag.stop_on_collapse:
                trainer.collapse_stop = True

    def on_train_end(self, trainer: Trainer) -> None:
        if self.last_out is not None:  # the verdict on the final state
            row = trainer.diagnostics.final_report(trainer.step, self.last_out)
            trainer.logger.log({"step": trainer.step, "epoch": trainer.step // trainer.steps_per_epoch, **row},
                               group="diag_final")


class LogCallback(Callback):
    """A ``train`` row (loss, lr, EMA momentum, images/s) every ``train.log_every`` steps and at the last step;
    the row is also ``trainer.last_log``."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self.images, self.since = 0, time.time()

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        self.images += trainer.global_batch
        if trainer.step % trainer.cfg.train.log_every == 0 or trainer.step == trainer.last_step:
            ips = self.images / max(time.time() - self.since, 1e-9)
            self.images, self.since = 0, time.time()
            trainer.last_log = {"step": trainer.step, "epoch": trainer.epoch, "loss": float(result.loss),
                                "lr": result.lr, "ema": result.ema, "images_per_second": ips}
            trainer.logger.log(trainer.last_log)


class EvalCallback(Callback):
    """kNN every ``eval.knn_every`` epochs (not after the last step: the final evaluation follows), into
    ``trainer.knn_history`` and an ``eval`` row."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        every = trainer.cfg.eval.knn_every
        if every and epoch % every == 0 and trainer.step < trainer.last_step:
            res = evaluate(trainer.method, trainer.data, trainer.cfg, trainer.device, linear=False,
                           autocast_dtype=trainer.autocast_dtype)
            trainer.knn_history.append({"epoch": epoch, "step": trainer.step, **res})
            trainer.logger.log({"step": trainer.step, "epoch": epoch, **res}, group="eval")
            trainer.method.train()


class ProgressCallback(Callback):
    """The progress bar (``train.progress``, rank 0): loss and images/s of the last ``train`` row, kNN lines."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.cfg.train.progress and distributed.is_main() and trainer.step < trainer.last_step:
            from tqdm import tqdm

            self.bar = tqdm(total=trainer.last_step, initial=trainer.step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, desc="train")

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.bar is None:
            return
        row = trainer.last_log
        if row is not None and row["step"] == trainer.step:
            self.bar.set_postfix(epoch=row["epoch"], loss=f"{row['loss']:.4f}",
                                 img_s=f"{row['images_per_second']:.0f}", refresh=False)
        self.bar.update(1)

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        last = trainer.knn_history[-1] if trainer.knn_history else None
        if self.bar is not None and last is not None and last["step"] == trainer.step:
            self.bar.write(f"epoch {epoch}: kNN top-1 {last['knn_top1']:.2f}%")

    def on_loop_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CheckpointCallback(Callback):
    """``checkpoints/last.pt`` every ``train.checkpoint_every_steps`` steps and at every epoch end;
    ``epoch_XXXX.pt`` kept every ``train.checkpoint_every`` epochs."""

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        every = trainer.cfg.train.checkpoint_every_steps
        if every and trainer.step % every == 0:
            trainer.save()

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        trainer.save(keep=epoch % trainer.cfg.train.checkpoint_every == 0)


def default_callbacks() -> list[Callback]:
    """The built-in callbacks, in their documented order."""
    return [DiagnosticsCallback(), LogCallback(), EvalCallback(), ProgressCallback(), CheckpointCallback()]
