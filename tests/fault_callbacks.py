"""Callbacks the fault tests add to the real app through config (+callbacks.x._target_=...): they cause a
real fault at a chosen step, so tests need no timing luck."""

import os
import signal

import lightning as L
import torch

from vaelab.training.engine import batch_counts


class SignalAt(L.Callback):
    """Send a real signal to the main process when training reaches `step`, as `kill <pid>` would (under DDP
    only rank 0 gets it; the run must still stop every rank at the same batch)."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        steps = batch_counts(batch, pl_module)[0]  # a batch may be an execution of several optimiser steps
        if trainer.global_step <= self.step < trainer.global_step + steps and trainer.is_global_zero:
            os.kill(os.getpid(), self.signum)


class PoisonBatch(L.Callback):
    """Put a NaN into the training batch at `step`: corrupt data as it would reach the model."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        steps = batch_counts(batch, pl_module)[0]
        if trainer.global_step <= self.step < trainer.global_step + steps:
            images = batch[self.step - trainer.global_step] if batch.dim() == 5 else batch  # that step's images
            images[0, 0, 0, 0] = torch.nan


class FreezeAt(L.Callback):
    """Freeze (SIGSTOP) the process of DDP rank `rank` when training reaches `step`: a hung process or node."""

    def __init__(self, step: int, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        steps = batch_counts(batch, pl_module)[0]
        if trainer.global_rank == self.rank and trainer.global_step <= self.step < trainer.global_step + steps:
            os.kill(os.getpid(), signal.SIGSTOP)
