"""What a run says to the person watching it, one line at a time: on stdout, and through the `vaelab.console`
logger, which the app's logging config (conf/hydra/default.yaml) sends to the run's train.log. The logger does
not propagate: stdout has the line already. A stacked sweep's member (a thread of the sweep's process) writes its
lines to its train.log only: the sweep prints one progress line for the stack and one line per member as it ends."""

from __future__ import annotations

import logging
import threading

_log = logging.getLogger("vaelab.console")
_log.propagate = False
_thread = threading.local()


def quiet_here() -> None:
    """From now on, this thread's lines go to the run's log file only (a stacked sweep's member)."""
    _thread.quiet = True


def say(text: str) -> None:
    """Print `text` and write each of its lines to the run's log file."""
    if not getattr(_thread, "quiet", False):
        print(text, flush=True)
    for line in text.splitlines():
        if line.strip():
            _log.info(line)


def quiet_lightning() -> None:
    """Lightning's INFO lines off (devices, tips, checkpoint restores, "`Trainer.fit` stopped"), its warnings kept:
    what the app's logging config does (conf/hydra/default.yaml), for a script or notebook with a plain Trainer.
    Opt-in: importing vaelab changes nobody's logging."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def plural(n: int, noun: str) -> str:
    """'1 epoch', '3 epochs': a count and its noun, as a line says it."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
