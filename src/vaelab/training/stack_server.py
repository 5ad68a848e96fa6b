"""The stack server: one process holds a group's stacked model (stack.py) and runs every member's optimiser steps
at once, while each member stays an ordinary run in its own process (stack_member.py): its own data order and draws,
validation, checkpoints, early stopping, loggers, test phase and results.json.

Lock step. A member registers when its training starts (its initial or resumed weights and Adam state go into
its slice of the stack, which it then views); asks for n steps by writing its images, noise, KL weights and
hyper-parameters into its slots and sending ("step", n, batch); and retires when its training ends (done, early
stopped, diverged or preempted), after which its slice is never written again. The server steps when every
member still connected is waiting for steps or has retired, so that a member validating or saving holds the
others up only as long as it would hold itself up alone. A member whose process ends (finished or crashed) is
retired by its closed connection: the others go on.

Never a hang: a member whose model, image shape or batch differs from its stack's is refused in one sentence
naming both; a member that neither asks for a step nor leaves for `member_timeout` seconds while the others wait is
named and stopped (on_stuck: SIGTERM, which saves its checkpoint; SIGKILL if it still does not leave).
"""

from __future__ import annotations

import json
import logging
import signal
import time
from multiprocessing.connection import Connection, wait

import torch

from vaelab.models.build import build_from_spec
from vaelab.training.engine import StepStats
from vaelab.training.stack import HYPER, Stack

log = logging.getLogger("vaelab")

SETUP, TRAINING, PENDING, RETIRED, GONE = "setup", "training", "pending", "retired", "gone"


class Slots:
    """What members write for their steps and read back, one slice per member, in shared memory on a CPU."""

    def __init__(self, n: int, steps: int, batch: int, image_shape, noise_dim: int, layers: int, device) -> None:
        def zeros(*shape) -> torch.Tensor:
            t = torch.zeros(shape, device=device)
            return t.share_memory_() if torch.device(device).type == "cpu" else t

        self.images = zeros(n, steps, batch, *image_shape)
        self.noise = zeros(n, steps, batch, noise_dim)
        self.weight = zeros(n, steps)
        self.hyper = torch.zeros(n, len(HYPER)).share_memory_()  # on the host: the optimiser reads it there
        self.step_rows = zeros(n, steps, layers + 2)  # StepStats rows, one table per member

    def tensors(self) -> dict[str, torch.Tensor]:
        return vars(self)


class StackServer:
    """Serves one group of `n` members over their connections, until every member's process has ended."""

    def __init__(self, conns: list[Connection], device: str = "cpu", on_message=None, names: list[str] | None = None,
                 member_timeout: float = 600.0, on_stuck=None) -> None:
        self.conns, self.n, self.device = conns, len(conns), torch.device(device)
        self.names = names or [f"member {i}" for i in range(self.n)]
        self.member_timeout, self.on_stuck = member_timeout, on_stuck
        self.stopping: dict[int, float] = {}  # stuck members told to stop, and when
        self.joined: dict | None = None  # what the first member to join built: the stack's shape
        self.status = [SETUP] * self.n
        self.pending: dict[int, tuple[int, int]] = {}
        self.results: list = [None] * self.n
        self.stack: Stack | None = None
        self.slots: Slots | None = None
        self.steps_run = 0
        self.on_message = on_message

    def serve(self) -> list:
        """Serve until every member has gone; return what each sent as its result (None if it sent none)."""
        waiting_since = None
        while any(s != GONE for s in self.status):
            live = {self.conns[i]: i for i in range(self.n) if self.status[i] != GONE}
            ready = wait(list(live), timeout=1.0)
            for conn in ready:
                self._receive(live[conn])
            if self.pending and not any(s in (SETUP, TRAINING) for s in self.status):
                self._run_pending()
            if not self.pending:
                waiting_since = None
            elif waiting_since is None:
                waiting_since = time.monotonic()
            elif time.monotonic() - waiting_since > self.member_timeout:
                self._stop_laggards()
                waiting_since = time.monotonic()
        return self.results

    def _stop_laggards(self) -> None:
        """The members the others have waited on for member_timeout seconds: told to stop (their checkpoint is
        saved at their next step, as at any stop signal), then killed if they have not left after another wait."""
        for i, status in enumerate(self.status):
            if status not in (SETUP, TRAINING):
                continue
            kill = i in self.stopping
            log.error("stacked launcher: %s has neither asked for a step nor left its stack for %.0f s while %d "
                      "other member(s) waited; %s", self.names[i], self.member_timeout, len(self.pending),
                      "killing it (its checkpoints saved so far are whole)" if kill else
                      "stopping it (SIGTERM: it saves a checkpoint; continue it with resume=auto)")
            self.stopping[i] = time.monotonic()
            if self.on_stuck is not None:
                self.on_stuck(i, kill)

    def _receive(self, i: int) -> None:
        try:
            message = self.conns[i].recv()
        except (EOFError, OSError):  # the member's process ended: it trains no more
            self.status[i] = GONE
            self.pending.pop(i, None)
            return
        kind = message[0]
        if kind == "register":
            refused = self._refusal(i, message[1])
            if refused:
                self.conns[i].send(("refused", refused))
                self.status[i] = RETIRED
                return
            self.conns[i].send(("registered", self._register(i, message[1])))
            self.status[i] = TRAINING
        elif kind == "step":
            self.pending[i] = (message[1], message[2])
            self.status[i] = PENDING
        elif kind == "retire":
            self.status[i] = RETIRED
            self.pending.pop(i, None)
        elif kind == "result":
            self.results[i] = message[1]
        elif self.on_message is not None:
            self.on_message(i, message)

    def _refusal(self, i: int, member: dict) -> str | None:
        """Why member i cannot join this stack (what it built differs from the stack's), or None."""
        built = {"model": json.dumps(member["spec"], sort_keys=True, default=str),
                 "image shape": "x".join(map(str, member.get("image_shape", ()))), "batch size": member["batch"],
                 "steps per execution": member["steps"], "optimiser": member["optimizer"]}
        if self.joined is None:
            self.joined = {"built": built, "by": self.names[i]}
            return None
        differs = [k for k in built if built[k] != self.joined["built"][k]]
        if not differs:
            return None
        shown = "; ".join(f"{k} {built[k]} against {self.joined['built'][k]}" for k in differs if k != "model")
        return (f"{self.names[i]} cannot join the stack of {self.joined['by']}: its {', '.join(differs)} differ"
                f"{f' ({shown})' if shown else ''}; run these jobs with hydra.launcher.stack=false, or sweep them "
                "apart")

    def _register(self, i: int, member: dict) -> dict:
        """Put member i's weights and Adam state into its slice; hand back the shared tensors it views."""
        if self.stack is None:
            template = build_from_spec(member["spec"]).to(self.device)
            self.stack = Stack(template, self.n, member["optimizer"], share=True)
            self.slots = Slots(self.n, member["steps"], member["batch"], template.image_shape,
                               sum(template.latent_dims), len(template.latent_dims), self.device)
            log.info("stacked: %d members of %s, %s, on %s", self.n, type(template).__name__,
                     f"{sum(p.numel() for p in template.parameters()):,} parameters each", self.device)
        stack = self.stack
        with torch.no_grad():
            for name, value in member["params"].items():
                stack.params[name][i].copy_(value)
            state = member.get("adam")
            stack.step[i] = float(state["step"]) if state else 0.0
            for name in stack.names:
                stack.exp_avg[name][i].copy_(state["exp_avg"][name] if state else 0.0)
                stack.exp_avg_sq[name][i].copy_(state["exp_avg_sq"][name] if state else 0.0)
        return {"index": i, "params": stack.params, "exp_avg": stack.exp_avg, "exp_avg_sq": stack.exp_avg_sq,
                "step": stack.step, "slots": self.slots.tensors()}

    def _run_pending(self) -> None:
        """Run every pending member's steps, each step of all of them as one stacked step, then answer them."""
        stack, slots = self.stack, self.slots
        waiting = sorted(self.pending)
        for batch in sorted({b for _, b in self.pending.values()}):  # members of a group share their batch sizes
            group = [i for i in waiting if self.pending[i][1] == batch]
            counts = torch.zeros(self.n, dtype=torch.long)
            counts[group] = torch.tensor([self.pending[i][0] for i in group])  # steps each member asked for
            counts = counts.to(self.device)
            stopped = torch.zeros(self.n, dtype=torch.bool, device=self.device)
            for k in range(max(self.pending[i][0] for i in group)):
                active = counts > k
                weight = torch.where(stopped, torch.nan, slots.weight[:, k])  # a stopped member's objective: NaN
                step = StepStats(stack.train_step(slots.images[:, k, :batch], slots.noise[:, k, :batch], weight,
                                                  slots.hyper, active))  # one row per member
                slots.step_rows[:, k] = torch.where(active[:, None], step.table, slots.step_rows[:, k])
                # a member whose objective is not finite takes no further step: the solo engine stops there
                stopped |= ~torch.isfinite(step.objective)
                self.steps_run += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for i in waiting:
            self.status[i] = TRAINING
            self.conns[i].send(("done",))
        self.pending.clear()


def ignore_stop_signals() -> None:
    """The server outlives a stop signal: every member saves its own checkpoint and then leaves, and the server
    ends when the last one has gone (the launcher forwards a signal it receives to the members)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
