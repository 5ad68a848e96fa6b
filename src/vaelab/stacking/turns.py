"""A stacked sweep's members taking turns: what a member hands its group (Request: optimiser steps; EvalRequest: an evaluation batch), and the Member itself: its state between turns,
with the per-process state it owns while it runs (generators, logging handlers, whatever else its launcher names),
saved and restored at each hand-over. group.py's StackGroup runs the turns."""

from __future__ import annotations

import logging
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from vaelab.errors import VaelabError

READY, WAITING, DONE = "ready", "waiting", "done"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class StackError(VaelabError):
    """A member that cannot join its stack, or a stack that cannot go on: said in one line."""


def logging_state(names) -> dict:
    """These loggers' handlers and settings ("": the root logger), as Hydra's job logging config sets them."""
    return {name: (list(lg.handlers), lg.level, lg.propagate, lg.disabled)
            for name, lg in ((n, logging.getLogger(n)) for n in names)}


def restore_logging(state: dict) -> None:
    for name, (handlers, level, propagate, disabled) in state.items():
        lg = logging.getLogger(name)
        lg.handlers[:], lg.level, lg.propagate, lg.disabled = handlers, level, propagate, disabled


class Group(Protocol):
    """What a member asks of its group (group.py's StackGroup): to join the stack, to have its steps or evaluation
    batch run, to leave; and what it reads at a hand-over (the signal that came, the state it owns while it runs)."""

    signalled: str | None
    swaps: list[tuple[Callable, Callable]]

    def logger_names(self) -> tuple[str, ...]: ...

    def register(self, i: int, built: dict, params: dict, adam: dict | None) -> dict: ...

    def step(self, i: int, request: Request | EvalRequest) -> None: ...

    def retire(self, i: int) -> None: ...


@dataclass
class Request:
    """Optimiser steps a member asked for: n steps of `size` images, from its step `step0`."""

    n: int
    size: int
    step0: int
    steps_per_epoch: int
    max_epochs: int


@dataclass
class EvalRequest:
    """One evaluation batch of a member (validation or test): its model (whose structure the pass uses) and
    weights, the images [B, C, H, W], the reparameterisation noise [B, sum D] that elbo_terms would draw, and the
    importance samples' common random numbers, one [n, B, sum D] tensor per decoder pass ([] without the NLL).
    `result`, once run: recon [B], kl_layers [L, B], the posterior means per layer, the log-weights [K, B]."""

    model: torch.nn.Module
    params: dict
    x: torch.Tensor
    noise: torch.Tensor
    chunks: list
    result: tuple | None = None

    def signature(self) -> tuple:
        return (tuple(self.x.shape), tuple(self.noise.shape), tuple(tuple(c.shape) for c in self.chunks))


@dataclass
class Member:
    """A member's thread and what it holds between its turns."""

    index: int
    name: str
    group: Group
    status: str = READY
    joined: bool = False  # registered with the stack and not yet retired: its steps are stacked
    request: Request | EvalRequest | None = None
    preemptions: list = field(default_factory=list)  # its Preemption callbacks, flagged by the group's signal handler
    exit_code: object = None  # SystemExit's code, when the member's job ended by one
    result: object = None
    saved: tuple | None = None
    told_to_stop: bool = False

    def watch(self, preemption) -> None:
        """Flag this Preemption callback when the process gets a stop signal (the group's handler does)."""
        if preemption not in self.preemptions:
            self.preemptions.append(preemption)
        if self.group.signalled and preemption.signal_name is None:
            preemption.signal_name = self.group.signalled

    def stop(self, name: str) -> None:
        for preemption in self.preemptions:
            preemption.signal_name = preemption.signal_name or name

    # -- the per-process state a member owns while it runs -----------------------------------------
    def save(self) -> None:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        self.saved = (torch.get_rng_state(), cuda, random.getstate(), np.random.get_state(),
                      logging_state(self.group.logger_names()), [get() for get, _ in self.group.swaps])

    def restore(self) -> None:
        if self.saved is None:  # its first turn: it sets up its own state (seeds, logging) as a run alone does
            return
        torch_rng, cuda, py_rng, np_rng, loggers, extra = self.saved
        torch.set_rng_state(torch_rng)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py_rng)
        np.random.set_state(np_rng)
        restore_logging(loggers)
        for (_, put), value in zip(self.group.swaps, extra):
            put(value)
