"""A member of a stacked sweep: an ordinary run (vaelab-train's whole app, in its own process) whose optimiser steps
the group's stack server runs (stack_server.py). Its step engine, StackedEngine, prepares exactly what the solo engine
would use (the step's images as its data module cuts and binarises them, the reparameterisation noise from the
run's own generator in the order elbo_terms draws it, the KL weight, the optimiser's current hyper-parameters)
and hands it over; its weights and Adam moments are views of its slice of the stack while it trains, so its
validation, checkpoints and test read what the server wrote. Everything else is the solo run's code."""

from __future__ import annotations

import torch
from torch import Tensor

from vaelab.errors import VaelabError
from vaelab.training.engine import StepEngine, StepStats
from vaelab.training.stack import STACKED_OPTIMIZERS, hyper_row

_LINK = None  # this process's connection to its stack server, when it is a member of a stacked sweep


def join(conn) -> None:
    """Make this process a member of the stack served over `conn` (the launcher calls it in the member)."""
    global _LINK
    _LINK = conn


def linked():
    return _LINK


def optimizer_kind(optimizer: torch.optim.Optimizer) -> str | None:
    """How the stack runs this optimiser (adam | adamw | adam_normgrad), or None when it cannot."""
    cls = type(optimizer)
    group = optimizer.param_groups[0]
    if group.get("amsgrad") or group.get("maximize") or len(optimizer.param_groups) != 1:
        return None
    return STACKED_OPTIMIZERS.get(f"{cls.__module__}.{cls.__qualname__}")


class StackError(VaelabError):
    pass


class StackedEngine(StepEngine):
    """The solo engine's contract (run n optimiser steps, return their StepStats, stop before a non-finite step)
    with the steps run by the stack server."""

    name = "stacked"

    def __init__(self, *args, conn, max_grad_norm: float | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conn, self.max_grad_norm = conn, max_grad_norm
        self.kind = optimizer_kind(self.optimizer)
        if self.kind is None:
            raise StackError(f"{type(self.optimizer).__name__} cannot be stacked; run this sweep with "
                             "hydra/launcher=basic or joblib, or use optim=adam, adamw or adam_normgrad")
        self.params = dict(self.model.named_parameters())
        self.shared = None

    def attach(self, steps: int, batch: int) -> None:
        """Register with the server: this run's weights and Adam state (initial, or as its checkpoint restored
        them) go into its slice, which the run's parameters and moments then view."""
        adam = None
        states = [self.optimizer.state.get(p) for p in self.params.values()]
        if all(s and "exp_avg" in s for s in states):
            adam = {"step": float(states[0]["step"]),
                    "exp_avg": {n: s["exp_avg"].detach().cpu() for n, s in zip(self.params, states)},
                    "exp_avg_sq": {n: s["exp_avg_sq"].detach().cpu() for n, s in zip(self.params, states)}}
        spec = self.model.spec()
        if spec is None:
            raise StackError("this model has parts no spec describes (a custom encoder), so it cannot be stacked")
        self._send(("register", {"spec": spec, "image_shape": list(self.model.image_shape), "optimizer": self.kind,
                                 "steps": steps, "batch": batch,
                                 "params": {n: p.detach().cpu() for n, p in self.params.items()}, "adam": adam}))
        reply = self._receive()
        i = reply["index"]
        self.index, self.shared = i, reply
        self.slots = reply["slots"]
        for name, p in self.params.items():
            p.data = reply["params"][name][i]
            self.optimizer.state[p] = {"step": reply["step"][i], "exp_avg": reply["exp_avg"][name][i],
                                       "exp_avg_sq": reply["exp_avg_sq"][name][i]}

    def run(self, batch: Tensor, n: int, step0: int) -> StepStats:
        if self.shared is None:
            raise StackError("the stacked engine ran a step before it registered with its server")
        i, slots = self.index, self.slots
        size = 0
        for k in range(n):  # the solo engine's order of draws: step k's images, then its noise
            x = self.images(batch, k)
            size = x.shape[0]
            slots["images"][i, k, :size].copy_(x)
            slots["noise"][i, k, :size].copy_(self.model.draw_noise(size, x.device))
            slots["weight"][i, k] = float(self.weight(step0 + k))
        group = self.optimizer.param_groups[0]
        slots["hyper"][i].copy_(torch.tensor(hyper_row(group, self.kind, self.max_grad_norm, self.loss.free_bits)))
        self._send(("step", n, size))
        self._receive()
        self.optimizer._opt_called = True  # stepped, by the server: a schedule's step after it is in order
        stats = StepStats(slots["step_rows"][i, :n].clone())
        if self.check_every == 1:  # the solo engine stops before a non-finite step; the server did not apply it
            bad = ~torch.isfinite(stats.objective)
            if bad.any():
                first = int(bad.nonzero()[0])
                self.nonfinite.track(stats.at(first), step0 + first)
                self.nonfinite.raise_if_any()
        self._track(stats, step0)
        return stats

    def detach(self) -> None:
        """Leave the stack: the run's weights and moments become its own copies again, then the server is told,
        so that nothing it writes later can reach this run (its test phase loads the best checkpoint)."""
        if self.shared is None:
            return
        for p in self.params.values():
            p.data = p.data.clone()
            state = self.optimizer.state.get(p, {})
            for key, value in state.items():
                state[key] = value.clone()
        self.shared = None
        try:
            self._send(("retire",))
        except StackError:
            pass

    def _send(self, message) -> None:
        try:
            self.conn.send(message)
        except (OSError, EOFError):
            raise StackError("the sweep's stack server has gone (its process ended); the checkpoints saved so far "
                             "are whole: rerun the sweep with resume=auto") from None

    def _receive(self):
        try:
            kind, *payload = self.conn.recv()
        except (OSError, EOFError):
            raise StackError("the sweep's stack server has gone (its process ended); the checkpoints saved so far "
                             "are whole: rerun the sweep with resume=auto") from None
        if kind == "refused":
            raise StackError(payload[0])
        return payload[0] if payload else None
