"""What a run says to the person watching it, one line at a time: on stdout, and through the `vaelab.console`
logger, which the app's logging config (conf/hydra/default.yaml) sends to the run's train.log. The logger does
not propagate: stdout has the line already."""

from __future__ import annotations

import logging

_log = logging.getLogger("vaelab.console")
_log.propagate = False


def say(text: str) -> None:
    """Print `text` and write each of its lines to the run's log file."""
    print(text, flush=True)
    for line in text.splitlines():
        if line.strip():
            _log.info(line)
