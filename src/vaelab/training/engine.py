"""The step engine: whole optimiser steps (the step's noise, its objective and statistics (step.py, the one step
function), zero_grad, backward, the gradient's norm and clipping, the optimiser's step, the finite check), N of them inside one Lightning `training_step`, run eagerly or replayed as one
CUDA graph. It is built from plain arguments (the model, the optimiser, the objective, how to clip, how often to
check) and returns StepStats; VAEModule, the Lightning adapter, logs what comes back.

Why: Lightning's loop costs about a millisecond a step whatever the model does. Several optimiser steps per
Lightning step spread that cost over N steps (the lever on a CPU); a whole-step CUDA graph (batch gather,
binarisation, forward, backward, fused Adam) turns N steps' hundreds of kernel launches into one replay that
runs while Lightning's Python goes on (the lever on a GPU). Plain PyTorch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

from vaelab.training.objective import Loss
from vaelab.training.stabilisers import WeightAverage, apply_unless_skipped
from vaelab.training.step import StepStats, grad_norm, step_objective
from vaelab.training.step_records import NonFiniteTracker

log = logging.getLogger("vaelab")

# trainer.steps_per_execution=auto, by device and engine, as measured by scripts/benchmarks/train_throughput.py
# (docs/speed.md): on a CPU 10 steps spread Lightning's per-step cost over ten; on a GPU 10 steps per replay
# come close to the bare graph loop, and 10 eager steps beat one.
AUTO_STEPS = {"cpu": 10, "cuda": 10, "cuda_graph": 10}

# Steps between NaN/inf checks when the recipe names none: every step on a CPU (free there: no sync to wait for);
# on an accelerator each check is a host-device sync, so every 50 steps (a non-finite step is still never saved:
# the module checks before validation and every checkpoint)
CHECK_EVERY = {"cpu": 1}
CHECK_EVERY_ELSEWHERE = 50

# Eager executions before capture: Adam's state must exist, and PyTorch's whole-network example warms up
# on a side stream so that lazily created handles (cuBLAS workspaces) are not made inside the capture.
GRAPH_WARMUP_EXECUTIONS = 2


class StepEngine:
    """Whole optimiser steps, eagerly, in a Python loop: the same calls, in the same order, as N Lightning steps.

    model: the VAE (its elbo_terms). optimizer: torch's, or Lightning's wrapper of it (DDP, fp16 scaling).
    loss: the objective (objective.Loss); its KL weight is read at each step's number over the epoch's steps, which
    the engine owns (start_epoch tells it; the module, the progress line and a stacked member ask it).
    images(batch, i): step i's images of a training batch (the data module's cut of its execution plan).
    clip: called between backward and the optimiser's step, returning the gradient's norm before clipping, as torch's
    clip_grad_norm_ does (None: no clipping; the norm is measured all the same, for train/grad_norm). backward: how to backpropagate
    (Lightning's manual_backward under DDP and fp16; Tensor.backward otherwise). check_every: steps between
    NaN/inf checks (1: every step, stopping before a non-finite objective reaches the weights; None: CHECK_EVERY
    for the model's device). The non-finite rule is the engine's: raise_if_nonfinite says it in one sentence.
    average: the weights' moving average to update after each applied step (stabilisers.py; None: none).
    skip_above: skip an update whose gradient norm before clipping is above this (None: never); a non-finite norm
    is left to fp16's loss scaler, or to the non-finite check."""

    name = "eager"

    def __init__(self, model: torch.nn.Module, optimizer, loss: Loss, images: Callable[[Tensor, int], Tensor],
                 clip: Callable[[], None] | None = None, backward: Callable[[Tensor], None] | None = None,
                 check_every: int | None = None, average: WeightAverage | None = None,
                 skip_above: float | None = None) -> None:
        self.model, self.optimizer, self.loss, self.images = model, optimizer, loss, images
        self.backward = backward or Tensor.backward
        self.params = params = [p for p in model.parameters() if p.requires_grad]
        self.clip = clip if clip is not None else (lambda: grad_norm(params))
        self.average, self.skip_above = average, skip_above
        if check_every is None:
            device = next(model.parameters()).device.type
            check_every = CHECK_EVERY.get(device, CHECK_EVERY_ELSEWHERE)
        self.check_every = check_every
        self.steps_per_epoch = 1  # told at every fit's and epoch's start (start_epoch)
        self.nonfinite = NonFiniteTracker(len(model.latent_dims), epoch_of=lambda step: step // self.steps_per_epoch)

    def start_epoch(self, steps_per_epoch: int) -> None:
        """An epoch (or a fit resumed inside one) starts: it holds this many optimiser steps, after the limits."""
        self.steps_per_epoch = max(1, int(steps_per_epoch))

    def raise_if_nonfinite(self) -> None:
        """One sync: a clear sentence (NonFiniteError) if any step so far had a NaN or infinite objective."""
        self.nonfinite.raise_if_any()

    def stop_at_first_nonfinite(self, stats: StepStats, step0: int) -> None:
        """Stop now, naming the step, if one of these steps' objectives is not finite (check_every=1's rule)."""
        bad = ~torch.isfinite(stats.objective)
        if bad.any():
            first = int(bad.nonzero()[0])
            self.nonfinite.track(stats.at(first), step0 + first)
            self.nonfinite.raise_if_any()

    def weight(self, step: int | Tensor) -> float | Tensor:
        """The KL weight at optimiser step `step` (a tensor inside a CUDA graph)."""
        return self.loss.weight(step, self.steps_per_epoch)

    def run(self, batch: Tensor, n: int, step0: int) -> StepStats:
        """Optimiser steps step0 .. step0 + n - 1 on the execution `batch`."""
        stats = StepStats(torch.stack([self._step(self.images(batch, i), step0 + i) for i in range(n)]))
        self._track(stats, step0)
        return stats

    def _step(self, x: Tensor, step: int | Tensor, check: bool = True) -> Tensor:
        """One whole optimiser step on images x (eagerly, or recorded into the CUDA graph: check=False, no host
        read); its StepStats row."""
        noise = self.loss.draw_noise(self.model, x.shape[0], x.device)
        objective, values = step_objective(self.model, x, noise, self.loss, self.weight(step))
        if check and self.check_every == 1 and not math.isfinite(objective.item()):  # free on a CPU: no sync to wait for
            row = StepStats.row(**values, grad_norm=objective.new_zeros(()), skipped_steps=objective.new_zeros(()))
            self.stop_at_first_nonfinite(StepStats(row[None]), step)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(objective)
        norm = self.clip()
        if self.skip_above is None:
            self._apply()
            skipped = torch.zeros_like(norm)
        else:
            skipped = (norm > self.skip_above) & torch.isfinite(norm)
            apply_unless_skipped(self._apply, skipped, self.optimizer, self.params, self.average)
        return StepStats.row(**values, grad_norm=norm, skipped_steps=skipped)

    def _apply(self) -> None:
        """The update: the optimiser's step, then the moving average's."""
        self.optimizer.step()
        if self.average is not None:
            self.average.update()

    def _track(self, stats: StepStats, step0: int) -> None:
        """Between checks, note the first non-finite step on the device; at each interval, look (on a GPU through
        an asynchronous copy, so the step never waits)."""
        every = self.check_every
        if every == 1:
            return
        self.nonfinite.track(stats, step0)
        if every and step0 // every != (step0 + stats.steps) // every:
            self.nonfinite.check()


class CudaGraphEngine(StepEngine):
    """N whole optimiser steps captured once as one CUDA graph and replayed for every full execution.

    The graph reads the execution's image indices from a static buffer (filled by a device-to-device copy)
    and its first step number from a device scalar (filled by a kernel, not copied from the host), so a replay
    needs no host-device synchronisation. Noise and binarisation draws come from the default CUDA generator,
    which PyTorch advances at every replay: each step gets fresh draws. Executions of another shape (the last
    of an epoch, the last before max_steps) run eagerly, with the same optimiser, said once in the log.
    shape: (steps per execution, batch size); on_fallback(reason) is told when capture fails.
    """

    name = "cuda_graph"

    def __init__(self, *args, shape: tuple[int, int], on_fallback: Callable[[str], None], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shape = tuple(shape)  # (steps per execution, batch size): the executions the graph replays
        self.on_fallback = on_fallback
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False
        self._warm = 0
        self._said_other = False
        self._static_idx = self._static_step = self._static_stats = None

    def run(self, batch: Tensor, n: int, step0: int) -> StepStats:
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
        stats = StepStats(self._static_stats)
        self._track(stats, step0)
        return stats

    def _side_stream(self, fn):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream().wait_stream(stream)
        return out

    def _capture(self, batch: Tensor) -> None:
        n = batch.shape[0]
        self._static_idx = batch.clone()
        self._static_step = torch.zeros((), dtype=torch.float32, device=batch.device)
        self.optimizer.zero_grad(set_to_none=True)  # grads are then allocated inside the graph's memory pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rows = [self._step(self.images(self._static_idx, i), self._static_step + i, check=False) for i in range(n)]
            self._static_stats = torch.stack(rows)
        self.graph = graph
        log.info("cuda graphs: captured %d optimiser steps as one graph; replayed for every full execution", n)
