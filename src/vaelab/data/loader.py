"""In-memory images batched by indexing, in an order a run can stop and resume between any two batches,
and the Bernoulli draws that binarise them."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vaelab.errors import ConfigError


class InMemoryImages(Dataset):
    """Images as one uint8 or float tensor; a batch is one indexing operation, not per-image transforms."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitems__(self, indices) -> Tensor:
        x = self.images[indices]
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]


class InMemoryLoader:
    """Batches of an in-memory data set, by indexing, that a run can stop and resume between any two of them.

    The order of epoch e is a permutation drawn from (seed, e), dynamic binarisation of batch b from
    (seed, e, b), and each DDP rank takes its own slice (evaluation sets are split without padding, so no
    image counts twice). Lightning saves `state_dict()` in checkpoints and hands it back on resume, so a
    resumed run sees exactly the batches an uninterrupted one would have.

    steps_per_execution: None (evaluation) yields one batch [B, C, H, W] at a time. A number (training) yields
    executions: up to that many consecutive batches stacked, [n, B, C, H, W], for the n optimiser steps of one
    Lightning step; a short last batch comes alone. With `indices_on`, an execution is the batches' image
    indices [n, B] on that device instead, and the step engine cuts and binarises the images there.
    """

    def __init__(self, dataset: InMemoryImages, batch_size: int, shuffle: bool = False,
                 dynamic_binarize: bool = False, seed: int = 0, with_index: bool = False, dequantize: bool = False,
                 rank: int = 0, world_size: int = 1, epoch_fn=None, position_fn=None,
                 steps_per_execution: int | None = None, indices_on: torch.device | None = None) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.dynamic_binarize, self.seed, self.with_index = dynamic_binarize, seed, with_index
        # a fresh draw per training batch: binarised pixels, or 8-bit ones dequantised (vaelab/pixels.py)
        self.draw = bernoulli_draw if dynamic_binarize else dequantize_draw if dequantize else None
        self.rank, self.world_size = rank, world_size
        self.epoch_fn = epoch_fn or (lambda: 0)
        self.position_fn = position_fn  # items (batches or executions) of this epoch consumed, as the trainer counts
        self.steps, self.indices_on = steps_per_execution, indices_on
        self._resume: dict | None = None
        self._epoch, self._yielded = 0, 0

    def _indices(self, epoch: int) -> Tensor:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            return order[self.rank :: self.world_size][: n // self.world_size]  # equal shards, for DDP
        per_rank = -(-n // self.world_size)
        return torch.arange(n)[self.rank * per_rank : (self.rank + 1) * per_rank]  # contiguous, unpadded

    @property
    def num_batches(self) -> int:
        """Batches per epoch (optimiser steps, when training)."""
        return -(-len(self._indices(0)) // self.batch_size)

    def _groups(self) -> list[tuple[int, int]]:
        """(first batch, number of batches) of each item: single batches, or executions of `steps` full
        batches (the last one shorter) followed by a short last batch alone."""
        if self.steps is None:
            return [(b, 1) for b in range(self.num_batches)]
        full = len(self._indices(0)) // self.batch_size
        groups = [(b, min(self.steps, full - b)) for b in range(0, full, self.steps)]
        return groups + [(full, 1)] if full < self.num_batches else groups

    def __len__(self) -> int:
        return len(self._groups())

    def _batch(self, indices: Tensor, epoch: int, b: int) -> Tensor:
        x = self.dataset.__getitems__(indices[b * self.batch_size : (b + 1) * self.batch_size])
        if self.draw is not None:  # a fresh draw per batch, reproducible from (seed, epoch, batch)
            g = torch.Generator(device=x.device).manual_seed(((self.seed * 100_003 + epoch) * 1_000_003 + b) % 2**63)
            x = self.draw(x, g)
        return x

    def __iter__(self):
        self._epoch = epoch = int(self.epoch_fn())
        start = 0
        if self._resume is not None and self._resume.get("epoch") == epoch:
            start = int(self._resume.get("position", 0))
            saved = self._resume.get("steps_per_execution", 1)
            if self.steps is not None and saved != self.steps:
                raise ConfigError(f"this run was trained with trainer.steps_per_execution={saved}; resume it with "
                                  f"that value (its checkpoint stopped inside an epoch), got {self.steps}")
        self._resume = None
        indices = self._indices(epoch)
        if self.indices_on is not None:
            indices = indices.to(self.indices_on)  # once per epoch; batches are then views of it
        groups = self._groups()
        for item in range(start, len(groups)):
            self._yielded = item + 1
            b, count = groups[item]
            if self.steps is None:
                idx = indices[b * self.batch_size : (b + 1) * self.batch_size]
                x = self._batch(indices, epoch, b)
                yield (x, idx) if self.with_index else x
            elif self.indices_on is not None:
                yield indices[b * self.batch_size : (b + count) * self.batch_size].view(count, -1)
            elif count == 1:
                yield self._batch(indices, epoch, b).unsqueeze(0)
            else:
                yield torch.stack([self._batch(indices, epoch, c) for c in range(b, b + count)])

    def state_dict(self) -> dict:
        position = self.position_fn() if self.position_fn is not None else self._yielded
        return {"epoch": self._epoch, "position": int(position), "steps_per_execution": self.steps or 1}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)


def bernoulli_draw(p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One Bernoulli(p) draw per pixel, as 0./1. in p's dtype: 1 where a uniform U[0, 1) falls below p.
    On a CPU this gives, draw for draw, the values torch.bernoulli gives with the same generator (it compares
    the same uniforms, one element at a time), at a fraction of its cost (docs/speed.md)."""
    return torch.rand(p.shape, generator=generator, dtype=p.dtype, device=p.device).lt_(p)


def dequantize_draw(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """8-bit images, as their values k/255, dequantised: (k + u) / 256 with u ~ U[0, 1) per pixel (vaelab/pixels.py)."""
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return torch.round(x * 255.0).add_(u).div_(256.0)


def dequantize_once(x: Tensor, seed: int) -> Tensor:
    """uint8 images -> one fixed dequantisation (validation and test sets): floats (k + u) / 256."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    return dequantize_draw(x.float() / 255.0 if x.dtype == torch.uint8 else x, generator)


def binarize_once(x: Tensor, seed: int) -> Tensor:
    """uint8 images -> one fixed Bernoulli draw of their grey levels (static binarisation, evaluation sets)."""
    return torch.bernoulli(x.float() / 255.0, generator=torch.Generator().manual_seed(seed))
