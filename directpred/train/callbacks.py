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
rows), :class:`EvalCallback` (periodic kNN; goes into the checkpoint), :class:`OnlineProbeCallback`
(``eval.online_probe``: trained every step; tested on the features the kNN evaluation just computed),
:class:`ProgressCallback` (the progress bar shows what was logged and evaluated), :class:`CheckpointCallback`
(last: a checkpoint holds all of the above).
Callbacks passed to the ``Trainer`` run after these. After the callbacks of a step, the loop checks the stop request.

Over 300 lines: the built-in callbacks, whose documented order is one contract, are kept in one place.
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from directpred import distributed
from directpred.eval.protocol import evaluate
from directpred.methods import StepOutput
from directpred.train.optim import load_optimizer_state

if TYPE_CHECKING:
    from directpred.train.loop import Trainer


@dataclass
class StepResult:
    """What one training step returns: the loss, the learning rate and EMA momentum it used, and the method's
    output (``None`` for a step skipped under ``train.skip_nonfinite``, whose loss is NaN)."""

    loss: torch.Tensor
    lr: float
    ema: float
    out: StepOutput | None = None
    skipped: bool = False
    labels: torch.Tensor | None = None  # the batch's labels (set by the loop; -1: unlabelled)


class Callback:
    """Base class: override the hooks you need (see the module docstring for when each runs).

    A callback with state that must survive a resume sets ``state_key``: the checkpoint then holds its
    :meth:`state_dict` (plain tensors, numbers, lists and dicts: checkpoints are loaded with ``weights_only``), and a
    resumed run hands it to :meth:`load_state_dict` right after the callback's ``on_fit_start``.
    """

    state_key: str | None = None

    def state_dict(self) -> dict[str, Any]:
        """The state a resumed run needs (read only when ``state_key`` is set): plain tensors, numbers, lists and
        dicts. Nothing by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`state_dict` returned, on resume, right after this callback's ``on_fit_start``.
        Nothing by default."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After :meth:`Trainer.setup` (and the resumed state), before the first step."""

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        """After every step, also a skipped one (``result.skipped``): ``trainer.step`` already counts it and
        ``trainer.epoch`` is the epoch it belongs to."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        """After the last step of epoch ``epoch - 1``, i.e. ``epoch`` epochs are done (not when the run is stopped
        within the epoch)."""

    def on_loop_end(self, trainer: Trainer) -> None:
        """When the loop ends in any way (done, stopped, or an exception): release resources here."""

    def on_train_end(self, trainer: Trainer) -> None:
        """When training was not interrupted, before the final checkpoint and evaluation."""


class DiagnosticsCallback(Callback):
    """Feeds every step to :class:`directpred.diagnostics.hook.Diagnostics` (a ``diag`` row every ``diag.every``
    steps; ``diag.stop_on_collapse`` stops the run), and logs the final report on the last step's batch."""

    def __init__(self) -> None:
        self.last_out: StepOutput | None = None  # the last step's output: the batch of the final report

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if result.skipped or result.out is None:  # a skipped step has no output
            return
        self.last_out = result.out
        row = trainer.diagnostics.observe(trainer.step, result.out)
        if row:
            trainer.logger.log({"step": trainer.step, "epoch": trainer.epoch, **row}, group="diag")
            if trainer.diagnostics.collapsed and trainer.cfg.diag.stop_on_collapse:
                trainer.collapse_stop = True

    def on_train_end(self, trainer: Trainer) -> None:
        self.final_report(trainer)

    def final_report(self, trainer: Trainer) -> None:
        """The verdict on the final state, from the last step's output (once; nothing if this process trained no
        step). Also called by the trainer when a stop comes on the last step: a resumed run has no step output."""
        if self.last_out is None:
            return
        # What a run extended from here continues from: the final report (its verdict, its F^ update with
        # diag.every=0) is not part of training.
        trainer.diagnostics_before_final = copy.deepcopy(trainer.diagnostics.state_dict())
        row = trainer.diagnostics.final_report(trainer.step, self.last_out)
        trainer.logger.log(
            {"step": trainer.step, "epoch": trainer.step // trainer.steps_per_epoch, **row}, group="diag_final"
        )
        self.last_out = None


class LogCallback(Callback):
    """A ``train`` row (loss, lr, EMA momentum, images/s) every ``train.log_every`` steps and at the last step;
    the row is also ``trainer.last_log``. In a multi-process run the loss is the mean over the processes (one
    scalar all-reduce on a logged step), the loss of the global batch: process 0's own was logged before."""

    def on_fit_start(self, trainer: Trainer) -> None:
        self.images, self.since = 0, time.time()

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        self.images += trainer.global_batch
        if trainer.step % trainer.cfg.train.log_every == 0 or trainer.step == trainer.last_step:
            ips = self.images / max(time.time() - self.since, 1e-9)
            self.images, self.since = 0, time.time()
            loss = torch.as_tensor(result.loss).detach().float().reshape(())
            if distributed.is_distributed():  # every process logs the same steps: this collective matches up
                loss = distributed.all_reduce_mean(loss.clone())
            trainer.last_log = {
                "step": trainer.step,
                "epoch": trainer.epoch,
                "loss": float(loss),
                "lr": result.lr,
                "ema": result.ema,
                "images_per_second": ips,
            }
            if trainer.loss_scale is not None:  # fp16: the loss scale, and the steps it skipped so far
                trainer.last_log |= {
                    "loss_scale": trainer.loss_scale,
                    "amp_skipped_steps": trainer.amp_skipped_steps,
                }
            trainer.logger.log(trainer.last_log)


class EvalCallback(Callback):
    """kNN every ``eval.knn_every`` epochs (not after the last step: the final evaluation follows), into
    ``trainer.knn_history`` and an ``eval`` row. With ``eval.online_probe`` the test features it computed are kept
    in ``trainer.eval_features`` (``step``, ``test``, ``test_labels``) for :class:`OnlineProbeCallback`."""

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        every = trainer.cfg.eval.knn_every
        if every and epoch % every == 0 and trainer.step < trainer.last_step:
            features: dict[str, Any] | None = {"step": trainer.step} if trainer.cfg.eval.online_probe else None
            res = evaluate(
                trainer.method,
                trainer.data,
                trainer.cfg,
                trainer.device,
                linear=False,
                autocast_dtype=trainer.autocast_dtype,
                features=features,
            )
            trainer.eval_features = features
            res.pop("knn_k_used", None)  # the same every epoch: summary.json gives it once
            trainer.knn_history.append({"epoch": epoch, "step": trainer.step, **res})
            trainer.logger.log({"step": trainer.step, "epoch": epoch, **res}, group="eval")
            trainer.method.train()


class OnlineProbeCallback(Callback):
    """The online linear probe (``eval.online_probe``), as solo-learn and lightly train one: a linear classifier on
    the detached backbone features ``h1`` of every step's first view, trained by its own SGD (``eval.online_probe_lr``,
    momentum 0.9) on the batch's labels (unlabelled images, label -1, are left out).

    Nothing flows back into the model (the features are detached, the classifier starts at zero and draws no random
    numbers), so a run trains the same weights with the probe on or off. A ``probe`` row holds its train top-1
    (percent, over the steps since the previous ``train.log_every`` row) and mean loss every ``train.log_every``
    steps and at the last step, and its test top-1 on the test features of each periodic kNN evaluation and of the
    final evaluation (in-memory data sets; the final one also in ``summary.json``: ``online_probe_test_top1``). Its
    weights, optimiser and running counts are in the checkpoint (``state_key``), so a resumed run continues it
    exactly. In multi-process runs the probe's loss is the mean over the global batch's labelled
    images (the processes' labelled counts may differ) and its counts are summed every step (every process holds the
    global counts, which the checkpoint keeps).
    """

    state_key = "online_probe"

    def __init__(self) -> None:
        self.probe: torch.nn.Linear | None = None
        self.optimizer: torch.optim.SGD | None = None
        # (correct, labelled, loss sum) since the last logged row, float64 on the probe's device: summed there every
        # step and read on the host only when a row is logged or a checkpoint written (a per-step .tolist() would
        # wait for the device every step). float64 holds the counts exactly and adds the losses as Python floats do.
        self.counts: torch.Tensor | None = None

    def _build(self, trainer: Trainer, dim: int) -> None:
        self.probe = torch.nn.Linear(dim, trainer.data.num_classes).to(trainer.device)
        with torch.no_grad():  # zero init: no draw from the global generator
            self.probe.weight.zero_()
            self.probe.bias.zero_()
        self.optimizer = torch.optim.SGD(self.probe.parameters(), lr=trainer.cfg.eval.online_probe_lr, momentum=0.9)
        self.counts = torch.zeros(3, dtype=torch.float64, device=trainer.device)

    def _read_counts(self) -> tuple[int, int, float]:
        """(correct, labelled, loss sum) on the host: a device sync."""
        if self.counts is None:
            return 0, 0, 0.0
        correct, seen, loss_sum = self.counts.tolist()
        return int(correct), int(seen), loss_sum

    def on_fit_start(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if not trainer.cfg.eval.online_probe:
            return
        if not result.skipped and result.out is not None and result.labels is not None:
            h = result.out.h1.detach().float()
            if self.probe is None:
                self._build(trainer, h.shape[1])
            assert self.probe is not None and self.optimizer is not None
            y = result.labels.to(h.device)
            keep = y >= 0
            with torch.enable_grad():
                logits = self.probe(h)
                losses = torch.nn.functional.cross_entropy(logits, y.clamp(min=0), reduction="none") * keep
                self.optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()  # divided by the global batch's labelled count below
            # One collective: (correct, labelled, loss sum) and the gradient sums of the global batch. Every process
            # keeps the global counts, so the checkpoint (rank 0's) holds them, and the loss is the mean over the
            # global batch's labelled images.
            counts = [((logits.argmax(1) == y) & keep).sum(), keep.sum(), losses.detach().sum()]
            grads = [q.grad for q in self.probe.parameters() if q.grad is not None]
            flat = torch.cat([torch.stack(counts).double(), *(g.flatten().double() for g in grads)])
            if trainer.world > 1:
                distributed.all_reduce_sum(flat)
            step_counts, n, offset = flat[:3], flat[1].clamp(min=1), 3
            for g in grads:
                g.copy_((flat[offset : offset + g.numel()] / n).view_as(g))
                offset += g.numel()
            self.optimizer.step()
            assert self.counts is not None
            self.counts += step_counts
        if trainer.step % trainer.cfg.train.log_every == 0 or trainer.step == trainer.last_step:
            correct, seen, loss_sum = self._read_counts()
            if seen:
                trainer.logger.log(
                    {
                        "step": trainer.step,
                        "epoch": trainer.epoch,
                        "probe_train_top1": 100.0 * correct / seen,
                        "probe_loss": loss_sum / seen,
                    },
                    group="probe",
                )
            if trainer.step % trainer.cfg.train.log_every == 0 and self.counts is not None:  # not at a max_steps
                self.counts.zero_()  # stop: a resume goes on counting

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        self.test(trainer, epoch)

    def test(self, trainer: Trainer, epoch: int) -> float | None:
        """The probe's test top-1 on the test features an evaluation of this step computed
        (``trainer.eval_features``), logged as a ``probe`` row; None (nothing logged) without a probe or features."""
        feats = trainer.eval_features
        if self.probe is None or feats is None or feats.get("step") != trainer.step or "test" not in feats:
            return None
        with torch.no_grad():
            pred = self.probe(feats["test"].float()).argmax(1).cpu()
        top1 = 100.0 * float((pred == feats["test_labels"].cpu()).float().mean())
        trainer.logger.log({"step": trainer.step, "epoch": epoch, "probe_test_top1": top1}, group="probe")
        return top1

    def state_dict(self) -> dict[str, Any]:
        if self.probe is None or self.optimizer is None:
            return {}
        return {
            "probe": self.probe.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "counts": list(self._read_counts()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        weight = state["probe"]["weight"]
        self._build(self.trainer, int(weight.shape[1]))
        assert self.probe is not None and self.optimizer is not None
        self.probe.load_state_dict(state["probe"])
        load_optimizer_state(self.optimizer, state["optimizer"])  # a resume may change eval.online_probe_lr
        assert self.counts is not None
        correct, seen, loss_sum = state["counts"]
        self.counts.copy_(torch.tensor([int(correct), int(seen), float(loss_sum)], dtype=torch.float64))


class ProgressCallback(Callback):
    """The progress bar (``train.progress``, rank 0): loss and images/s of the last ``train`` row, kNN lines."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.cfg.train.progress and distributed.is_main() and trainer.step < trainer.last_step:
            from tqdm import tqdm

            self.bar = tqdm(
                total=trainer.last_step,
                initial=trainer.step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                desc="train",
            )

    def on_step_end(self, trainer: Trainer, result: StepResult) -> None:
        if self.bar is None:
            return
        row = trainer.last_log
        if row is not None and row["step"] == trainer.step:
            self.bar.set_postfix(
                epoch=row["epoch"], loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_second']:.0f}", refresh=False
            )
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
            # On an epoch's last step the epoch end (kNN, kept checkpoint, probe test) is still to come: the
            # checkpoint says so, so that a process killed during it runs it on resume rather than skipping it.
            trainer.epoch_end_pending = trainer.step % trainer.steps_per_epoch == 0
            try:
                trainer.save()
            finally:
                trainer.epoch_end_pending = False

    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None:
        trainer.save(keep=epoch % trainer.cfg.train.checkpoint_every == 0)


def default_callbacks() -> list[Callback]:
    """The built-in callbacks, in their documented order."""
    return [
        DiagnosticsCallback(),
        LogCallback(),
        EvalCallback(),
        OnlineProbeCallback(),
        ProgressCallback(),
        CheckpointCallback(),
    ]
