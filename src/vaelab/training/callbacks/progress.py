"""Progress and speed: plain-line progress (the default), a throttled Rich bar, and the images/s figure that
training logs. All count optimiser steps, of which a training batch (an execution) may hold several."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar

from vaelab.training.engine import batch_counts


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
    (Rich and tqdm bars cost measurable speed in the training benchmark: README, Speed)."""

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
