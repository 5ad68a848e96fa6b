"""The stabilisers deep hierarchical VAEs train with (VDVAE's), for every model: an exponential moving average of
the weights (`trainer.ema_rate`), which validation, test, sample grids and the checkpoint's evaluation copy use,
and gradient skipping (`trainer.gradient_skip_threshold`): an update whose gradient norm (before clipping) is above
the threshold, or not finite, is not applied, neither to the weights, the optimiser's state nor the average, and is
counted (train/skipped_steps). Plain PyTorch; the step engine (engine.py) calls them, eagerly or inside a CUDA
graph."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn


class WeightAverage:
    """ema <- rate * ema + (1 - rate) * weights after every applied optimiser step, over a copy of the model
    (`model`), which the training module keeps as a submodule (so checkpoints hold it and a resume restores it)."""

    def __init__(self, live: nn.Module, rate: float) -> None:
        self.rate = float(rate)
        self.model = copy.deepcopy(live).requires_grad_(False)
        self.bind(live)

    def bind(self, live: nn.Module) -> None:
        """Pair the average's tensors with the live model's (again after a device move or a stacked attach)."""
        self.pairs = [(a, p) for a, p in zip(self.tensors(self.model), self.tensors(live))]

    @staticmethod
    def tensors(model: nn.Module) -> list[Tensor]:
        return [p.data for p in model.parameters()] + [b for b in model.buffers() if b.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        for average, live in self.pairs:
            average.lerp_(live, 1.0 - self.rate)


def apply_unless_skipped(step: Callable[[], None], skip: Tensor, optimizer: torch.optim.Optimizer,
                         params: list[Tensor], average: WeightAverage | None) -> None:
    """Run `step` (the optimiser's step, then the average's) unless `skip` (a bool tensor) is set. Eagerly by reading
    skip (one host read: free on a CPU, VDVAE's sync on a GPU); inside a CUDA graph, which cannot read it, masked:
    every tensor the step writes (the weights, the capturable optimiser's state, the average) is kept, the step
    runs, and each is put back where skip is set. masked_step runs the masked form on any device (tested equal)."""
    if not (skip.device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        if not bool(skip):
            step()
        return
    masked_step(step, skip, optimizer, params, average)


def masked_step(step: Callable[[], None], skip: Tensor, optimizer: torch.optim.Optimizer, params: list[Tensor],
                average: WeightAverage | None) -> None:
    """apply_unless_skipped without a host read (its CUDA-graph form)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper holds torch's
    with torch.no_grad():
        kept = {key: t.clone() for key, t in _written(inner, params, average)}
    step()
    with torch.no_grad():
        for key, t in _written(inner, params, average):
            old = kept.get(key)  # None: state the step created (Adam's, at its first step): put back as zeros
            t.copy_(torch.where(skip, old if old is not None else torch.zeros_like(t), t))


def _written(optimizer: torch.optim.Optimizer, params: list[Tensor], average: WeightAverage | None):
    """(a stable key, the tensor) of everything an update writes."""
    out = [(("param", i), p) for i, p in enumerate(params)]
    for i, p in enumerate(params):
        out += [(("state", i, k), v) for k, v in optimizer.state.get(p, {}).items() if isinstance(v, Tensor)]
    if average is not None:
        out += [(("average", j), a) for j, (a, _) in enumerate(average.pairs)]
    return out
