"""Errors meant for people: each message names the problem and the fix in one sentence."""

import sys


class VaelabError(Exception):
    """An error the user can fix; the entry points print its message alone, without a traceback."""


class ConfigError(VaelabError, ValueError):
    """A config value is out of range or inconsistent with another."""


class DataError(VaelabError):
    """A data set cannot be found or read."""


class CheckpointError(VaelabError):
    """A checkpoint is missing, truncated, or from another model."""


class DistributedError(VaelabError):
    """A process of a DDP run stopped answering (frozen, killed, or its node lost)."""


class SaveError(VaelabError):
    """A file could not be saved whole (a full disk, a read-only directory); what was saved before is intact."""


class NonFiniteLossError(VaelabError):
    """Training produced a NaN or infinite loss."""


def run_or_explain(fn, *args, on_error=None, label: str = ""):
    """Run an entry point's body. A VaelabError prints its one sentence (after `label`: a sweep's job names itself),
    no traceback, and ends the process with status 1, unless `on_error(exc)` returns a value, which is then
    returned instead (a failed run in a sweep)."""
    try:
        return fn(*args)
    except VaelabError as exc:
        print(f"error: {label}{exc}", file=sys.stderr, flush=True)
        handled = on_error(exc) if on_error is not None else None
        if handled is None:
            sys.exit(1)
        return handled
