"""The step engine: N optimiser steps inside one Lightning `training_step`, run eagerly or replayed as one
CUDA graph. Either way it returns one row of statistics per optimiser step, [n, L + 2] = (recon sum,
each layer's KL sum, the objective), from which the module keeps its epoch sums, NaN check and curves.

Why: Lightning's loop costs about a millisecond a step whatever the model does. Several optimiser steps per
Lightning step spread that cost over N steps (the lever on a CPU); a whole-step CUDA graph (batch gather,
binarisation, forward, backward, fused Adam) turns N steps' hundreds of kernel launches into one replay that
runs while Lightning's Python goes on (the lever on a GPU). Plain PyTorch; the module supplies the objective.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vaelab.models.base import ElboTerms

log = logging.getLogger("vaelab")

# trainer.steps_per_execution=auto, by device and engine, as measured by scripts/benchmarks/train_throughput.py
# (README, Speed): on a CPU 10 steps spread Lightning's per-step cost over ten; on a GPU 10 steps per replay
# come close to the bare graph loop, and 10 eager steps beat one.
AUTO_STEPS = {"cpu": 10, "cuda": 10, "cuda_graph": 10}

# Eager executions before capture: Adam's state must exist, and PyTorch's whole-network example warms up
# on a side stream so that lazily created handles (cuBLAS workspaces) are not made inside the capture.
GRAPH_WARMUP_EXECUTIONS = 2


@dataclass(frozen=True)
class ExecutionPlan:
    """What one training batch holds, as the data module's loader must cut it: `steps` consecutive batches,
    as images [n, B, C, H, W] or, with `indices_on` set, as image indices [n, B] on that device (the engine
    then gathers and binarises on the device itself)."""

    steps: int = 1
    indices_on: torch.device | None = None


def step_stats(terms: ElboTerms, objective: Tensor) -> Tensor:
    """One optimiser step's row: [recon sum, KL sum of each layer, objective], float32, [L + 2]."""
    return torch.cat([terms.recon.detach().sum(0, keepdim=True).float(), terms.kl_layers.detach().sum(1).float(),
                      objective.detach().reshape(1).float()])


class StepFunctions:
    """What an engine needs from the module (VAEModule implements it)."""

    model: torch.nn.Module

    def images(self, batch: Tensor, i: int) -> Tensor: ...  # sub-batch i as float images [B, C, H, W]
    def beta(self, step) -> float | Tensor: ...  # the KL weight at optimiser step `step` (int or tensor)
    def objective(self, terms: ElboTerms, beta) -> Tensor: ...
    def check_step(self, objective: Tensor, terms: ElboTerms, step: int) -> None: ...  # eager NaN check
    def optimizer_step_now(self, objective: Tensor) -> None: ...  # zero_grad, backward, clip, step
    def clip_now(self) -> None: ...  # clip the gradients (inside a graph too)


class EagerEngine:
    """N optimiser steps in a Python loop: the same calls, in the same order, as N Lightning steps."""

    name = "eager"

    def __init__(self, fns: StepFunctions) -> None:
        self.fns = fns

    def run(self, batch: Tensor, n: int, step0: int) -> Tensor:
        fns, rows = self.fns, []
        for i in range(n):
            terms = fns.model.elbo_terms(fns.images(batch, i))
            objective = fns.objective(terms, fns.beta(step0 + i))
            fns.check_step(objective, terms, step0 + i)
            fns.optimizer_step_now(objective)
            rows.append(step_stats(terms, objective))
        return torch.stack(rows)  # [n, L + 2]


class CudaGraphEngine(EagerEngine):
    """N whole optimiser steps captured once as one CUDA graph and replayed for every full execution.

    The graph reads the execution's image indices from a static buffer (filled by a device-to-device copy)
    and its first step number from a device scalar (filled by a kernel, not copied from the host), so a replay
    needs no host-device synchronisation. Noise and binarisation draws come from the default CUDA generator,
    which PyTorch advances at every replay: each step gets fresh draws. Executions of another shape (the last
    of an epoch, the last before max_steps) run eagerly, with the same optimiser, said once in the log.
    """

    name = "cuda_graph"

    def __init__(self, fns: StepFunctions, optimizer: torch.optim.Optimizer, shape: tuple[int, int],
                 on_fallback: Callable[[str], None]) -> None:
        super().__init__(fns)
        self.optimizer = optimizer
        self.shape = tuple(shape)  # (steps per execution, batch size): the executions the graph replays
        self.on_fallback = on_fallback
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self._warm = 0
        self._said_other = False
        self._static_idx = self._static_step = self._static_stats = None

    def run(self, batch: Tensor, n: int, step0: int) -> Tensor:
        if self.failed:
            return super().run(batch, n, step0)
        if tuple(batch.shape) != self.shape or n != self.shape[0]:
            if not self._said_other:
                log.info("cuda graphs: an execution of %d steps of %d images (the graph's: %d of %d) runs eagerly; "
                         "this happens at an epoch's or the run's last execution", n, batch.shape[1], *self.shape)
                self._said_other = True
            return super().run(batch, n, step0)
        if self._warm < GRAPH_WARMUP_EXECUTIONS:
            self._warm += 1
            return self._side_stream(lambda: super(CudaGraphEngine, self).run(batch, n, step0))
        if self.graph is None:
            try:
                self._capture(batch)
            except Exception as exc:  # noqa: BLE001 - whatever stops the capture, training goes on eagerly
                self.failed, self.graph = True, None
                torch.cuda.synchronize()
                self.on_fallback(f"capture failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
                return super().run(batch, n, step0)
        self._static_idx.copy_(batch, non_blocking=True)
        self._static_step.fill_(step0)
        self.graph.replay()
        return self._static_stats

    def _side_stream(self, fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture(self, batch: Tensor) -> None:
        fns, n = self.fns, batch.shape[0]
        self._static_idx = batch.clone()
        self._static_step = torch.zeros((), dtype=torch.float32, device=batch.device)
        self.optimizer.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's memory pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rows = []
            for i in range(n):
                terms = fns.model.elbo_terms(fns.images(self._static_idx, i))
                objective = fns.objective(terms, fns.beta(self._static_step + i))
                self.optimizer.zero_grad(set_to_none=True)
                objective.backward()
                fns.clip_now()
                self.optimizer.step()
                rows.append(step_stats(terms, objective))
            self._static_stats = torch.stack(rows)
        self.graph = graph
        log.info("cuda graphs: captured %d optimiser steps as one graph; replayed for every full execution", n)


def batch_counts(batch, module=None) -> tuple[int, int]:
    """(optimiser steps, images) in one training batch: an execution, [n, B, C, H, W] images or [n, B] image
    indices, when `module` trains by execution plan (VAEModule); otherwise one step on len(batch) images."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if isinstance(getattr(module, "execution_plan", None), ExecutionPlan) and (x.dim() == 5 or x.dtype == torch.long):
        return x.shape[0], x.shape[0] * x.shape[1]
    return 1, x.shape[0]
