"""A stacked sweep's one progress line: members training, the slowest one's epoch, images per second over the
stack, and the time left; redrawn in place on a terminal, a line per epoch otherwise."""

from __future__ import annotations

import math
import sys
import time

from vaelab.stacking.turns import Member


class Progress:
    """The stack's one progress line: members training, the epoch, aggregate images/s and the time left. On a
    terminal it is redrawn in place at most once a second; otherwise a line is printed as the slowest training
    member starts a new epoch."""

    def __init__(self, members: list[Member]) -> None:  # its StackGroup's
        self.members = members
        self.start = time.perf_counter()
        self.images = 0
        self.last_epoch = -1
        self.last_draw = 0.0
        self.tty = sys.stdout.isatty()
        self.drawn = False
        self.steps: dict[int, tuple[int, int, int]] = {}  # member -> (steps done, steps per epoch, max epochs)

    def ran(self, waiting: list[Member]) -> None:
        for m in waiting:
            r = m.request
            self.images += r.n * r.size
            self.steps[m.index] = (r.step0 + r.n, max(1, r.steps_per_epoch), r.max_epochs)
        training = [self.steps[m.index] for m in self.members if m.joined and m.index in self.steps]
        if not training:
            return
        epoch = min((done - 1) // per for done, per, _ in training)  # the epoch of each one's last step
        now = time.perf_counter()
        if self.tty and now - self.last_draw < 1.0:
            return
        if not self.tty and epoch <= self.last_epoch:
            return
        self.last_epoch, self.last_draw = epoch, now
        elapsed = max(now - self.start, 1e-9)
        rate = self.images / elapsed
        left = [max(0, total * per - done) for done, per, total in training if total and total > 0]
        done_steps = sum(self.steps[i][0] for i in self.steps)
        eta = max(left) / (done_steps / len(self.steps) / elapsed) if left and done_steps else math.nan
        epochs = max((total for *_, total in training if total and total > 0), default=0)
        line = (f"stacked: {len(training)} of {len(self.members)} members training, epoch {min(epoch + 1, epochs or epoch + 1)}"
                f"{f'/{epochs}' if epochs else ''}, {rate:,.0f} img/s, ETA {format_seconds(eta)}")
        if self.tty:
            print(f"\r{line}\033[K", end="", flush=True)
            self.drawn = True
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.drawn:
            print(flush=True)
            self.drawn = False


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
