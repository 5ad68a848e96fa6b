"""How a stop signal is taken, one rule for a run alone (callbacks/preemption.py) and for a stacked sweep's group
(vaelab/stacking/group.py), which flags all its members: the first stop signal is the one kept, a first Ctrl-C says what is
saved, a second one stops at once."""

from __future__ import annotations

import signal


def first_stop(signum: int, earlier: str | None, saving: str) -> str:
    """The stop signal's name to keep once `signum` arrives (the first one's); a second Ctrl-C stops at once
    (KeyboardInterrupt), and a first one says in a line what is saved (`saving`). A run's Preemption callback and a
    stacked sweep's group (for all its members) flag stops alike."""
    name = signal.Signals(signum).name
    if name == "SIGINT" and earlier == "SIGINT":
        raise KeyboardInterrupt  # a second Ctrl-C: stop now
    if name == "SIGINT":
        print(f"\nvaelab: Ctrl-C: {saving} (Ctrl-C again to stop at once)", flush=True)
    return earlier or name
