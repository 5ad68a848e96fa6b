"""One optimiser step's arithmetic and its statistics, written once. `step_objective` is the pure part, a
function of the model (or a member's weights under vmap), the images, the noise and the loss settings (objective.Loss);
the eager engine, the CUDA-graph capture (engine.py) and the stacked step (vaelab/stacking/stack.py, through vmap)
all call it, then backpropagate, measure (and clip) the gradient and step their optimiser. `STATS` names what every
step keeps, declared once: a new statistic is a line here and its value where the step computes it; every path
returns it, the per-step curves and the epoch's means log it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vaelab.training.objective import Loss


@dataclass(frozen=True)
class Stat:
    """One statistic of a step. per_layer: a column per stochastic layer. curve: logged per step as
    train_step/<name> (recon and KL are logged as the ELBO's curves from their sums). epoch_mean: logged per epoch
    as train/<name>, its mean over the epoch's steps (recon and KL: as per-image means, ElboMeans)."""

    name: str
    per_layer: bool = False
    curve: bool = False
    epoch_mean: bool = False
    epoch_total: bool = False  # logged per epoch as train/<name>, its sum over the epoch's steps


STATS = (
    Stat("recon"),  # -log p(x|z) summed over the step's images
    Stat("kl_layers", per_layer=True),  # each layer's KL summed over the step's images
    Stat("objective", curve=True),  # what the step minimised (its batch mean)
    Stat("grad_norm", curve=True, epoch_mean=True),  # the gradient's global L2 norm before clipping
    Stat("skipped_steps", epoch_total=True),  # 1 where the update was skipped (trainer.gradient_skip_threshold)
)


class StepStats:
    """An execution's steps' statistics: one [n, width] float32 table underneath (so that a GPU copies it to the
    host in one transfer, and a CUDA graph writes it in place), read by name (stats.recon, stats.kl_layers, ...,
    or stats["grad_norm"]), never by column: the columns are STATS' in order, kl_layers L wide."""

    def __init__(self, table: Tensor) -> None:
        self.table = table  # [n, width]

    @staticmethod
    def row(**values: Tensor) -> Tensor:
        """One step's row from each statistic's value (a leading member axis, when stacked, kept)."""
        lead = values["objective"].shape
        return torch.cat([values[s.name].detach().float().reshape(*lead, -1) for s in STATS], -1)

    @staticmethod
    def width(num_layers: int) -> int:
        return sum(num_layers if s.per_layer else 1 for s in STATS)

    def _columns(self, name: str) -> slice:
        layers = self.table.shape[-1] - (len(STATS) - 1)
        start = 0
        for s in STATS:
            size = layers if s.per_layer else 1
            if s.name == name:
                return slice(start, start + size)
            start += size
        raise KeyError(name)

    def __getitem__(self, name: str) -> Tensor:
        """[n] for a scalar statistic, [n, L] for a per-layer one."""
        cols = self._columns(name)
        per_layer = next(s.per_layer for s in STATS if s.name == name)
        return self.table[:, cols] if per_layer else self.table[:, cols.start]

    recon = property(lambda self: self["recon"])
    kl_layers = property(lambda self: self["kl_layers"])
    objective = property(lambda self: self["objective"])
    grad_norm = property(lambda self: self["grad_norm"])
    skipped_steps = property(lambda self: self["skipped_steps"])

    @property
    def steps(self) -> int:
        return self.table.shape[0]

    def at(self, i: int) -> StepStats:
        return StepStats(self.table[i : i + 1])


def step_objective(model, x: Tensor, noise: Tensor, loss: Loss, weight: float | Tensor,
                   free_bits: float | Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """A step's objective (to backpropagate) and its statistics but the update's (grad_norm, skipped_steps): images x [B, C, H, W], the
    step's draws (loss.draw_noise's), the KL weight; free_bits, a stacked member's own (None: loss's)."""
    objective, terms = loss.step(model, x, noise, weight, free_bits)
    return objective, {"recon": terms.recon.detach().sum(0), "kl_layers": terms.kl_layers.detach().sum(-1),
                       "objective": objective.detach()}


def grad_norm(params: list[Tensor]) -> Tensor:
    """The global L2 norm of these parameters' gradients (what clip_grad_norm_ returns), without clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: foreach kernels
    if total is not None:
        return total(grads, foreach=True)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
