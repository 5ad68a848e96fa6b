"""What a training batch holds, defined once, beside the loader that cuts it. Under an execution plan a batch is an
*execution*: `steps` consecutive batches for `steps` optimiser steps, as images [n, B, C, H, W] or, with
`indices_on` set, as image indices [n, B] on that device (cut and binarised there, inside a CUDA graph too).
Without a plan (a plain loader) a batch is images [B, C, H, W], one optimiser step. Only this module reads a
batch's shape; everyone else asks it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class ExecutionPlan:
    """How the training loader cuts its batches: `steps` optimiser steps per batch, and whether as image indices
    on a device (`indices_on`) instead of images."""

    steps: int = 1
    indices_on: torch.device | None = None

    def counts(self, batch) -> tuple[int, int]:
        """(optimiser steps, images per step) in one training batch cut for this plan."""
        return batch.shape[0], batch.shape[1]

    def images(self, batch: Tensor, i: int, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Step i's images [B, C, H, W] as floats: gathered (and binarised) by `gather` from indices, or cut from
        the stacked images."""
        return gather(batch[i]) if self.indices_on is not None else batch[i]


def _plain(batch) -> Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def batch_counts(batch, plan: ExecutionPlan | None) -> tuple[int, int]:
    """(optimiser steps, images) in one training batch: cut for `plan`, or a plain batch (one step)."""
    if plan is None:
        return 1, _plain(batch).shape[0]
    steps, size = plan.counts(batch)
    return steps, steps * size


def step_images(batch, i: int, plan: ExecutionPlan | None, gather: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """Optimiser step i's images in a training batch (a plain batch has one step, i = 0)."""
    return plan.images(batch, i, gather) if plan is not None else _plain(batch)


def execution_plan_of(trainer) -> ExecutionPlan | None:
    """The plan the trainer's data module cuts its training batches for (None: plain batches)."""
    return getattr(getattr(trainer, "datamodule", None), "execution_plan", None)
