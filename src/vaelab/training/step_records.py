"""What is kept from each optimiser step without making the step wait for a GPU: a tracker of the first
non-finite loss (the engine's), the per-step curves and the epoch's means of per-step statistics (the module's).
All take the engine's StepStats (read by name: step.py's STATS), and read them back to the host by pinned
asynchronous copies or as summed metric states."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchmetrics import Metric

from vaelab.errors import NonFiniteLossError
from vaelab.evaluation.metrics import compute_restored
from vaelab.training.step import STATS, StepStats

CURVES = [s.name for s in STATS if s.curve]  # train_step/<name>, beside the ELBO's curves
EPOCH_MEANS = [s.name for s in STATS if s.epoch_mean or s.epoch_total]  # train/<name>, over an epoch's steps
EPOCH_TOTALS = [s.name for s in STATS if s.epoch_total]  # ... as their sum, not their mean


def _copy_to_host(t: Tensor) -> tuple[Tensor, torch.cuda.Event]:
    """Start a copy of a CUDA tensor to pinned host memory; the event says when it has landed."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return host, done


class NonFiniteTracker:
    """Remembers, on the device, the first step whose reconstruction or KL term was NaN or infinite, and stops
    training with one sentence when it sees one. `check` reads it at intervals (on a GPU through the previous
    asynchronous copy, so it never waits); `raise_if_any` reads it at once and runs before anything is saved,
    so no checkpoint of broken weights is ever written."""

    def __init__(self, num_layers: int, epoch_of: Callable[[int], int]) -> None:
        self.num_layers, self.epoch_of = num_layers, epoch_of
        self._first_bad: Tensor | None = None  # [3]: step, recon bad, KL bad; step -1 while all is well
        self._probe: tuple[Tensor, torch.cuda.Event] | None = None

    def track(self, stats, step0: int) -> None:
        """Note the first bad step of StepStats `stats`, the steps step0 .. step0 + n - 1 (no sync)."""
        recon_bad, kl_bad = ~torch.isfinite(stats.recon), (~torch.isfinite(stats.kl_layers)).any(1)  # [n]
        any_bad = recon_bad | kl_bad
        first = any_bad.int().argmax().reshape(1)  # the first bad step (0 if none)
        device = stats.recon.device
        if self._first_bad is None or self._first_bad.device != device:
            self._first_bad = torch.full((3,), -1, dtype=torch.long, device=device)
        now = torch.cat([first + step0, recon_bad.index_select(0, first).long(), kl_bad.index_select(0, first).long()])
        self._first_bad = torch.where(any_bad.any() & (self._first_bad[0] < 0), now, self._first_bad)

    def check(self) -> None:
        """The periodic check: at once on a CPU; on a GPU, from the copy started at the previous check."""
        if self._first_bad is None:
            return
        if self._first_bad.device.type != "cuda":
            self.raise_if_any()
            return
        if self._probe is not None:
            host, done = self._probe
            if not done.query():
                return
            if int(host[0]) >= 0:
                self.raise_if_any()
        self._probe = _copy_to_host(self._first_bad)

    def raise_if_any(self) -> None:
        """One sync: raise NonFiniteLossError if any step so far had a NaN or infinite loss."""
        if self._first_bad is None or int(self._first_bad[0]) < 0:
            return
        step, recon_bad, kl_bad = (int(v) for v in self._first_bad.tolist())
        which = " and ".join(t for t, b in (("reconstruction term", recon_bad), ("KL term", kl_bad)) if b)
        raise NonFiniteLossError(
            f"Training stopped: the loss became NaN or infinite in the {which} at step {step} "
            f"(epoch {self.epoch_of(step)}); lower optim.lr or check the data for NaNs. Checkpoints already "
            "saved were not touched."
        )


class StepCurves:
    """Per-step curves (train_step/*) of chosen optimiser steps, sent straight to the loggers at that step. On a
    GPU a row is copied to host memory without a sync and logged once the copy has landed."""

    def __init__(self) -> None:
        self._pending: list[tuple[int, Tensor, torch.cuda.Event | None, int, dict]] = []

    def add(self, step: int, stats, batch_size: int, extra: dict) -> None:
        """stats: one step's StepStats over batch_size images; extra: values to log beside them."""
        values = torch.stack([stats.recon[0], stats.kl_layers[0].sum(), *(stats[name][0] for name in CURVES)])
        if values.device.type == "cuda":
            host, done = _copy_to_host(values)
            self._pending.append((step, host, done, batch_size, extra))
        else:
            self._pending.append((step, values, None, batch_size, extra))

    def flush(self, loggers, wait: bool = False) -> None:
        """Log every row whose copy has landed (with wait, every row), in step order."""
        while self._pending:
            step, row, done, size, extra = self._pending[0]
            if done is not None and not (wait or done.query()):
                return
            if done is not None:
                done.synchronize()
            self._pending.pop(0)
            recon_sum, kl_sum, *curves = row.tolist()
            recon, kl = recon_sum / size, kl_sum / size
            metrics = {"train_step/loss": recon + kl, "train_step/elbo": -(recon + kl), "train_step/recon": recon,
                       "train_step/kl": kl, **{f"train_step/{n}": v for n, v in zip(CURVES, curves)}, **extra}
            for logger in loggers:
                logger.log_metrics(metrics, step=step)


class StepMeans(Metric):
    """An epoch's mean over its optimiser steps of every statistic STATS logs so (train/grad_norm), or its total
    (train/skipped_steps), as summed states: right under DDP (every rank takes the same steps: a total is the mean
    times one rank's steps), and kept in checkpoints (a run resumed mid-epoch keeps the epoch's sums)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.zeros(len(EPOCH_MEANS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("steps", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="max")

    def update(self, stats: StepStats) -> None:
        self.total += torch.stack([stats[name].detach().sum() for name in EPOCH_MEANS]).double()
        self.count += stats.steps
        self.steps += stats.steps

    def compute(self) -> dict[str, Tensor]:
        mean = (self.total / self.count).float()
        return {name: m * self.steps if name in EPOCH_TOTALS else m for name, m in zip(EPOCH_MEANS, mean)}

    def compute_restored(self) -> dict[str, Tensor]:
        return compute_restored(self)
