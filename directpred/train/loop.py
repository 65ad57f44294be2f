"""The trainer: the training step, the ``fit`` loop, and the run's state (checkpoint, resume, summary).

One code path for 1 and N processes (torchrun), CPU or CUDA. Determinism and resume: the data order of an epoch is a
pure function of ``(seed, epoch)`` and the augmentation draws of a step a pure function of ``(seed, step)``
(:mod:`directpred.data.order`), so the complete training state is the model (online, target, predictor with F^ and
its counters), the optimiser and the step counter. A run stopped at any step boundary and resumed ends with the
same numbers as one that never stopped.

Everything around the step (logging, diagnostics, periodic kNN, progress bar, checkpoints) is a callback
(:mod:`directpred.train.callbacks`, where their order is documented); non-finite steps are handled by
:class:`directpred.train.faults.NonFiniteGuard`. The trainer has no process side effects: it raises
:class:`TrainingInterrupted` / :class:`TrainingDiverged` / :class:`TrainingError` and stops when asked
(:meth:`Trainer.request_stop`); signal handlers and exit codes belong to the command line.

Over 300 lines: the step, the loop and the state they change (setup, checkpoint, resume, summary) are one
object; the step itself (``optimize``) is 30 lines and everything around it is a callback.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from directpred import distributed
from directpred.backbones import resolve_channels_last
from directpred.config import Config, ConfigError, check_schedule, length_schedules, read_run_config
from directpred.data.augment import TwoViewAugment
from directpred.data.datasets import DataBundle, load_data_shared
from directpred.data.order import step_generator
from directpred.data.stream import (
    BatchSource,
    InMemorySource,
    StreamData,
    StreamSource,
    content_fingerprint,
    load_stream_data,
)
from directpred.data.views import view_recipes
from directpred.diagnostics.hook import Diagnostics
from directpred.eval.protocol import evaluate
from directpred.methods import build_method, ema_momentum
from directpred.runtime import describe_hardware, git_commit, hardware_text, resolve_device, resolve_precision
from directpred.train.callbacks import (
    Callback,
    DiagnosticsCallback,
    OnlineProbeCallback,
    StepResult,
    default_callbacks,
)
from directpred.train.checkpoint import (
    CheckpointError,
    atomic_write_json,
    check_param_groups,
    load_checkpoint,
    load_model_state,
    save_checkpoint,
    stored_config,
)
from directpred.train.faults import (
    DIVERGENCE_SUSPECTS,
    NonFiniteGuard,
    TrainingDiverged,
    TrainingError,
    TrainingInterrupted,
    fault_message,
)
from directpred.train.logger import RunLogger, check_backends, epoch_end_row, final_evaluation_row
from directpred.train.optim import build_optimizer, load_optimizer_state, lr_factor, set_lr
from directpred.train.rundir import (
    RESUMABLE_CHANGES,
    check_resume_config,
    finished_summary,
    fixed_changes,
    prepare_run_dir,
    record_command,
)

__all__ = [
    "Trainer",
    "TrainingError",
    "TrainingDiverged",
    "TrainingInterrupted",
    "StepResult",
    "RESUMABLE_CHANGES",
    "check_resume_config",
]


def make_batch_source(cfg: Config, data: DataBundle | StreamData, device: torch.device) -> BatchSource:
    """This process's training batches: gathered from memory, or read and decoded lazily (``data.stream``)."""
    rank, world = distributed.rank(), distributed.world_size()
    if isinstance(data, StreamData):
        decode = cfg.data.decode
        if decode == "auto":
            decode = "cuda" if device.type == "cuda" else "cpu"
        if decode == "cuda" and device.type != "cuda":
            raise ConfigError("data.decode=cuda needs a CUDA training device; use data.decode=cpu or auto")
        return StreamSource(
            data.pretrain.reader,
            data.decode_size,
            batch_size=cfg.train.batch_size,
            seed=cfg.train.seed,
            rank=rank,
            world=world,
            workers=cfg.data.workers,
            skip_corrupt=cfg.data.skip_corrupt,
            decode_device=device if decode == "cuda" else None,
            jpeg_decoder=cfg.data.jpeg_decoder,
            pin_memory=device.type == "cuda" and decode != "cuda",
        )
    return InMemorySource(
        data.pretrain.images,
        batch_size=cfg.train.batch_size,
        seed=cfg.train.seed,
        rank=rank,
        world=world,
        labels=data.pretrain.labels,
    )


def convert_sync_batchnorm(method: nn.Module) -> None:
    """Swap every BatchNorm of ``method``'s online branch, and of its target if it has one, for a SyncBatchNorm, in
    place (``train.sync_bn``).

    BYOL's target runs in train mode, so its BatchNorms normalise with batch statistics too: global ones, as in one
    process and in BYOL's cross-replica BN. It runs on every rank every step, so its collectives line up. Buffers
    and ``state_dict`` keys are unchanged, so the EMA and checkpoints pair the modules as before.
    """
    # torch's hint returns a plain Module; the objects are the same OnlineBranch / Encoder with BatchNorms swapped
    method.online = nn.SyncBatchNorm.convert_sync_batchnorm(method.online)
    if getattr(method, "target", None) is not None:
        method.target = nn.SyncBatchNorm.convert_sync_batchnorm(method.target)


class Trainer:
    """Train a :class:`Config` into ``run_dir`` (or continue the run there with ``resume=True``).

    Constructing a trainer does nothing else: :meth:`setup` (called by :meth:`fit`) joins the process group,
    prepares the run directory, loads the data and builds the model. ``callbacks`` run after the built-in ones;
    ``stop`` is an optional ``threading.Event``-like flag that asks the run to stop after the current step, as
    :meth:`request_stop` does. ``accept_changed_images`` lets a resume go on (with a warning) on data whose image
    count, classes and size match the checkpoint's but whose sampled images differ (a corrupt file replaced by a good
    copy; the CLI's ``--resume RUN --force``).

    Example:
        >>> cfg = load_config("configs/cpu/quickstart.yaml")  # doctest: +SKIP
        >>> summary = Trainer(cfg, "runs/qs").fit()  # doctest: +SKIP
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        resume: bool = False,
        command: str = "",
        data: DataBundle | StreamData | None = None,
        callbacks: list[Callback] | None = None,
        stop: threading.Event | None = None,
        accept_changed_images: bool = False,
    ) -> None:
        self.cfg, self.run_dir, self.resume, self.command = cfg, Path(run_dir), resume, command
        self.accept_changed_images = accept_changed_images
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._given_data = data  # used by setup() instead of loading cfg.data
        self.callbacks = default_callbacks() + list(callbacks or [])
        self._stop = stop if stop is not None else threading.Event()
        self.stop_signal: int | None = None  # the signal that asked for the stop, if one did
        self.collapse_stop = False  # set by the diagnostics callback (diag.stop_on_collapse)
        self._ready = False
        # In the final evaluation: its checkpoint is written, so a stop there need not wait for it to end (the
        # CLI's handler stops it at once; a resume evaluates again).
        self.evaluating = False

    def request_stop(self, signum: int | None = None) -> None:
        """Stop after the current step: write the checkpoint and raise :class:`TrainingInterrupted` (safe to call
        from a signal handler or another thread)."""
        if self.stop_signal is None:
            self.stop_signal = signum
        self._stop.set()

    @property
    def ready(self) -> bool:
        """Whether :meth:`setup` has finished (the process group joined, the data loaded, the model built and any
        checkpoint loaded): before, a stop has nothing to checkpoint."""
        return self._ready

    @property
    def stop_requested(self) -> bool:
        """Whether a stop was asked for (:meth:`request_stop`, or the ``stop`` event given to the trainer): the run
        stops after the current step. A stop on collapse (``diag.stop_on_collapse``) is not counted here."""
        return self._stop.is_set()

    # ------------------------------------------------------------------------------------------------------------
    def setup(self) -> Trainer:
        """Join the process group, prepare the run directory, load the data, build model and optimiser, load the
        checkpoint to resume. Called by :meth:`fit`; once."""
        if self._ready:
            return self
        cfg = self.cfg
        check_schedule(cfg)  # a warm-up longer than the run: refused before any work
        check_backends(cfg.log.backends)  # a missing tracker package fails here, before any work
        self.device = resolve_device(cfg.train.device)
        distributed.init_from_env(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.autocast_dtype = resolve_precision(cfg.train.precision, self.device)
        prepare_run_dir(self.run_dir, resume=self.resume)
        self.commit = git_commit()  # once per run

        torch.manual_seed(cfg.train.seed)  # the same initialisation on every rank
        data = self._given_data
        if data is None and cfg.data.stream:
            data = load_stream_data(cfg.data)  # lists the files (or reads the shards' headers); decodes nothing
        if data is None:  # rank 0 decodes and caches first; the others read its cache, or stop if it failed
            data = load_data_shared(cfg.data, seed=cfg.train.seed)
        if isinstance(data, DataBundle) and self.device.type == "cuda" and data.pretrain.images.numel() < 8 * 2**30:
            # Keep the decoded uint8 images on the GPU: batches are gathered and augmented there.
            data.pretrain.images = data.pretrain.images.to(self.device)
        self.data: DataBundle | StreamData = data
        self.augment = TwoViewAugment(*view_recipes(cfg, data))
        self._build_model()

        self.global_batch = cfg.train.batch_size * self.world
        self.source = make_batch_source(cfg, data, self.device)
        self.steps_per_epoch = self.source.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} x {self.world} process(es) is larger than "
                f"the {len(data.pretrain)} training images; lower the batch size"
            )
        # The data's digest for the checkpoint's data record: it reads a few files when streamed, so one that cannot
        # be read fails here, before any step.
        self._content = content_fingerprint(data.pretrain, skip_corrupt=cfg.data.skip_corrupt)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.last_step = self.total_steps if not cfg.train.max_steps else min(cfg.train.max_steps, self.total_steps)
        check_schedule(cfg, steps_per_epoch=self.steps_per_epoch)  # the warm-up in steps: round() may stretch it
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.step = self.epoch = 0
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient (train.skip_nonfinite)
        # fp16: steps whose gradients the GradScaler found non-finite and did not apply (it lowers its scale on each)
        self.amp_skipped_steps = 0
        self.epoch_end_pending = False  # stopped on an epoch's last step before that epoch's end ran
        # The run's last step ended an epoch: that epoch's end left its kNN to the final evaluation, so a run extended
        # from here (train.epochs or train.max_steps raised on resume) runs that epoch's end again first.
        self.epoch_end_final = False
        self.skipped_stream_before = self._skipped_stream_total = 0  # streamed corrupt files (before this process)
        self.last_checkpoint: tuple[Path, int] | None = None  # (file, step) of the last checkpoint written
        self.last_log: dict[str, Any] | None = None  # the last ``train`` row (LogCallback)
        self.train_seconds = 0.0
        self.wall_before = 0.0
        self.knn_history: list[dict[str, float]] = []
        self.eval_features: dict[str, Any] | None = None  # the last kNN's test features (with eval.online_probe)
        # Also with diag.every=0: the final report on the final state always judges the run (summary.json).
        self.diagnostics = Diagnostics(cfg, self.method)
        # The diagnostics' state before the final report (set by DiagnosticsCallback.on_train_end): what a run
        # extended from the final checkpoint continues from, as the final report is no part of training.
        self.diagnostics_before_final: dict[str, Any] | None = None
        self._t_start = time.time()
        if self.resume:
            self._load(self.ckpt_dir / "last.pt")
            if self.step > self.last_step:  # refused on every process (each loaded the same step)
                limit, fix = f"train.epochs={cfg.train.epochs} ({self.total_steps} steps)", "train.epochs"
                if cfg.train.max_steps and cfg.train.max_steps < self.total_steps:
                    limit, fix = f"train.max_steps={cfg.train.max_steps}", "train.max_steps"
                # Evaluating the longer checkpoint under the shorter length would leave a run whose config.yaml
                # and summary.json disagree (as the sweep refuses to report such a run as a shorter cell).
                raise ConfigError(
                    f"{self.run_dir}: the checkpoint is at step {self.step} (epoch "
                    f"{self.step / self.steps_per_epoch:g}), past {limit}: a run cannot be made shorter. Resume "
                    f"without changing {fix} to keep it as it is (or with a larger value to train on); evaluate it "
                    f"with `directpred eval {self.run_dir}`; for a shorter run, start a new one"
                )
            elif (
                self.step == self.last_step < self.total_steps
                and (self.run_dir / "summary.json").exists()
                and distributed.is_main()
            ):  # e.g. --set train.epochs=N on a run that train.max_steps ended (not one stopped on its last step)
                warnings.warn(
                    f"train.max_steps={cfg.train.max_steps}: the run is at step {self.step} already, so there is "
                    f"nothing to train; --set train.max_steps=0 (or a larger value) trains on to train.epochs="
                    f"{cfg.train.epochs} ({self.total_steps} steps)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._check_forced_changes()
        # fp16: the loss scale the next step starts from (the checkpoint's on resume), to tell a skipped step by
        self.loss_scale: float | None = self.scaler.get_scale() if self.scaler.is_enabled() else None
        # Set up: the command is one that trains or evaluates here (a refused one is not recorded).
        record_command(self.run_dir, cfg, resume=self.resume, command=self.command)
        # After the load: rows a killed process logged past the checkpoint are dropped, as they will be redone.
        self.logger = RunLogger(
            self.run_dir, start_step=self.step, backends=cfg.log.backends, config=cfg.to_dict(), project=cfg.log.project
        )
        self._ready = True
        return self

    def _check_forced_changes(self) -> None:
        """Refuse a resume whose changes beyond :data:`RESUMABLE_CHANGES` (accepted with ``--force``) no step would
        train with: the run has trained all its steps (or was stopped on collapse, and stays stopped), so its
        ``config.yaml`` would claim settings that not one step used, and its final evaluation, run again, would be
        filed under them."""
        collapse_stopped = bool((self._resume_diag_state or {}).get("collapsed")) and self.cfg.diag.stop_on_collapse
        if self.step < self.last_step and not collapse_stopped:
            return
        # What the steps trained with: the checkpoint's configuration (config.yaml may have been edited, or rewritten
        # by a --force resume killed before its first checkpoint); config.yaml for a checkpoint without one.
        trained = self._trained_config
        if trained is None:
            try:
                trained = read_run_config(self.run_dir)
            except ConfigError:  # nothing readable to compare with: the resume goes on as before
                return
        forced = fixed_changes(trained, self.cfg)
        if forced:
            still_stopped = collapse_stopped and self.step < self.last_step
            max_steps = self.cfg.train.max_steps
            if still_stopped:
                why = f"was stopped on collapse at step {self.step} and diag.stop_on_collapse=true keeps it stopped"
                more = "--set diag.stop_on_collapse=false"
            elif 0 < max_steps < self.total_steps:
                why = f"has trained all its {self.last_step} steps (train.max_steps={max_steps})"
                more = f"--set train.max_steps=N (N > {self.step}, or 0 to train to train.epochs)"
            else:
                why = f"has trained all its {self.last_step} steps (train.epochs={self.cfg.train.epochs})"
                more = f"--set train.epochs=N (N > {self.cfg.train.epochs})"
            raise ConfigError(
                f"resume with changes to {', '.join(forced)} (--force): the run in {self.run_dir} {why}, so no step "
                f"would train with them and its config.yaml would claim them; to train on with them, resume with "
                f"{more} as well, or start a new run from {self.run_dir / 'config.yaml'} with --out"
            )

    def _build_model(self) -> None:
        cfg = self.cfg
        self.method = build_method(cfg).to(self.device)
        self.channels_last = resolve_channels_last(cfg.train.channels_last, self.method, self.device)
        if self.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # In place (state_dict keys unchanged) and only the encoder: the predictor's update (eigh, copy_ into
            # W_p) would only cause graph breaks.
            self.method.online.encoder.compile()
        self.world = distributed.world_size()
        self.online_call: nn.Module | None = None  # what the method calls as its online branch (DDP's wrapper)
        if self.world > 1:
            online: nn.Module = self.method.online
            if cfg.train.sync_bn:
                if self.device.type != "cuda":
                    raise ConfigError(
                        f"train.sync_bn=true needs CUDA devices (torch's SyncBatchNorm runs only on GPUs), but these "
                        f"{self.world} processes train on {self.device.type}; set train.sync_bn=false (each process "
                        "then normalises its own share of the batch)"
                    )
                convert_sync_batchnorm(self.method)
                online = self.method.online
            if any(p.requires_grad for p in online.parameters()):
                self.online_call = nn.parallel.DistributedDataParallel(
                    online, device_ids=[self.device.index] if self.device.type == "cuda" else None
                )
        self.optimizer = build_optimizer(cfg.optim, self.method.online.encoder, self.method.online.predictor)
        self.scaler = torch.amp.GradScaler(enabled=self.autocast_dtype == torch.float16)
        self.guard = NonFiniteGuard(self.method, cfg.train.skip_nonfinite)

    # ------------------------------------------------------------------------------------------------------------
    # The training step

    def _batch(self, order: torch.Tensor, step_in_epoch: int) -> torch.Tensor:
        start = step_in_epoch * self.global_batch + distributed.rank() * self.cfg.train.batch_size
        idx = order[start : start + self.cfg.train.batch_size]
        assert isinstance(self.data, DataBundle)  # a test helper: in-memory images only
        images = self.data.pretrain.images
        return images[idx.to(images.device)]

    def views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two augmented views of this step's uint8 batch (the data pipeline), on the training device."""
        images = images.to(self.device, non_blocking=True)
        x1, x2 = self.augment(
            images, step_generator(self.cfg.train.seed, self.step), shard=(distributed.rank(), self.world)
        )
        if self.channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        return x1, x2

    def train_step(self, images: torch.Tensor) -> StepResult:
        """One optimiser step on this step's uint8 batch."""
        return self.optimize(*self.views(images))

    def optimize(self, x1: torch.Tensor, x2: torch.Tensor) -> StepResult:
        """Forward, predictor update, loss, backward, optimiser and EMA on two augmented views."""
        cfg = self.cfg
        lr = set_lr(
            self.optimizer, cfg.optim.lr, lr_factor(self.step, self.total_steps, self.warmup_steps, cfg.optim.schedule)
        )
        m = ema_momentum(self.step, self.total_steps, cfg.method.ema, cfg.method.ema_schedule)
        snapshot = self.guard.snapshot()  # what a skipped step restores (train.skip_nonfinite)
        try:
            with torch.autocast(
                self.device.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
            ):
                # Projections, then (update_at=forward) predictor.update, predictions, the loss: see Siamese.forward.
                out = self.method(x1, x2, online=self.online_call)
        except FloatingPointError as exc:  # the predictor refused non-finite statistics (the same on every rank)
            return self._skip(str(exc), snapshot, lr, m)
        self.optimizer.zero_grad(set_to_none=True)
        # Backward even for a non-finite loss: DDP's gradient all-reduce is a collective every rank joins.
        self.scaler.scale(out.loss).backward()
        # fp16: the scaler skips infs. Agreed over the processes (one all-reduce), so all skip or step together.
        fault = self.guard.fault(out.loss, check_grads=not self.scaler.is_enabled())
        if fault is not None:
            return self._skip(fault, snapshot, lr, m)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled():  # fp16: one read of the scale a step (a device sync), kept for the train rows
            scale = self.scaler.get_scale()
            if self.loss_scale is not None and scale < self.loss_scale:  # it only falls on inf/NaN gradients,
                self.amp_skipped_steps += 1  # whose step the scaler left unapplied
            self.loss_scale = scale
        try:  # update_at=after_step: F^ gets this step's projections and W_p is set (the authors' order)
            self.method.update_predictor(out)
        except FloatingPointError as exc:  # the parameters have been stepped already: this cannot be skipped
            raise TrainingDiverged(self._fault_message(str(exc))) from None
        self.method.update_target(m)  # EMA
        self.step += 1
        return StepResult(out.loss.detach(), lr, m, out)

    def _skip(self, fault: str, snapshot: dict[str, torch.Tensor] | None, lr: float, m: float) -> StepResult:
        """Skip a non-finite step (undo what its forward changed, count it) or raise :class:`TrainingDiverged`."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.skipped_steps >= self.cfg.train.skip_nonfinite:
            raise TrainingDiverged(self._fault_message(fault))
        self.guard.undo(snapshot)
        self.skipped_steps += 1
        warnings.warn(
            f"step {self.step + 1}: {fault}; step skipped ({self.skipped_steps} of at most "
            f"{self.cfg.train.skip_nonfinite}, train.skip_nonfinite)",
            RuntimeWarning,
            stacklevel=3,
        )
        self.step += 1  # the data order and augmentation draws stay functions of the step
        return StepResult(torch.tensor(float("nan")), lr, m, None, skipped=True)

    def _fault_message(self, fault: str) -> str:
        # The step being taken, numbered as metrics.jsonl and TensorBoard number it (self.step steps are done).
        from directpred.config import flatten

        now, default = flatten(self.cfg.to_dict()), flatten(Config().to_dict())
        changed = {k: now[k] for k in DIVERGENCE_SUSPECTS if now.get(k) != default.get(k)}
        return fault_message(fault, self.step + 1, self.cfg.optim.lr, self.run_dir, self.last_checkpoint, changed)

    # ------------------------------------------------------------------------------------------------------------
    # The loop

    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (or ``train.max_steps``), evaluate, write ``summary.json``; returns it.

        Raises :class:`TrainingInterrupted` (after writing the checkpoint) when a stop was requested,
        :class:`TrainingDiverged` on non-finite steps beyond ``train.skip_nonfinite``.
        """
        if self.resume:
            finished = finished_summary(self.run_dir, self.cfg)
            if finished is not None:  # it had finished with this configuration: nothing to train, evaluate or write
                return {**finished, "already_finished": True}
        self.setup()
        self._t_start = time.time()
        if self._resume_diag_state:
            self.diagnostics.load_state_dict(self._resume_diag_state)
            # A run stopped on collapse, resumed with the stop still on (e.g. to evaluate it otherwise): not one
            # step more (the stop acted only at the next diagnostics report, up to diag.every steps later).
            self.collapse_stop = self.diagnostics.collapsed and self.cfg.diag.stop_on_collapse
        if self.resume and (self.collapse_stop or self.step >= self.last_step):
            self.logger.drop_rows_at(self.step, final_evaluation_row)  # nothing to train: evaluated again
        self.method.train()
        for cb in self.callbacks:
            cb.on_fit_start(self)
            if cb.state_key and cb.state_key in self._resume_callback_state:
                cb.load_state_dict(self._resume_callback_state[cb.state_key])
        try:
            stopped = self.collapse_stop or self._loop()
        except BaseException:
            self.logger.close()  # the trackers' runs end (W&B, MLflow) with the failed run
            raise
        finally:
            for cb in self.callbacks:
                cb.on_loop_end(self)
        if stopped and not self.collapse_stop:
            if self.step >= self.last_step:  # stopped on the last step: the final report needs that step's output
                for cb in self.callbacks:
                    if isinstance(cb, DiagnosticsCallback):
                        cb.final_report(self)
            self.save()
            self.logger.close()
            raise TrainingInterrupted(
                self.stop_signal, self.step, self.ckpt_dir / "last.pt", self.run_dir, world=self.world
            )
        for cb in self.callbacks:
            cb.on_train_end(self)
        self.save()
        if self._agreed(self.stop_requested):  # asked for after the loop's last check (last epoch end, report)
            self.logger.close()
            raise TrainingInterrupted(
                self.stop_signal, self.step, self.ckpt_dir / "last.pt", self.run_dir, world=self.world, evaluating=True
            )
        self.evaluating = True
        summary = self.finish(stopped_early=self.collapse_stop)
        self.evaluating = False
        self.logger.close()
        return summary

    def _loop(self) -> bool:
        """Steps up to ``last_step``, epoch by epoch; True if stopped on request (or on collapse)."""
        if self.epoch_end_pending or (self.epoch_end_final and self.step < self.last_step):
            # Resumed from a stop on an epoch's last step (that epoch's end comes first), or a run that ended on an
            # epoch boundary is extended: its epoch end is run again as an uninterrupted run would have run it
            # (periodic kNN, online probe test, the kept checkpoint with them).
            # Rows an epoch end already logged give way to its rerun: the final evaluation's probe test row (a run
            # extended), or the kNN and probe test rows of an epoch end a kill cut short after the step checkpoint.
            self.logger.drop_rows_at(self.step, epoch_end_row)
            self.epoch_end_pending = False
            self._end_epoch(self.step // self.steps_per_epoch)
        while self.step < self.last_step:
            self.epoch, i = divmod(self.step, self.steps_per_epoch)
            # This process's batches from this step on, with their labels (for the online probe only).
            batches = self.source.labelled_batches(self.epoch, i)
            try:
                while i < self.steps_per_epoch and self.step < self.last_step:
                    t0 = time.time()
                    images, labels = next(batches)
                    result = self.train_step(images)
                    result.labels = labels
                    self.train_seconds += time.time() - t0
                    i += 1
                    for cb in self.callbacks:
                        cb.on_step_end(self, result)
                    if self._stop_agreed():
                        # stopped on an epoch's last step: its end (kNN, epoch checkpoint) is run on resume
                        self.epoch_end_pending = i == self.steps_per_epoch
                        return True
            finally:
                batches.close()  # ends a streamed epoch's worker processes
            if i == self.steps_per_epoch:
                self._end_epoch(self.epoch + 1)
        return False

    def _end_epoch(self, epoch: int) -> None:
        """The callbacks' epoch end after ``epoch`` epochs (``self.step`` is that epoch's last step)."""
        self.epoch_end_final = self.step >= self.last_step  # before the callbacks: their checkpoint records it
        for cb in self.callbacks:
            cb.on_epoch_end(self, epoch)

    def _stop_agreed(self) -> bool:
        """Whether to stop now: requested here, on collapse, or (multi-process) on any rank, so all stop together."""
        return self._agreed(self.stop_requested or self.collapse_stop)

    def _agreed(self, requested: bool) -> bool:
        """``requested`` on any rank (a collective when multi-process). A rank that got no signal itself takes the
        signal another rank got, so that every rank (rank 0 reports) names it and exits with its code."""
        if self.world == 1:
            return requested
        # every step: one all-reduce and one host read (the largest signal number stands for the stop's signal)
        flags = torch.tensor([float(requested), float(self.stop_signal or 0)], device=self.device)
        anyone, signum = (int(v) for v in distributed.all_reduce_max(flags).tolist())
        if self.stop_signal is None and signum > 0:
            self.stop_signal = signum
        return anyone > 0

    # ------------------------------------------------------------------------------------------------------------
    # State: checkpoint, resume, summary

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "amp_skipped_steps": self.amp_skipped_steps,
            "epoch_end_pending": self.epoch_end_pending,
            "epoch_end_final": self.epoch_end_final,
            "skipped_corrupt_stream": self._skipped_stream_total,
            "epoch": self.step // self.steps_per_epoch,
            "global_batch": self.global_batch,
            "world_size": self.world,
            "image_size": self.data.image_size,  # rebuilds the test-time transform (directpred export/embed)
            "data": self._data_record(),  # what the data order and the probe depend on: a resume checks it
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_before + (time.time() - self._t_start),
            "knn_history": self.knn_history,
            "diagnostics": self.diagnostics.state_dict(),
            "diagnostics_before_final": self.diagnostics_before_final,
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks if cb.state_key},
            "config": self.cfg.to_dict(),
            "git_commit": self.commit,
            "precision": self._precision_name(),  # as resolved here: train.precision=auto depends on the hardware
            "decoder": self._decoder_name(),  # as resolved here too: data.decode=auto depends on the device
            "hardware": describe_hardware(self.device),
        }

    def _decoder_name(self) -> str | None:
        """What decodes a streamed run's JPEGs here: ``pillow`` (the DataLoader workers) or the batched path's
        decoder (``torchcodec``/``torchvision``, nvJPEG on CUDA); None for in-memory data (decoded once, up front)."""
        if not isinstance(self.source, StreamSource):
            return None
        return self.source.jpeg_decoder or "pillow"

    def _precision_name(self) -> str:
        return str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "fp32"

    def _streamed_skips(self) -> int:
        """Corrupt files the streamed source replaced in this run so far, over all processes and resumes (every
        process calls this: a collective)."""
        count = torch.tensor([float(len(self.source.skipped))], device=self.device)
        if self.world > 1:
            distributed.all_reduce_sum(count)
        return self.skipped_stream_before + int(count.item())

    def save(self, *, keep: bool = False) -> None:
        """Write ``checkpoints/last.pt`` (and ``epoch_XXXX.pt`` with ``keep``) atomically, from rank 0 (every
        process calls it). If rank 0 cannot (non-finite weights, a full disk), every process raises."""
        self._skipped_stream_total = self._streamed_skips()

        def write() -> None:
            self.logger.flush()  # every event up to this step survives a later SIGKILL
            state = self._state()
            save_checkpoint(self.ckpt_dir / "last.pt", state)
            if keep:
                save_checkpoint(self.ckpt_dir / f"epoch_{state['epoch']:04d}.pt", state)

        distributed.on_main(write, "write the checkpoint", CheckpointError)  # not left in a 30-min barrier
        self.last_checkpoint = (self.ckpt_dir / "last.pt", self.step)

    def _data_record(self) -> dict[str, Any]:
        """What the run's data order (and the online probe's shape) depends on, beyond the global batch: recorded in
        the checkpoint, so that a resume on other data (``data.path`` may change, to a moved copy) is refused."""
        return {
            "train_images": len(self.data.pretrain),
            "classes": list(self.data.train.classes),
            "image_size": self.data.image_size,
            "steps_per_epoch": self.steps_per_epoch,
            "content": self._content,
        }

    def _check_same_data(self, saved: Any, path: Path) -> None:
        """Refuse to resume the checkpoint ``path`` on data other than it was trained on (its ``data`` record):
        steps would be reinterpreted inside epochs of another size, and the online probe would not fit. A checkpoint
        written before the record is not checked."""
        if not isinstance(saved, dict):
            return
        now = self._data_record()
        changed = [
            f"{what} {saved[key]} -> {now[key]}"
            for key, what in (
                ("train_images", "training images"),
                ("image_size", "image size"),
                ("steps_per_epoch", "steps per epoch"),
            )
            if key in saved and saved[key] != now[key]
        ]
        before = saved.get("classes")
        if isinstance(before, list) and before != now["classes"]:
            if len(before) != len(now["classes"]):
                changed.append(f"classes {len(before)} -> {len(now['classes'])}")
            else:
                names = [f"{a!r} -> {b!r}" for a, b in zip(before, now["classes"]) if a != b]
                changed.append("class names " + ", ".join(names[:3]) + (", ..." if len(names) > 3 else ""))
        kinds = [str(record.get("content", "")).partition(":")[0] for record in (saved, now)]
        if not changed and kinds[0] == kinds[1] and saved.get("content") != now["content"]:
            what = (
                "other images: the same count, classes and size, but a digest of their labels and of 32 of them differs"
            )
            if self.accept_changed_images:  # a corrupt file replaced by a good copy (--force)
                warnings.warn(f"{path}: resuming on {what} (accepted by --force)", stacklevel=2)
                return
            changed.append(f"{what}; if you replaced a corrupt file by a good copy, resume with --force")
        if changed:
            d = self.cfg.data
            source = f"data.path={d.path}" if d.path else f"data.dataset={d.dataset} in data.root={d.root}"
            raise TrainingError(
                f"{path} was trained on other data than {source} holds ({'; '.join(changed)}); resume with the "
                "run's own data (data.path may change only to a moved copy of it), or start a new run on this data"
            )

    _resume_diag_state: dict[str, Any] | None = None
    _content = ""  # the data's content_fingerprint, taken in setup (see _data_record)
    _trained_config: Config | None = None  # the configuration the resumed checkpoint was trained with
    _resume_callback_state: dict[str, Any] = {}

    def _load(self, path: Path) -> None:
        state = load_checkpoint(
            path, map_location=self.device, require=("model", "optimizer", "scaler", "step", "global_batch")
        )
        if state["global_batch"] != self.global_batch:
            raise TrainingError(
                f"{path} was trained with a global batch of {state['global_batch']} "
                f"({state['world_size']} process(es)); now it would be {self.global_batch}. Resume "
                "with the same batch_size x number of processes so the data order is unchanged"
            )
        self._check_same_data(state.get("data"), path)
        load_model_state(self.method, state["model"], path)
        check_param_groups(
            self.optimizer, state["optimizer"], path, saved_config=state.get("config"), config=self.cfg.to_dict()
        )
        load_optimizer_state(self.optimizer, state["optimizer"])  # optim.* as configured: config.yaml says so
        if state["scaler"] or not self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        # else: an fp32 or bf16 checkpoint resumed in fp16 (train.precision may change on resume): a disabled
        # GradScaler saved nothing, and fp16 starts from a fresh scale, as a new fp16 run does
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.amp_skipped_steps = int(state.get("amp_skipped_steps", 0))
        self.epoch_end_pending = bool(state.get("epoch_end_pending", False))
        self.epoch_end_final = bool(state.get("epoch_end_final", False))
        self.skipped_stream_before = int(state.get("skipped_corrupt_stream", 0))
        self.last_checkpoint = (path, self.step)
        self.train_seconds = float(state["train_seconds"])
        self.wall_before = float(state["wall_seconds"])
        self.knn_history = list(state.get("knn_history", []))
        self._resume_diag_state = state.get("diagnostics")
        if isinstance(state.get("config"), dict):
            with contextlib.suppress(ConfigError):  # written by another version: config.yaml stands in
                self._trained_config = stored_config(state, path)
        before_final = state.get("diagnostics_before_final")
        if before_final is not None and self.step < self.last_step:  # a finished run extended: drop its final report
            self._resume_diag_state = before_final
        else:
            self.diagnostics_before_final = before_final
        self._resume_callback_state = dict(state.get("callbacks", {}))
        saved_train = (state.get("config") or {}).get("train") or {}
        self._warn_if_rescheduled(saved_train.get("epochs"))
        before, now = state.get("precision"), self._precision_name()
        if before is not None and before != now and self.step < self.last_step and distributed.is_main():
            hw = state.get("hardware")
            where = f" on {hardware_text(hw)}" if isinstance(hw, dict) else ""
            setting = {"bfloat16": "bf16", "float16": "fp16"}.get(before, before)
            warnings.warn(
                f"{path} was trained in {before} up to step {self.step}{where}; train.precision="
                f"{self.cfg.train.precision} runs {now} here, so the steps to come differ in precision from those "
                f"taken (auto picks bf16 on CPUs with AMX and on GPUs, fp32 on other CPUs). To continue as the run "
                f"began: --set train.precision={setting}",
                RuntimeWarning,
                stacklevel=2,
            )

        decoded, decoder = state.get("decoder"), self._decoder_name()
        if decoded and decoder and decoded != decoder and self.step < self.last_step and distributed.is_main():
            setting = "cpu" if decoded == "pillow" else "cuda"
            warnings.warn(
                f"{path} was trained on images decoded by {decoded} up to step {self.step}; data.decode="
                f"{self.cfg.data.decode} decodes them with {decoder} here (auto is the GPU's nvJPEG on CUDA, Pillow in "
                "the workers on a CPU), whose pixels differ by a few grey levels, so the steps to come see other "
                f"images than those taken. To continue as the run began: --set data.decode={setting}",
                RuntimeWarning,
                stacklevel=2,
            )

    def _warn_if_rescheduled(self, epochs_before: int | None) -> None:
        """Warn when a resume with another ``train.epochs`` stretches or shrinks a cosine schedule under the steps
        still to come: the steps taken followed the old one, so the run equals neither length trained throughout."""
        cfg, step = self.cfg, self.step
        cosine = length_schedules(cfg)
        if not cosine or epochs_before is None or epochs_before == cfg.train.epochs or not 0 < step < self.last_step:
            return
        if not distributed.is_main():
            return
        old_total = self.steps_per_epoch * int(epochs_before)
        now = []
        if "optim.schedule" in cosine:
            lr_old, lr_new = (
                cfg.optim.lr * lr_factor(step, total, self.warmup_steps, cfg.optim.schedule)
                for total in (old_total, self.total_steps)
            )
            now.append(f"the learning rate is {lr_new:.4g} (was {lr_old:.4g})")
        if "method.ema_schedule" in cosine:
            m_old, m_new = (ema_momentum(step, n, cfg.method.ema, "cosine") for n in (old_total, self.total_steps))
            now.append(f"the EMA momentum is {m_new:.6g} (was {m_old:.6g})")
        warnings.warn(
            f"train.epochs {epochs_before} -> {cfg.train.epochs} on resume: the cosine schedule ({', '.join(cosine)}) "
            f"now runs over {self.total_steps} steps instead of {old_total}, so at step {step} {' and '.join(now)}. "
            f"The {step} steps taken followed the {epochs_before}-epoch schedule: the result is that of neither length "
            "trained throughout. To stop a run early and go on exactly, give train.epochs its full length from the "
            "start and stop with train.max_steps.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _evaluate_untrained(self) -> dict[str, Any]:
        """``eval.untrained``: the network this run started from, rebuilt as :meth:`setup` built it (the global
        generator seeded with ``train.seed``, then :func:`build_method`), evaluated by the final evaluation's protocol;
        its figures prefixed ``untrained_``. Run after the trained network's evaluation, with the random state kept
        apart (``fork_rng``), so no figure of the run itself moves."""
        cfg = self.cfg
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(cfg.train.seed)
            initial = build_method(cfg).to(self.device)
            if self.channels_last:
                initial = initial.to(memory_format=torch.channels_last)
            results = evaluate(
                initial, self.data, cfg, self.device, linear=cfg.eval.linear, autocast_dtype=self.autocast_dtype
            )
        return {f"untrained_{k}": v for k, v in results.items() if k != "knn_k_used"}

    def finish(self, *, stopped_early: bool = False) -> dict[str, Any]:
        """Final kNN + linear probe; writes ``summary.json`` (rank 0) and returns it."""
        cfg = self.cfg
        probe = next((cb for cb in self.callbacks if isinstance(cb, OnlineProbeCallback)), None)
        features: dict[str, Any] | None = {"step": self.step} if cfg.eval.online_probe and probe else None
        results = evaluate(
            self.method,
            self.data,
            cfg,
            self.device,
            linear=cfg.eval.linear,
            autocast_dtype=self.autocast_dtype,
            features=features,
        )
        untrained = self._evaluate_untrained() if cfg.eval.untrained else {}
        epochs_done = self.step / self.steps_per_epoch
        self.logger.log({"step": self.step, "epoch": math.floor(epochs_done), **results, **untrained}, group="final")
        if features is not None and probe is not None:  # the online probe on the final test features
            self.eval_features = features
            top1 = probe.test(self, math.floor(epochs_done))
            if top1 is not None:
                results["online_probe_test_top1"] = top1
        images = self.step * self.global_batch
        summary: dict[str, Any] = {
            **{k: None for k in ("knn_top1", "linear_top1", "linear_top1_best")},
            **results,
            **untrained,
            "epochs": round(epochs_done, 4),
            "steps": self.step,
            "images_per_second": images / self.train_seconds if self.train_seconds > 0 else None,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_before + (time.time() - self._t_start),
            "git_commit": self.commit,
            "world_size": self.world,
            "device": str(self.device),
            "hardware": describe_hardware(self.device),  # of the process that finished the run (rank 0)
            "precision": self._precision_name(),
            "method": cfg.method.name,
            "predictor": cfg.predictor.name,
            "knn_history": self.knn_history,
            "stopped_early": stopped_early,
            "jpeg_decoder": getattr(self.source, "jpeg_decoder", None),  # the batched (data.decode=cuda) decoder
            "skipped_corrupt": self.data.pretrain.skipped + self.data.test.skipped + self._streamed_skips(),
            "skipped_steps": self.skipped_steps,
            # fp16 only (0 otherwise): steps the GradScaler skipped; a few at the start, while it finds its scale
            "amp_skipped_steps": self.amp_skipped_steps,
            "eigh_fallbacks": int(getattr(self.method.predictor, "eigh_fallbacks", torch.zeros(())).item()),
        }
        summary.update(self.diagnostics.summary())
        # a full disk: every process stops with the reason (not in shutdown's barrier)
        distributed.on_main(
            lambda: atomic_write_json(self.run_dir / "summary.json", summary), "write summary.json", TrainingError
        )
        return summary
