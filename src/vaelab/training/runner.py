"""How a run trains and evaluates, decided once where the run is set up and handed to VAEModule: alone (`Solo`,
here), or as a member of a stacked sweep (vaelab.stacking.member.MemberRunner, which the stacked launcher hands
vaelab-train). The module asks its runner for its step engine and for each evaluation batch; nothing on the solo
path imports the stacking package."""

from __future__ import annotations

import logging

import torch

from vaelab.training.engine import CudaGraphEngine, StepEngine
from vaelab.training.step import grad_norm

log = logging.getLogger("vaelab")


class Solo:
    """A run alone: the eager step engine, or the CUDA-graph one when the execution plan keeps its image indices on
    the GPU; metrics updated in place."""

    shares_process = False  # a stacked member shares its process with other runs (its W&B console capture is off)

    def engine(self, args: dict, plan, batch_size: int, max_epochs: int, max_grad_norm: float | None) -> StepEngine:
        """The step engine from the module's plain arguments (engine.StepEngine's), its execution plan and sizes."""
        if plan is not None and plan.indices_on is not None:
            return CudaGraphEngine(**args, shape=(plan.steps, batch_size),
                                   on_fallback=lambda why: log.warning("cuda graphs: %s; training continues eagerly",
                                                                       why))
        return StepEngine(**args)

    @torch.no_grad()
    def evaluate(self, metrics, model: torch.nn.Module, x: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """One validation or test batch into its metrics (evaluation/metrics.py EvalMetrics)."""
        metrics.update(model, x, index)

    def join(self, trainer) -> None:
        """The run's Trainer is set up (for fitting or testing)."""

    def leave(self) -> None:
        """The run's training has ended, however it ended."""


def clip_through_lightning(module, opt, params: list, clip_value: float | None) -> torch.Tensor:
    """The engine's clip under DDP or fp16: the gradient's norm before clipping (fp16's loss scale divided out),
    then Lightning's clipping, which unscales fp16 gradients first."""
    norm = grad_norm(params)
    scaler = getattr(module.trainer.strategy.precision_plugin, "scaler", None)
    if scaler is not None:
        norm = norm / scaler.get_scale()
    if clip_value:
        module.clip_gradients(opt, gradient_clip_val=clip_value, gradient_clip_algorithm="norm")
    return norm
