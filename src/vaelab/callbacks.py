"""Callbacks: image grids of samples, reconstructions, interpolations, traversals (and VampPrior
pseudo-inputs), saved as PNGs and sent to every logger that takes images."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import save_image

from vaelab.engine import batch_counts
from vaelab.sampling import all_grids


def log_image(trainer: L.Trainer, key: str, grid: Tensor, caption: str) -> None:
    """Send one image grid [C, H, W] to every logger that takes images."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], caption=[caption], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, trainer.global_step)


class ImageGrids(L.Callback):
    """Every `every_n_epochs` validation epochs (and once when training ends), the grids of
    vaelab.sampling.all_grids on a fixed validation batch. A fixed seed makes grids from different epochs
    show the same latent draws."""

    def __init__(self, save_dir: str, every_n_epochs: int = 1, num_samples: int = 64,
                 num_reconstructions: int = 32, seed: int = 0) -> None:
        self.save_dir = Path(save_dir)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.num_samples, self.num_reconstructions, self.seed = num_samples, num_reconstructions, seed

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        self.write(trainer, pl_module, tag=f"epoch_{epoch:03d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # the final model, however training stopped (max_steps, early stop)
            self.write(trainer, pl_module, tag="final")

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> dict[str, Path]:
        model = pl_module.model
        was_training = model.training
        model.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            x = trainer.datamodule.example_batch(self.num_reconstructions).to(pl_module.device)
            grids = all_grids(model, x, self.num_samples)
        model.train(was_training)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, grid in grids.items():
            paths[name] = self.save_dir / f"{name}_{tag}.png"
            save_image(grid, paths[name])
            log_image(trainer, f"images/{name}", grid, f"{name}, {tag}, step {trainer.global_step}")
        return paths


class Preemption(L.Callback):
    """On every signal a scheduler or a person sends before a run is stopped (SIGTERM, SIGUSR1, SIGUSR2 - which
    conf/hydra/launcher/slurm.yaml asks SLURM for before the time limit - and SIGINT, Ctrl-C): finish the current
    execution, save checkpoints/last.ckpt (weights, optimiser, loop position, data order, RNG) and stop.
    `resume=auto` with the same command then continues exactly where the run stopped. A second Ctrl-C stops at
    once, as Ctrl-C always does. Under submitit (hydra/launcher=slurm or submitit_local) the signal is then handed
    to submitit's own handler, which requeues the job; the requeued job continues from the checkpoint."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")

    def __init__(self, dirpath: str, filename: str = "last.ckpt", check_every_n_steps: int = 10) -> None:
        self.path = Path(dirpath) / filename
        self.check_every_n_steps = max(1, check_every_n_steps)  # DDP: how often ranks agree (one collective)
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._agreed_at = 0  # global step of the ranks' last agreement

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Take over the signals once Lightning and submitit have set their own handlers: ours only raise a flag.
        The decision to stop is made at the end of an execution, agreed by all ranks (Lightning's SIGTERM handler
        runs a collective inside the signal handler, which can deadlock DDP ranks mid-step)."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in self.SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._flag)

    def _flag(self, signum, frame) -> None:
        import signal

        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal_name == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.signal_name = self.signal_name or name
        if name == "SIGINT":
            print("\nvaelab: Ctrl-C: saving at the end of this step (Ctrl-C again to stop at once)", flush=True)

    def requeue_handler(self):
        """submitit's handler for the signal that stopped the run, as a callable that requeues the job (None
        outside submitit): USR2 is submitit's own requeue signal; for SIGTERM, which submitit ignores, its
        requeue is asked for all the same, since the run saved a checkpoint to continue from."""
        import signal

        if self.signal_name is None:
            return None
        handler = self._previous.get(getattr(signal, self.signal_name))
        owner = getattr(handler, "__self__", None)
        if owner is None or not type(owner).__module__.startswith("submitit"):
            return None
        return lambda: owner.checkpoint_and_try_requeue(getattr(signal, self.signal_name))

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        stop = self.signal_name is not None
        if trainer.world_size > 1:  # every rank must agree, or the collective save would hang
            if trainer.global_step - self._agreed_at < self.check_every_n_steps:  # the same on every rank
                return
            self._agreed_at = trainer.global_step
            flag = torch.tensor([1.0 if stop else 0.0], device=pl_module.device)
            stop = bool(trainer.strategy.reduce(flag, reduce_op="sum") > 0)
        if not stop:
            return
        self.signal_name = self.signal_name or "SIGTERM"
        if hasattr(pl_module, "raise_if_nonfinite"):
            pl_module.raise_if_nonfinite()  # never save broken weights
        trainer.save_checkpoint(self.path)
        raise Preempted(self.signal_name, trainer.current_epoch, trainer.global_step, self.path,
                        self.requeue_handler())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        import signal

        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}


class Preempted(SystemExit):
    """Raised after a preemption checkpoint is saved: ends the run cleanly (exit status 0)."""

    def __init__(self, signal_name: str, epoch: int, step: int, path: Path, requeue=None) -> None:
        super().__init__(0)
        self.signal_name, self.epoch, self.step, self.path = signal_name, epoch, step, path
        self.requeue = requeue  # submitit's requeue, to call once the run's state is written


class Throughput(L.Callback):
    """Training images per second, from the first batch that starts after `skip` optimiser steps of each epoch
    to its last training batch (start-up, validation and checkpointing excluded), logged as
    perf/train_images_per_s. Two clock reads per batch and, on a GPU, two synchronisations per epoch: it costs
    nothing measurable."""

    def __init__(self, skip: int = 10) -> None:
        self.skip = skip
        self._start: float | None = None
        self._last: float | None = None
        self._images = self._steps = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start, self._last, self._images, self._steps = None, None, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None and self._steps >= self.skip:
            self._sync(pl_module)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps, images = batch_counts(batch, pl_module)  # a batch may be an execution of several steps
        self._steps += steps
        if self._start is not None:
            self._images += images
            last = batch_idx + 1 >= trainer.num_training_batches or trainer.global_step >= trainer.max_steps > 0
            if last:
                self._sync(pl_module)
            self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._start is not None and self._last is not None and self._last > self._start:
            rate = self._images * trainer.world_size / (self._last - self._start)
            pl_module.log("perf/train_images_per_s", float(rate))

    @staticmethod
    def _sync(pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)


class ThrottledProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, brought up to date every `every_n_batches` training batches instead of
    after each one: its per-batch update (the bar, the metrics dict, the logger's version, a redraw request) is
    work a bare loop does not do. refresh_rate: redraws per second (Lightning's default, 100, keeps a redraw
    thread busy)."""

    def __init__(self, every_n_batches: int = 25, refresh_rate: int = 2, **kwargs) -> None:
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.every_n_batches = max(1, int(every_n_batches))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        done = batch_idx + 1
        if done % self.every_n_batches == 0 or done == self.total_train_batches:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class LineProgress(ProgressBar):
    """Progress as plain lines on stdout, one every `every_n_batches` training batches and one per epoch with
    its metrics: readable in a terminal and in a SLURM log alike, and no redraw thread or per-batch work
    (in the training benchmark, Rich and tqdm bars cost the vanilla model up to 0.07 of its speed ratio)."""

    KEYS = ("train/loss", "val/loss", "val/kl", "val/active_units")

    def __init__(self, every_n_batches: int = 100) -> None:
        super().__init__()
        self.every_n_batches = max(1, int(every_n_batches))
        self._enabled = True
        self._epoch_start = 0.0
        self._images = self._steps = 0
        self._finished: tuple[int, float] | None = None  # (epoch, seconds), printed once its metrics are logged

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer: L.Trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(text, flush=True)

    def _epoch(self, trainer: L.Trainer, epoch: int) -> str:
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        return f"epoch {epoch + 1}" + (f"/{total}" if total else "")

    def _print_finished(self, trainer: L.Trainer) -> None:
        """The summary of the epoch that ended: printed at the next epoch's start or at the end of training,
        since the module logs the epoch's training means after the callbacks' on_train_epoch_end."""
        if self._finished is None:
            return
        epoch, seconds = self._finished
        self._finished = None
        metrics = trainer.callback_metrics
        shown = ", ".join(f"{k} {float(metrics[k]):.2f}" for k in self.KEYS if k in metrics)
        self._print(trainer, f"{self._epoch(trainer, epoch)} done in {seconds:.1f} s: {shown}")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_finished(trainer)
        self._epoch_start, self._images, self._steps = time.perf_counter(), 0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps, images = batch_counts(batch, pl_module)  # a training batch may be an execution of several steps
        before = self._steps
        self._images, self._steps = self._images + images, self._steps + steps
        if before // self.every_n_batches != self._steps // self.every_n_batches:
            rate = self._images * trainer.world_size / max(time.perf_counter() - self._epoch_start, 1e-9)
            total = getattr(pl_module, "steps_per_epoch", self.total_train_batches)
            of = f"/{total}" if isinstance(total, int) else ""
            self._print(trainer, f"{self._epoch(trainer, trainer.current_epoch)}: batch {self._steps}{of}, "
                                 f"{rate:,.0f} images/s")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished = (trainer.current_epoch, time.perf_counter() - self._epoch_start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_finished(trainer)
