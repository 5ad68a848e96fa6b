"""Progress and speed: plain-line progress (the default), a throttled Rich bar, and the images/s figure that
training logs. All count optimiser steps, of which a training batch (an execution) may hold several."""

from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress import ProgressBar

from vaelab.console import say
from vaelab.data.batches import batch_counts, execution_plan_of


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
        steps, images = batch_counts(batch, execution_plan_of(trainer))  # a batch may be an execution of several steps
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


def duration(seconds: float) -> str:
    """A duration as people read it: 42 s, 3 min 05 s, 2 h 10 min."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


class LineProgress(ProgressBar):
    """Progress as plain lines, one every `every_n_batches` training batches with the epoch's and the run's time
    left, one per epoch with its metrics, and the test phase's images done and time left at the same cadence (or
    every tenth of the test set, if that is more often). Each line goes to stdout and to the run's train.log
    (vaelab.console.say). No redraw thread or per-batch work: Rich and tqdm bars cost measurable speed in the
    training benchmark (docs/speed.md).

    Time left is measured, not guessed: the epoch's from this epoch's rate, the run's from the optimiser steps
    still to run at the rate of this fit so far, validation and checkpoints included."""

    KEYS = ("train/loss", "val/loss", "val/kl", "val/active_units")

    def __init__(self, every_n_batches: int = 100) -> None:
        super().__init__()
        self.every_n_batches = max(1, int(every_n_batches))
        self._enabled = True
        self._epoch_start = self._fit_start = 0.0
        self._fit_start_step = 0
        self._images = self._steps = 0
        self._finished: tuple[int, float] | None = None  # (epoch, seconds), printed once its metrics are logged
        self._test_start = 0.0
        self._test_images = self._test_batches = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer: L.Trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            say(text)

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

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a fit resumed mid-epoch skips on_train_epoch_start for that epoch: the clocks start here too
        self._fit_start = self._epoch_start = time.perf_counter()
        self._fit_start_step = trainer.global_step
        self._images = self._steps = 0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_finished(trainer)
        self._epoch_start, self._images, self._steps = time.perf_counter(), 0, 0

    def _steps_per_epoch(self, pl_module) -> int | None:
        total = getattr(pl_module, "steps_per_epoch", self.total_train_batches)
        return total if isinstance(total, int) and total > 0 else None

    def _run_steps(self, trainer: L.Trainer, per_epoch: int | None) -> int | None:
        """The optimiser steps the whole run will take, by max_steps or max_epochs, whichever ends it first."""
        ends = [trainer.max_steps] if trainer.max_steps and trainer.max_steps > 0 else []
        if per_epoch and trainer.max_epochs and trainer.max_epochs > 0:
            ends.append(trainer.max_epochs * per_epoch)
        return min(ends) if ends else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        steps, images = batch_counts(batch, execution_plan_of(trainer))  # a training batch may be an execution of several steps
        before = self._steps
        self._images, self._steps = self._images + images, self._steps + steps
        if before // self.every_n_batches == self._steps // self.every_n_batches:
            return
        now = time.perf_counter()
        epoch_seconds = max(now - self._epoch_start, 1e-9)
        rate = self._images * trainer.world_size / epoch_seconds
        per_epoch = self._steps_per_epoch(pl_module)
        line = f"{self._epoch(trainer, trainer.current_epoch)}: batch {self._steps}" + (f"/{per_epoch}" if per_epoch else "")
        line += f", {rate:,.0f} images/s"
        epoch_left, epoch_end = 0.0, trainer.global_step
        run_steps = self._run_steps(trainer, per_epoch)
        if per_epoch:
            epoch_end = min((trainer.current_epoch + 1) * per_epoch, run_steps or float("inf"))
            epoch_left = max(epoch_end - trainer.global_step, 0) * epoch_seconds / self._steps
            line += f", epoch left {duration(epoch_left)}"
        fit_steps = trainer.global_step - self._fit_start_step
        if run_steps and fit_steps > 0:  # this epoch at its own rate, the epochs after it at the fit's
            after = max(run_steps - max(epoch_end, trainer.global_step), 0) * (now - self._fit_start) / fit_steps
            line += f", run left {duration(epoch_left + after)}"
        self._print(trainer, line)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finished = (trainer.current_epoch, time.perf_counter() - self._epoch_start)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print_finished(trainer)

    # -- the test phase ------------------------------------------------------------------------------
    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._test_start, self._test_images, self._test_batches = time.perf_counter(), 0, 0
        total = self._test_total(trainer)
        self._print(trainer, "test: " + (f"{total:,} images" if total else "started"))

    @staticmethod
    def _test_total(trainer: L.Trainer) -> int | None:
        datamodule = trainer.datamodule
        test_set = getattr(datamodule, "test_set", None)
        try:
            total = len(test_set) if test_set is not None else None
        except TypeError:
            return None
        batches = trainer.num_test_batches[0] if trainer.num_test_batches else None
        size = getattr(datamodule, "eval_batch_size", None)
        if total is not None and batches is not None and size and batches < float("inf"):
            total = min(total, int(batches) * size)  # limit_test_batches
        return total

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx: int = 0) -> None:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        self._test_images += x.shape[0] * trainer.world_size
        self._test_batches += 1
        batches = trainer.num_test_batches[dataloader_idx] if trainer.num_test_batches else float("inf")
        if self._test_batches == 1 and batches > 1:
            self._expect(trainer, pl_module)
        every = self.every_n_batches if batches == float("inf") else min(self.every_n_batches,
                                                                           max(1, int(batches) // 10))
        if self._test_batches % every or self._test_batches >= batches:
            return
        seconds = time.perf_counter() - self._test_start
        total = self._test_total(trainer)
        line = f"test: {self._test_images:,}" + (f"/{total:,}" if total else "") + " images"
        line += f", {self._test_images / max(seconds, 1e-9):,.0f} images/s"
        if total:
            line += f", left {duration((total - self._test_images) * seconds / self._test_images)}"
        self._print(trainer, line)

    def _expect(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the first batch, the phase's expected time: the importance-sampled NLL costs K decoder passes per
        image, which on a CPU can be hours; the line names what sets it."""
        total = self._test_total(trainer)
        if not total:
            return
        seconds = time.perf_counter() - self._test_start
        k = getattr(getattr(pl_module, "test_metrics", None), "importance_samples", None)
        line = f"test: expected {duration(total * seconds / self._test_images)} for {total:,} images"
        if k:
            line += f" at K={k} (eval.importance_samples and data.test_subset set its cost)"
        self._print(trainer, line)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(trainer, f"test: {self._test_images:,} images done in {time.perf_counter() - self._test_start:.1f} s")
