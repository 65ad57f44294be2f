"""The training loop: one code path for 1 and N processes (torchrun), CPU or CUDA.

Determinism and resume: the data order of an epoch is a pure function of ``(seed, epoch)`` and the augmentation draws
of a step a pure function of ``(seed, step)``, so the complete training state is the model (online, target,
predictor with F^ and its counters), the optimiser and the step counter. A run stopped at any step boundary and
resumed ends with the same numbers as one that never stopped.
"""

from __future__ import annotations

import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from directpred import distributed
from directpred.backbones import resolve_channels_last
from directpred.config import Config, ConfigError, diff_configs, dump_config
from directpred.data.augment import TwoViewAugment
from directpred.data.datasets import DataBundle, load_data
from directpred.data.order import step_generator
from directpred.data.stream import BatchSource, InMemorySource, StreamData, StreamSource, load_stream_data
from directpred.data.views import view_recipes
from directpred.eval.protocol import evaluate
from directpred.methods import build_method, ema_momentum
from directpred.runtime import git_commit, resolve_device, resolve_precision
from directpred.train.checkpoint import (
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    remove_stale_temporaries,
    save_checkpoint,
)
from directpred.train.logger import RunLogger
from directpred.train.optim import build_optimizer, lr_factor, set_lr

# Settings that may change when a run is resumed: they do not alter what has been computed so far.
RESUMABLE_CHANGES = ("train.epochs", "train.max_steps", "train.progress", "train.log_every",
                     "train.checkpoint_every", "train.checkpoint_every_steps", "train.skip_nonfinite", "train.device",
                     "data.workers",
                     "data.cache_dir", "data.root", "data.path", "data.local_copy", "data.download", "eval.",
                     "diag.stop_on_collapse")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, changed config on resume, ...); the message says what to do."""


def make_batch_source(cfg: Config, data: DataBundle | StreamData, device: torch.device) -> BatchSource:
    """This process's training batches: gathered from memory, or read and decoded lazily (``data.stream``)."""
    rank, world = distributed.rank(), distributed.world_size()
    if isinstance(data, StreamData):
        decode = cfg.data.decode
        if decode == "auto":
            decode = "cuda" if device.type == "cuda" else "cpu"
        if decode == "cuda" and device.type != "cuda":
            raise ConfigError("data.decode=cuda needs a CUDA training device; use data.decode=cpu or auto")
        return StreamSource(data.pretrain.reader, data.decode_size, batch_size=cfg.train.batch_size,
                            seed=cfg.train.seed, rank=rank, world=world, workers=cfg.data.workers,
                            skip_corrupt=cfg.data.skip_corrupt, decode_device=device if decode == "cuda" else None)
    return InMemorySource(data.pretrain.images, batch_size=cfg.train.batch_size, seed=cfg.train.seed, rank=rank,
                          world=world)


class _StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop after the current step."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """Train a :class:`Config` into ``run_dir`` (or continue the run there with ``resume=True``).

    Example:
        >>> cfg = load_config("configs/cpu/quickstart.yaml")  # doctest: +SKIP
        >>> summary = Trainer(cfg, "runs/qs").fit()  # doctest: +SKIP
    """

    def __init__(self, cfg: Config, run_dir: str | Path, *, resume: bool = False,
                 command: str = "", data: DataBundle | StreamData | None = None) -> None:
        self.cfg, self.run_dir, self.resume = cfg, Path(run_dir), resume
        self.device = resolve_device(cfg.train.device)
        distributed.init_from_env(self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.autocast_dtype = resolve_precision(cfg.train.precision, self.device)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self._prepare_run_dir(command)

        torch.manual_seed(cfg.train.seed)  # the same initialisation on every rank
        if data is None and cfg.data.stream:
            data = load_stream_data(cfg.data)  # lists the files (or reads the shards' headers); decodes nothing
        if data is None:
            if not distributed.is_main():
                distributed.barrier()  # rank 0 decodes and caches first
            data = load_data(cfg.data, seed=cfg.train.seed)
            if distributed.is_main():
                distributed.barrier()
        if isinstance(data, DataBundle) and self.device.type == "cuda" and data.pretrain.images.numel() < 8 * 2**30:
            # Keep the decoded uint8 images on the GPU: batches are gathered and augmented there.
            data.pretrain.images = data.pretrain.images.to(self.device)
        self.data = data
        self.augment = TwoViewAugment(*view_recipes(cfg, data))

        self.method = build_method(cfg).to(self.device)
        self.channels_last = resolve_channels_last(cfg.train.channels_last, self.method, self.device)
        if self.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # In place (state_dict keys unchanged) and only the encoder: the predictor's update (eigh, copy_ into
            # W_p) would only cause graph breaks.
            self.method.online.encoder.compile()
        self.world = distributed.world_size()
        if self.world > 1:
            online: nn.Module = self.method.online
            if cfg.train.sync_bn:
                online = nn.SyncBatchNorm.convert_sync_batchnorm(online)
                self.method.online = online  # type: ignore[assignment]
            if any(p.requires_grad for p in online.parameters()):
                ddp = nn.parallel.DistributedDataParallel(
                    online, device_ids=[self.device.index] if self.device.type == "cuda" else None)
                self.method.use_wrapped_online(ddp)
        self.optimizer = build_optimizer(cfg.optim, self.method.online.encoder, self.method.online.predictor)
        self.scaler = torch.amp.GradScaler(enabled=self.autocast_dtype == torch.float16)

        self.global_batch = cfg.train.batch_size * self.world
        self.source = make_batch_source(cfg, data, self.device)
        self.steps_per_epoch = self.source.steps_per_epoch
        if self.steps_per_epoch < 1:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} x {self.world} process(es) is larger than "
                              f"the {len(data.pretrain)} training images; lower the batch size")
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.warmup_steps = round(cfg.optim.warmup_epochs * self.steps_per_epoch)
        self.step = 0
        self.skipped_steps = 0  # steps skipped for a non-finite loss or gradient (train.skip_nonfinite)
        self.last_checkpoint: tuple[Path, int] | None = None  # (file, step) of the last checkpoint written
        self.train_seconds = 0.0
        self.wall_before = 0.0
        self.knn_history: list[dict[str, float]] = []
        self.diagnostics = None  # set by directpred.train.diagnostics when available
        self._resume_diag_state = None
        self._t_start = time.time()
        if resume:
            self._load(self.ckpt_dir / "last.pt")
        # After the load: rows a killed process logged past the checkpoint are dropped, as they will be redone.
        self.logger = RunLogger(self.run_dir, start_step=self.step)
        self._make_diagnostics()

    # ------------------------------------------------------------------------------------------------------------
    def _prepare_run_dir(self, command: str) -> None:
        cfg_path = self.run_dir / "config.yaml"
        if distributed.is_main():
            if self.resume:
                if not (self.ckpt_dir / "last.pt").is_file():
                    raise TrainingError(f"nothing to resume in {self.run_dir}: no checkpoints/last.pt")
            elif (self.ckpt_dir / "last.pt").is_file():
                raise TrainingError(f"{self.run_dir} already holds a run; continue it with "
                                    f"`directpred train --resume {self.run_dir}` or choose another --out")
            # Fail before any work rather than at the first checkpoint (also on resume: the disk may be full now).
            try:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                probe = self.ckpt_dir / ".write_test"
                probe.write_bytes(b"ok")
                probe.unlink()
            except OSError as exc:
                raise TrainingError(f"cannot write to the run directory {self.run_dir}: {exc.strerror or exc}; "
                                    + ("free disk space or fix permissions, then resume" if self.resume else
                                       "choose a writable --out")) from None
            remove_stale_temporaries(self.ckpt_dir)  # left by a writer killed mid-write; never loaded
            if not self.resume:
                atomic_write_text(cfg_path, dump_config(self.cfg))
            with open(self.run_dir / "command.txt", "a") as f:
                f.write((command or " ".join(sys.argv)) + "\n")
        distributed.barrier()

    def _make_diagnostics(self) -> None:
        # Also with diag.every=0: the final report on the final state always judges the run (summary.json).
        try:
            from directpred.train.diagnostics import Diagnostics
        except ImportError:
            return
        self.diagnostics = Diagnostics(self.cfg, self.method)

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "epoch": self.step // self.steps_per_epoch,
            "global_batch": self.global_batch,
            "world_size": self.world,
            "image_size": self.data.image_size,  # rebuilds the test-time transform (directpred export/embed)
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_before + (time.time() - self._t_start),
            "knn_history": self.knn_history,
            "diagnostics": self.diagnostics.state_dict() if self.diagnostics is not None else None,
            "config": self.cfg.to_dict(),
            "git_commit": git_commit(),
        }

    def save(self, *, keep: bool = False) -> None:
        """Write ``checkpoints/last.pt`` (and ``epoch_XXXX.pt`` with ``keep``) atomically, from rank 0."""
        if distributed.is_main():
            self.logger.flush()  # every event up to this step survives a later SIGKILL
            state = self._state()
            save_checkpoint(self.ckpt_dir / "last.pt", state)
            if keep:
                save_checkpoint(self.ckpt_dir / f"epoch_{state['epoch']:04d}.pt", state)
        distributed.barrier()
        self.last_checkpoint = (self.ckpt_dir / "last.pt", self.step)

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path, map_location=self.device)
        if state["global_batch"] != self.global_batch:
            raise TrainingError(f"{path} was trained with a global batch of {state['global_batch']} "
                                f"({state['world_size']} process(es)); now it would be {self.global_batch}. Resume "
                                "with the same batch_size x number of processes so the data order is unchanged")
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last_checkpoint = (path, self.step)
        self.train_seconds = float(state["train_seconds"])
        self.wall_before = float(state["wall_seconds"])
        self.knn_history = list(state.get("knn_history", []))
        self._resume_diag_state = state.get("diagnostics")

    # ------------------------------------------------------------------------------------------------------------
    def _batch(self, order: torch.Tensor, step_in_epoch: int) -> torch.Tensor:
        start = step_in_epoch * self.global_batch + distributed.rank() * self.cfg.train.batch_size
        idx = order[start: start + self.cfg.train.batch_size]
        images = self.data.pretrain.images
        return images[idx.to(images.device)]

    def views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two augmented views of this step's uint8 batch (the data pipeline), on the training device."""
        images = images.to(self.device, non_blocking=True)
        x1, x2 = self.augment(images, step_generator(self.cfg.train.seed, self.step),
                              shard=(distributed.rank(), self.world))
        if self.channels_last:
            x1 = x1.contiguous(memory_format=torch.channels_last)
            x2 = x2.contiguous(memory_format=torch.channels_last)
        return x1, x2

    def train_step(self, images: torch.Tensor) -> dict[str, Any]:
        """One optimiser step on a uint8 batch; returns the loss and the step output."""
        return self.optimize(*self.views(images))

    def optimize(self, x1: torch.Tensor, x2: torch.Tensor) -> dict[str, Any]:
        """Forward, loss, backward, optimiser and EMA updates on augmented views (no data pipeline)."""
        cfg = self.cfg
        lr = set_lr(self.optimizer, cfg.optim.lr,
                    lr_factor(self.step, self.total_steps, self.warmup_steps, cfg.optim.schedule))
        m = ema_momentum(self.step, self.total_steps, cfg.method.ema, cfg.method.ema_schedule)
        snapshot = self._snapshot() if cfg.train.skip_nonfinite else None
        fault: str | None = None
        out = None
        try:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                out = self.method(x1, x2)
        except FloatingPointError as exc:  # the predictor refused non-finite statistics (the same on every rank)
            fault = str(exc)
        self.optimizer.zero_grad(set_to_none=True)
        if out is not None:
            # Backward even for a non-finite loss: under DDP the all-reduced gradient then tells every rank.
            self.scaler.scale(out.loss).backward()
            if not torch.isfinite(out.loss):
                fault = f"non-finite loss ({out.loss.item()})"
            elif not self.scaler.is_enabled() and self._grads_nonfinite():  # fp16: GradScaler skips inf steps
                fault = "non-finite gradient (the loss was finite)"
        if fault is not None:
            self.optimizer.zero_grad(set_to_none=True)
            if self.skipped_steps >= cfg.train.skip_nonfinite:
                raise TrainingError(self._fault_message(fault))
            self.method.load_state_dict(snapshot, strict=False)  # undo BatchNorm / F^ / W_p updates of the step
            self.skipped_steps += 1
            warnings.warn(f"step {self.step}: {fault}; step skipped ({self.skipped_steps} of at most "
                          f"{cfg.train.skip_nonfinite}, train.skip_nonfinite)", RuntimeWarning, stacklevel=2)
            self.step += 1  # the data order and augmentation draws stay functions of the step
            return {"loss": torch.tensor(float("nan")), "lr": lr, "ema": m, "out": None, "skipped": True}
        self.scaler.step(self.optimizer)
        self.scaler.update()
        try:  # predictor.update_at=after_step: F^ gets this step's projections and W_p is set (the authors' order)
            self.method.update_predictor(out)
        except FloatingPointError as exc:  # the parameters have been stepped already: this cannot be skipped
            raise TrainingError(self._fault_message(str(exc))) from None
        self.method.update_target(m)
        self.step += 1
        return {"loss": out.loss.detach(), "lr": lr, "ema": m, "out": out}

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of what a forward pass changes: every buffer (BatchNorm, F^, counters) and the predictor's
        parameters (DirectPred sets W_p in ``update``)."""
        keep = {n for n, _ in self.method.named_buffers()}
        keep |= {f"online.predictor.{n}" for n, _ in self.method.online.predictor.named_parameters()}
        return {k: v.detach().clone() for k, v in self.method.state_dict().items() if k in keep}

    def _grads_nonfinite(self) -> bool:
        grads = [p.grad for p in self.method.online.parameters() if p.grad is not None]
        # The max-norm is inf/NaN exactly when an entry is (a 2-norm could overflow on large finite gradients).
        return bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, float("inf"))))

    def _fault_message(self, fault: str) -> str:
        cfg = self.cfg
        if self.last_checkpoint is not None:
            path, step = self.last_checkpoint
            where = (f"The last good checkpoint is {path} (step {step}); resume from it with `directpred train "
                     f"--resume {self.run_dir}` (changing optim.lr on resume needs --force).")
        else:
            where = ("No checkpoint was written yet (train.checkpoint_every_steps writes them within an epoch); "
                     "restart with a lower optim.lr.")
        return (f"{fault} at step {self.step}; training stopped. Likely causes: a learning rate too high for this "
                f"batch size (optim.lr={cfg.optim.lr}), fp16 overflow (try train.precision=bf16 or fp32), or corrupt "
                f"inputs. Nothing from this step was written. {where} To skip isolated bad steps instead, set "
                f"train.skip_nonfinite to the number of steps that may be skipped.")

    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (or ``train.max_steps``), evaluate, write ``summary.json``; returns it."""
        cfg = self.cfg
        self._t_start = time.time()
        if self._resume_diag_state and self.diagnostics is not None:
            self.diagnostics.load_state_dict(self._resume_diag_state)
        last_step = self.total_steps if not cfg.train.max_steps else min(cfg.train.max_steps, self.total_steps)
        self.method.train()
        main = distributed.is_main()
        pbar = None
        if cfg.train.progress and main and self.step < last_step:
            from tqdm import tqdm

            pbar = tqdm(total=last_step, initial=self.step, unit="step", dynamic_ncols=True, file=sys.stderr,
                        desc="train")
        stop = _StopFlag()
        stopped_by: int | None = None
        collapsed_stop = False
        last_out = None  # the last step's output: the batch of the final diagnostics report
        rate_images, rate_t = 0, time.time()
        with stop:
            while self.step < last_step:
                epoch, step_in_epoch = divmod(self.step, self.steps_per_epoch)
                batches = self.source.batches(epoch, step_in_epoch)  # this process's batches from this step on
                while step_in_epoch < self.steps_per_epoch and self.step < last_step:
                    t0 = time.time()
                    res = self.train_step(next(batches))
                    step_in_epoch += 1
                    dt = time.time() - t0
                    self.train_seconds += dt
                    rate_images += self.global_batch
                    if not res.get("skipped"):
                        last_out = res["out"]
                    if self.diagnostics is not None and not res.get("skipped"):  # reports every diag.every steps
                        row = self.diagnostics.observe(self.step, res["out"])
                        if row:
                            self.logger.log({"step": self.step, "epoch": epoch, **row}, group="diag")
                            if self.diagnostics.collapsed and cfg.diag.stop_on_collapse:
                                collapsed_stop = True
                    if self.step % cfg.train.log_every == 0 or self.step == last_step:
                        loss = float(res["loss"])
                        ips = rate_images / max(time.time() - rate_t, 1e-9)
                        rate_images, rate_t = 0, time.time()
                        self.logger.log({"step": self.step, "epoch": epoch, "loss": loss, "lr": res["lr"],
                                         "ema": res["ema"], "images_per_second": ips})
                        if pbar is not None:
                            pbar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", img_s=f"{ips:.0f}", refresh=False)
                    if pbar is not None:
                        pbar.update(1)
                    if cfg.train.checkpoint_every_steps and self.step % cfg.train.checkpoint_every_steps == 0:
                        self.save()
                    requested = stop.signum is not None
                    if self.world > 1:  # every rank stops at the same step
                        flag = torch.tensor([float(requested or collapsed_stop)], device=self.device)
                        requested = bool(distributed.all_reduce_sum(flag).item() > 0)
                    if requested or collapsed_stop:
                        stopped_by = stop.signum if stop.signum is not None else -1
                        break
                batches.close()  # ends a streamed epoch's worker processes
                if stopped_by is not None:
                    break
                if step_in_epoch == self.steps_per_epoch:  # an epoch ended
                    done = epoch + 1
                    if cfg.eval.knn_every and done % cfg.eval.knn_every == 0 and self.step < last_step:
                        res_knn = evaluate(self.method, self.data, cfg, self.device, linear=False,
                                           autocast_dtype=self.autocast_dtype)
                        self.knn_history.append({"epoch": done, "step": self.step, **res_knn})
                        self.logger.log({"step": self.step, "epoch": done, **res_knn}, group="eval")
                        if pbar is not None:
                            pbar.write(f"epoch {done}: kNN top-1 {res_knn['knn_top1']:.2f}%")
                        self.method.train()
                    self.save(keep=done % cfg.train.checkpoint_every == 0)
        if pbar is not None:
            pbar.close()
        if stopped_by is not None and not collapsed_stop:
            self.save()
            self.logger.close()
            name = signal.Signals(stopped_by).name if stopped_by > 0 else "stop"
            if main:
                print(f"\nStopped by {name} at step {self.step}; checkpoint written to {self.ckpt_dir / 'last.pt'}."
                      f"\nResume with: directpred train --resume {self.run_dir}", file=sys.stderr)
            raise SystemExit(128 + stopped_by if stopped_by > 0 else 1)
        if self.diagnostics is not None and last_out is not None:  # the verdict on the final state
            row = self.diagnostics.final_report(self.step, last_out)
            self.logger.log({"step": self.step, "epoch": self.step // self.steps_per_epoch, **row}, group="diag_final")
        self.save()
        summary = self.finish(stopped_early=collapsed_stop)
        self.logger.close()
        return summary

    def finish(self, *, stopped_early: bool = False) -> dict[str, Any]:
        """Final kNN + linear probe; writes ``summary.json`` (rank 0) and returns it."""
        cfg = self.cfg
        results = evaluate(self.method, self.data, cfg, self.device, linear=cfg.eval.linear,
                           autocast_dtype=self.autocast_dtype)
        epochs_done = self.step / self.steps_per_epoch
        self.logger.log({"step": self.step, "epoch": math.floor(epochs_done), **results}, group="final")
        images = self.step * self.global_batch
        summary: dict[str, Any] = {
            **{k: None for k in ("knn_top1", "linear_top1", "linear_top1_best")},
            **results,
            "epochs": round(epochs_done, 4),
            "steps": self.step,
            "images_per_second": images / self.train_seconds if self.train_seconds > 0 else None,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_before + (time.time() - self._t_start),
            "git_commit": git_commit(),
            "world_size": self.world,
            "device": str(self.device),
            "precision": str(self.autocast_dtype).replace("torch.", "") if self.autocast_dtype else "fp32",
            "method": cfg.method.name,
            "predictor": cfg.predictor.name,
            "knn_history": self.knn_history,
            "stopped_early": stopped_early,
            "skipped_corrupt": self.data.pretrain.skipped + self.data.test.skipped + len(self.source.skipped),
            "skipped_steps": self.skipped_steps,
            "eigh_fallbacks": int(getattr(self.method.predictor, "eigh_fallbacks", torch.zeros(())).item()),
        }
        if self.diagnostics is not None:
            summary.update(self.diagnostics.summary())
        if distributed.is_main():
            atomic_write_json(self.run_dir / "summary.json", summary)
        return summary


def check_resume_config(saved: Config, new: Config, *, force: bool = False) -> None:
    """Refuse to resume with changes other than :data:`RESUMABLE_CHANGES`, showing the difference."""
    changes = {k: v for k, v in diff_configs(saved, new).items()
               if not any(k == a or (a.endswith(".") and k.startswith(a)) for a in RESUMABLE_CHANGES)}
    if changes and not force:
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
        raise TrainingError("the run would resume with a different configuration:\n" + lines +
                            "\nOnly these may change on resume: " + ", ".join(RESUMABLE_CHANGES) +
                            ". Start a new run, or pass --force to resume anyway.")
