"""A stacked sweep's group, in one process: N members, each an ordinary run (vaelab-train's whole task: its run
directory, loggers, checkpoints, early stopping, test phase, results.json) in a thread of its own, and one Stack
(stack.py) that runs all their optimiser steps at once, and their evaluation batches as one vmapped pass of the
one evaluation function (evaluation/metrics.py evaluation_outputs).

Turns. The members' threads take turns, one at a time (a baton). A member runs its own Python (its Lightning
loop, validation, checkpoints, logging) until it asks for optimiser steps (StackedEngine.run) or ends, and then
hands the turn on. When no member is left to run, every member still training waits for its steps: they run as
stacked steps, each member's step masked in or out (stack.py), and the members take turns again. So a member
needs no lock, and the per-process state it uses is its own while it runs: at each hand-over the group saves the
member's generators (torch's, CUDA's, Python's, NumPy's) and logging handlers, with whatever else the launcher
names (Hydra's job config), and restores the next member's. A member at another step than the others (resumed from
an older checkpoint), validating, saving or ended holds the others up only as long as it runs.

Signals. Only the main thread receives them: the group's handler flags every member's Preemption callback
(each member's runner registers its run's: member.py), and each member saves at its next stop point and ends, as a
run alone does. A member that neither asks for a step nor leaves its stack for `member_timeout` seconds while others
wait is named in one line and flagged the same way.

Why it is long: the turns (the baton, the hand-overs, the watchdog, the signals) and the stacked rounds they lead to
(registration, training steps, evaluation passes) are one protocol over one lock and one member table; the member's
side of it is turns.py, the progress line progress.py.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable

import torch
from torch.func import functional_call, vmap

from vaelab.console import plural
from vaelab.evaluation.metrics import evaluation_outputs
from vaelab.models.build import build_from_spec
from vaelab.stacking.progress import Progress
from vaelab.stacking.stack import HYPER, Stack
from vaelab.stacking.turns import (
    DONE,
    READY,
    STOP_SIGNALS,
    WAITING,
    EvalRequest,
    Member,
    Request,
    StackError,
)
from vaelab.training.objective import Loss
from vaelab.training.step import StepStats
from vaelab.training.stops import first_stop

log = logging.getLogger("vaelab")


class _Evaluation(torch.nn.Module):
    """The one evaluation function (evaluation_outputs) as a module of a member's model, every draw given: a pure
    function of the weights, for vmap over members (functional_call replaces `model.*`)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x, noise, chunks):
        outputs = evaluation_outputs(self.model, x, noise, [(c.shape[0], c) for c in chunks] if chunks else None)
        return outputs[:3] + ((x.new_zeros(0),) if outputs[3] is None else outputs[3:])


class StackGroup:
    """N members taking turns in one process, their optimiser steps run as one stacked model on `device`.

    swaps: (get, set) pairs of further per-process state each member owns (the launcher's: Hydra's job config).
    on_end(i): told in member i's thread once its job has ended (the launcher's line for it)."""

    def __init__(self, names: list[str], device: str = "cpu", member_timeout: float = 600.0,
                 swaps: list[tuple[Callable, Callable]] | None = None, logger_names: tuple[str, ...] = (),
                 on_end: Callable[[int], None] | None = None) -> None:
        self.members = [Member(i, name, self) for i, name in enumerate(names)]
        self.n, self.device = len(names), torch.device(device)
        self.member_timeout, self.swaps, self.on_end = member_timeout, swaps or [], on_end
        self._logger_names = ("", *logger_names)
        self.cond = threading.Condition()
        self.turn: int | None = None
        self.turn_since = time.monotonic()
        self.signalled: str | None = None
        self.broken: BaseException | None = None
        self.stack: Stack | None = None
        self.slots: dict[str, torch.Tensor] = {}
        self.first: dict | None = None  # what the first member to join built: the stack's shape
        self.steps_run = 0
        self.progress = Progress(self.members)

    def logger_names(self) -> tuple[str, ...]:
        return self._logger_names

    # -- running the members ------------------------------------------------------------------------
    def run(self, jobs: list[Callable[[], object]]) -> None:
        """Run jobs[i] as member i, taking turns, until every one has ended; stop signals flag every member."""
        threads = [threading.Thread(target=self._member_main, args=(i, job), daemon=True,
                                    name=f"vaelab-member-{i}") for i, job in enumerate(jobs)]
        previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._signal)
        try:
            self.turn, self.turn_since = 0, time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.05)
                    self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.progress.close()

    def _member_main(self, i: int, job: Callable[[], object]) -> None:
        member = self.members[i]
        self._wait_turn(i)
        try:
            member.result = job()
        except SystemExit as stop:  # vaelab-train's way out: a stop signal (its checkpoint saved) or its error, said
            member.exit_code = stop.code
        finally:
            if self.on_end is not None:
                self.on_end(i)
            self._hand_on(i, DONE)

    def _wait_turn(self, i: int) -> None:
        with self.cond:
            while self.turn != i:
                self.cond.wait()
        self.members[i].restore()

    def _next_ready(self, after: int) -> int | None:
        for k in range(1, self.n + 1):
            j = (after + k) % self.n
            if self.members[j].status == READY:
                return j
        return None

    def _hand_on(self, i: int, status: str) -> None:
        """Member i stops running (it waits for steps, or has ended): the next ready member runs; when none is,
        the waiting members' steps run here, and the turns start again."""
        member = self.members[i]
        if status != DONE:
            member.save()
        with self.cond:
            member.status = status
            nxt = self._next_ready(i)
            self.turn = nxt
            self.turn_since = time.monotonic()
            self.cond.notify_all()
        if nxt is None and any(m.status == WAITING for m in self.members):
            try:
                self._run_waiting()
            except Exception as exc:  # noqa: BLE001 - every waiting member hears it in one line, none waits on it
                self.broken = exc
            with self.cond:
                for m in self.members:
                    if m.status == WAITING:
                        m.status = READY
                self.turn = self._next_ready(self.n - 1)  # each round in member order: 0, 1, ...
                self.turn_since = time.monotonic()
                self.cond.notify_all()
        if status == WAITING:
            self._wait_turn(i)

    # -- signals and members that hold the others up ---------------------------------------------------
    def _signal(self, signum, frame) -> None:
        self.signalled = first_stop(signum, self.signalled, "every member saves at the end of its step")
        for member in self.members:
            member.stop(signal.Signals(signum).name)

    def _watch(self) -> None:
        """Name and stop a member that has held the turn for member_timeout seconds in training, while other
        members wait for it (for their turn or their steps)."""
        i = self.turn
        if i is None or time.monotonic() - self.turn_since < self.member_timeout:
            return
        member = self.members[i]
        waiting = sum(m.status != DONE for m in self.members if m is not member)  # held up by it
        if not member.joined or member.told_to_stop or not waiting:
            return
        member.told_to_stop = True
        log.error("stacked launcher: %s has neither asked for a step nor left its stack for %.0f s while %d other "
                  "member(s) waited; stopping it as SIGTERM would (it saves a checkpoint at its next step; continue "
                  "it with resume=auto)", member.name, self.member_timeout, waiting)
        member.stop("SIGTERM")

    # -- the stack -------------------------------------------------------------------------------------
    def register(self, i: int, built: dict, params: dict, adam: dict | None, average: dict | None = None) -> dict:
        """Member i joins: its weights, Adam state and weights' average (initial, or as its checkpoint restored them)
        go into its slice of the stack; returns the stacked tensors whose slice i it then views. A member whose model, image
        shape, batch, steps per execution or optimiser differ from the first member's is refused in one sentence."""
        refused = self._refusal(i, built)
        if refused:
            raise StackError(refused)
        if self.stack is None:
            with torch.random.fork_rng(devices=[]):  # its initial weights are never used: the member's RNG is left as it was
                template = build_from_spec(built["spec"]).to(self.device)
            loss = built.get("loss") or Loss()
            self.stack = Stack(template, self.n, built["optimizer"], loss)
            steps, batch = built["steps per execution"], built["batch size"]
            zeros = lambda *shape: torch.zeros(shape, device=self.device)  # noqa: E731
            self.slots = {"images": zeros(self.n, steps, batch, *template.image_shape),
                          "noise": zeros(self.n, steps, *loss.noise_shape(batch, sum(template.latent_dims))),
                          "weight": zeros(self.n, steps),
                          # on the host, filled there by the members: moved once a round
                          "hyper": torch.zeros(self.n, len(HYPER)), "free_bits": torch.zeros(self.n),
                          "step_rows": zeros(self.n, steps, StepStats.width(len(template.latent_dims)))}
            log.info("stacked: %s of %s, %s, on %s", plural(self.n, "member"), type(template).__name__,
                     f"{sum(p.numel() for p in template.parameters()):,} parameters each", self.device)
        stack = self.stack
        with torch.no_grad():
            for name, value in params.items():
                stack.params[name][i].copy_(value)
            stack.step[i] = float(adam["step"]) if adam else 0.0
            for name in stack.names:
                stack.exp_avg[name][i].copy_(adam["exp_avg"][name] if adam else 0.0)
                stack.exp_avg_sq[name][i].copy_(adam["exp_avg_sq"][name] if adam else 0.0)
            if average is not None:
                stack.add_average()
                for name, value in average.items():
                    stack.ema[name][i].copy_(value)
        self.members[i].joined = True
        return {"params": stack.params, "exp_avg": stack.exp_avg, "exp_avg_sq": stack.exp_avg_sq, "step": stack.step,
                "ema": stack.ema, "slots": self.slots}

    def _refusal(self, i: int, built: dict) -> str | None:
        loss = built.get("loss") or Loss()  # the ELBO unless the member says otherwise
        shown = {**built, "model": json.dumps(built["spec"], sort_keys=True, default=str),
                 "objective": "{} (k={})".format(*loss.shape())}
        shown.pop("spec")
        shown.pop("loss", None)
        if self.first is None:
            self.first = {"built": shown, "by": self.members[i].name}
            return None
        differs = [k for k in shown if shown[k] != self.first["built"][k]]
        if not differs:
            return None
        values = "; ".join(f"{k} {shown[k]} against {self.first['built'][k]}" for k in differs if k != "model")
        return (f"{self.members[i].name} cannot join the stack of {self.first['by']}: its {', '.join(differs)} "
                f"differ{f' ({values})' if values else ''}; run these jobs with hydra.launcher.stack=false, or sweep "
                "them apart")

    def step(self, i: int, request: Request | EvalRequest) -> None:
        """Member i's steps (or evaluation batch), run with every other waiting member's: returns once they have
        run (a step's statistics in slots['step_rows'][i], an evaluation's in request.result)."""
        self.members[i].request = request
        self._hand_on(i, WAITING)
        if self.broken is not None:
            raise StackError(f"the stacked step failed ({type(self.broken).__name__}: {self.broken}); the checkpoints "
                             "saved so far are whole: rerun the sweep with resume=auto, or with "
                             "hydra.launcher.stack=false")

    def retire(self, i: int) -> None:
        """Member i's training has ended (done, early stopped, diverged or stopped): its slice is written no more."""
        self.members[i].joined = False

    def _run_waiting(self) -> None:
        """Every waiting member's work: the optimiser steps of those training, then the evaluation batches of those
        validating or testing (one vmapped pass for all members whose batches have one shape)."""
        waiting = [m for m in self.members if m.status == WAITING]
        training = [m for m in waiting if isinstance(m.request, Request)]
        if training:  # in the thread of whichever member asked last: maybe one validating, under inference mode
            with torch.inference_mode(False), torch.enable_grad():
                self._run_steps(training)
        evaluating = [m.request for m in waiting if isinstance(m.request, EvalRequest)]
        for signature in dict.fromkeys(r.signature() for r in evaluating):
            self._evaluate([r for r in evaluating if r.signature() == signature])

    @torch.no_grad()
    def _evaluate(self, requests: list[EvalRequest]) -> None:
        """One vmapped pass of EvalMetrics.update's outputs for these members, each at its own weights (stacked
        here: a member testing its best checkpoint has left the stack's training slice)."""
        names = list(requests[0].params)
        params = {f"model.{k}": torch.stack([r.params[k] for r in requests]) for k in names}
        stacked = [torch.stack([r.chunks[j] for r in requests]) for j in range(len(requests[0].chunks))]
        module = _Evaluation(requests[0].model)
        out = vmap(lambda p, x, noise, chunks: functional_call(module, p, (x, noise, chunks)))(
            params, torch.stack([r.x for r in requests]), torch.stack([r.noise for r in requests]), stacked)
        recon, kl_layers, means, log_w = out
        for i, r in enumerate(requests):
            r.result = (recon[i], kl_layers[i], [mu[i] for mu in means], log_w[i] if r.chunks else None)

    def _run_steps(self, waiting: list[Member]) -> None:
        """The waiting members' optimiser steps: step k of all of them as one stacked step, a member past its own
        count (the last execution of its epoch, or of its run) masked out, as is one whose objective was not
        finite."""
        stack, slots = self.stack, self.slots
        counts = torch.zeros(self.n, dtype=torch.long)
        for m in waiting:
            counts[m.index] = m.request.n
        counts = counts.to(self.device)
        host = slots["hyper"]  # filled on the host by the members: what it says needs no sync
        clip = bool(torch.isfinite(host[:, HYPER.index("max_grad_norm")]).any())
        decay = bool((host[:, HYPER.index("weight_decay")] != 0).any())
        hyper = host.to(self.device, non_blocking=True)
        free_bits = slots["free_bits"].to(self.device, non_blocking=True)
        size = waiting[0].request.size  # one batch size: a stack's members share it (register)
        stopped = torch.zeros(self.n, dtype=torch.bool, device=self.device)
        for k in range(max(m.request.n for m in waiting)):
            active = counts > k
            weight = torch.where(stopped, torch.nan, slots["weight"][:, k])  # a stopped member's objective: NaN
            step = StepStats(stack.train_step(slots["images"][:, k, :size], slots["noise"][:, k, ..., :size, :],
                                              weight, free_bits, hyper, active, clip=clip, decay=decay))
            slots["step_rows"][:, k] = torch.where(active[:, None], step.table, slots["step_rows"][:, k])
            # a member whose objective is not finite takes no further step: the solo engine stops there
            stopped |= ~torch.isfinite(step.objective)
            self.steps_run += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.progress.ran(waiting)
