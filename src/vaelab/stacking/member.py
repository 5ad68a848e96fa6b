"""A member of a stacked sweep: an ordinary run (vaelab-train's whole task, in a thread of the sweep's process)
whose optimiser steps its group runs as one stacked model (group.py). The stacked launcher hands the run a
MemberRunner where it is set up (vaelab-train's `runner`); VAEModule asks it, as it asks the solo runner
(training/runner.py), for its step engine and its evaluation. Its step engine, StackedEngine,
prepares exactly what the solo engine would use (the step's images as its data module cuts and binarises them,
the reparameterisation noise from the run's own generator in the order elbo_terms draws it, the KL weight, the
optimiser's current hyper-parameters) and hands it over; while it trains, its weights and Adam moments are views
of its slice of the stack, so its validation, checkpoints and test read what the stacked steps wrote. Everything
else is the solo run's code."""

from __future__ import annotations

import torch
from torch import Tensor

from vaelab.evaluation.metrics import EvalMetrics
from vaelab.stacking.stack import STACKED_OPTIMIZERS, hyper_row
from vaelab.stacking.turns import EvalRequest, Member, Request, StackError
from vaelab.training.callbacks.preemption import Preemption
from vaelab.training.engine import StepEngine
from vaelab.training.runner import Solo
from vaelab.training.step import StepStats

__all__ = ["MemberRunner", "StackError", "StackedEngine", "optimizer_kind"]


class MemberRunner(Solo):
    """How a stacked sweep's member trains and evaluates: its steps, and its evaluation batches, run by its group
    with the other members'. Everything else is the solo run's."""

    shares_process = True

    def __init__(self, member: Member) -> None:
        self.member = member
        self.stacked: StackedEngine | None = None

    def engine(self, args: dict, plan, batch_size: int, max_epochs: int, max_grad_norm: float | None) -> StepEngine:
        self.stacked = StackedEngine(**args, member=self.member, max_grad_norm=max_grad_norm)
        self.stacked.attach(plan.steps if plan is not None else 1, batch_size, max_epochs)
        return self.stacked

    def join(self, trainer) -> None:
        """The run's stop callbacks are flagged by the group's signal handler (a member's thread sets none)."""
        for callback in trainer.callbacks:
            if isinstance(callback, Preemption):
                self.member.watch(callback)

    def leave(self) -> None:
        if self.stacked is not None:
            self.stacked.detach()

    @torch.no_grad()
    def evaluate(self, metrics: EvalMetrics, model: torch.nn.Module, x: Tensor, index: Tensor | None = None) -> None:
        """The same outputs as metrics.update(model, x, index), from the group's vmapped pass over every member
        evaluating a batch of this shape: the member draws what update would draw (the ELBO's noise from its own
        generator, the NLL's common random numbers), and records what comes back."""
        needs_index = metrics.nll is not None and index is None  # fresh importance draws: only update's own
        if needs_index or getattr(model, "spec", lambda: None)() is None:
            metrics.update(model, x, index)
            return
        member = self.member
        chunks = [] if metrics.nll is None else [c.to(x.dtype) for c in metrics.importance_noise(x.shape[0], index,
                                                                                                   x.device)]
        request = EvalRequest(model, {n: p.detach() for n, p in model.named_parameters()}, x,
                              model.draw_noise(x.shape[0], x.device), chunks)
        member.group.step(member.index, request)
        metrics.record(*request.result)


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str | None:
    """How the stack runs this optimiser (adam | adamw | adam_normgrad), or None when it cannot."""
    cls = type(optimizer)
    group = optimizer.param_groups[0]
    if group.get("amsgrad") or group.get("maximize") or len(optimizer.param_groups) != 1:
        return None
    return STACKED_OPTIMIZERS.get(f"{cls.__module__}.{cls.__qualname__}")


class StackedEngine(StepEngine):
    """The solo engine's contract (run n optimiser steps, return their StepStats, stop before a non-finite step)
    with the steps run by the member's group, stacked with the other members'."""

    name = "stacked"

    def __init__(self, *args, member: Member, max_grad_norm: float | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.member, self.max_grad_norm = member, max_grad_norm
        self.kind = optimizer_kind(self.optimizer)
        if self.kind is None:
            raise StackError(f"{type(self.optimizer).__name__} cannot be stacked; run this sweep with "
                             "hydra/launcher=basic or joblib, or use optim=adam, adamw or adam_normgrad")
        self.params = dict(self.model.named_parameters())
        self.shared = None
        self.max_epochs = -1

    def attach(self, steps: int, batch: int, max_epochs: int = -1) -> None:
        """Join the stack: this run's weights and Adam state (initial, or as its checkpoint restored them) go into
        its slice, which the run's parameters and moments then view."""
        adam = None
        states = [self.optimizer.state.get(p) for p in self.params.values()]
        if all(s and "exp_avg" in s for s in states):
            adam = {"step": float(states[0]["step"]), "exp_avg": {n: s["exp_avg"] for n, s in zip(self.params, states)},
                    "exp_avg_sq": {n: s["exp_avg_sq"] for n, s in zip(self.params, states)}}
        spec = self.model.spec()
        if spec is None:
            raise StackError("this model has parts no spec describes (a custom encoder), so it cannot be stacked")
        built = {"spec": spec, "image shape": "x".join(map(str, self.model.image_shape)), "batch size": batch,
                 "steps per execution": steps, "optimizer": self.kind, "loss": self.loss}
        averaged = dict(self.average.model.named_parameters()) if self.average is not None else None
        shared = self.member.group.register(self.member.index, built, {n: p.detach() for n, p in self.params.items()},
                                            adam, None if averaged is None else {n: a.detach() for n, a in averaged.items()})
        i = self.member.index
        self.shared, self.slots, self.max_epochs = shared, shared["slots"], max_epochs
        for name, p in self.params.items():
            p.data = shared["params"][name][i]
            self.optimizer.state[p] = {"step": shared["step"][i], "exp_avg": shared["exp_avg"][name][i],
                                       "exp_avg_sq": shared["exp_avg_sq"][name][i]}
        for name, a in (averaged or {}).items():  # the average, updated by the stack after each applied step
            a.data = shared["ema"][name][i]

    def run(self, batch: Tensor, n: int, step0: int) -> StepStats:
        if self.shared is None:
            raise StackError("the stacked engine ran a step before it joined its stack")
        i, slots = self.member.index, self.slots
        size = 0
        for k in range(n):  # the solo engine's order of draws: step k's images, then its noise
            x = self.images(batch, k)
            size = x.shape[0]
            slots["images"][i, k, :size].copy_(x)
            slots["noise"][i, k, ..., :size, :].copy_(self.loss.draw_noise(self.model, size, x.device))
            slots["weight"][i, k] = float(self.weight(step0 + k))
        group = self.optimizer.param_groups[0]
        rate = self.average.rate if self.average is not None else 0.0
        slots["hyper"][i] = torch.tensor(hyper_row(group, self.kind, self.max_grad_norm, self.skip_above, rate))
        slots["free_bits"][i] = self.loss.free_bits
        self.member.group.step(i, Request(n, size, step0, self.steps_per_epoch, self.max_epochs))
        # stepped, by the stack: torch's schedulers warn of a schedule stepped before its optimiser, and read that
        # from the optimiser's private _opt_called, which only its own step sets (no public way; test_stacked.py's
        # scheduled members pin that no such warning shows)
        self.optimizer._opt_called = True
        stats = StepStats(slots["step_rows"][i, :n].clone())
        if self.check_every == 1:  # the solo engine stops before a non-finite step; the stack did not apply it
            self.stop_at_first_nonfinite(stats, step0)
        self._track(stats, step0)
        return stats

    def detach(self) -> None:
        """Leave the stack: the run's weights and moments become its own copies again, then the group is told,
        so that nothing a later stacked step writes can reach this run (its test phase loads the best checkpoint)."""
        if self.shared is None:
            return
        if self.average is not None:
            for a in self.average.model.parameters():
                a.data = a.data.clone()
        for p in self.params.values():
            p.data = p.data.clone()
            state = self.optimizer.state.get(p, {})
            for key, value in state.items():
                state[key] = value.clone()
        self.shared = None
        self.member.group.retire(self.member.index)
