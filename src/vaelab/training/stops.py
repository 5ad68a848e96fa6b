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


STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


class EarlyStops:
    """A stop signal that arrives while a run is being set up (before its Preemption callback takes the signals
    over at the start of training) is recorded here instead of ending the process with nothing written; the callback
    then stops the run after its first step, saved, as it stops any run (`take`). `previous`: the handlers found
    before, which the callback keeps as its own previous ones (submitit's requeue)."""

    signal_name: str | None = None
    previous: dict = {}

    @classmethod
    def watch(cls, enabled: bool = True) -> None:
        """Record stop signals from now on (enabled: the run has a Preemption callback to take them over)."""
        import threading

        if not enabled or threading.current_thread() is not threading.main_thread():
            return  # a stacked sweep's member: its group's handler flags it
        cls.signal_name = None
        for name in STOP_SIGNALS:
            signum = getattr(signal, name)
            current = signal.getsignal(signum)
            if current != cls.flag:
                cls.previous[signum] = current
            signal.signal(signum, cls.flag)

    @classmethod
    def flag(cls, signum, frame) -> None:
        cls.signal_name = first_stop(signum, cls.signal_name, "stopping once training has started, saved")

    @classmethod
    def restore(cls) -> None:
        """The handlers found before, wherever the recorder is still the handler (the run has ended)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in cls.previous.items():
            if signal.getsignal(signum) == cls.flag:
                signal.signal(signum, previous)

    @classmethod
    def take(cls) -> str | None:
        """The signal recorded during set-up, once (None if none came)."""
        name, cls.signal_name = cls.signal_name, None
        return name
