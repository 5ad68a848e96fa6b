"""A sweep's end, whatever ran its jobs (the basic, joblib or stacked launcher, Optuna's sweeper): a job that failed
said its error in its own line, with its job number, and the sweep's other jobs went on; once all have ended, one
line names the failed jobs and the sweep exits with status 1, as a failed run alone does. Read from the jobs'
results.json, which every launcher's jobs write, in their own processes or not."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vaelab.console import plural


def failed_jobs(sweep_dir: Path) -> tuple[list[int], int]:
    """(the job numbers whose results.json says failed, the number of jobs with a results.json)."""
    failed, seen = [], 0
    for results in Path(sweep_dir).glob("*/results.json"):
        try:
            status = json.loads(results.read_text()).get("status")
        except (OSError, ValueError):
            continue
        seen += 1
        if status == "failed":
            failed.append(int(results.parent.name) if results.parent.name.isdigit() else results.parent.name)
    return sorted(failed, key=str), seen


def job_label() -> str:
    """'job #N: ' in a sweep's job (its directory is <sweep dir>/N), so that its one error line names it; '' for a
    run alone."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return ""
    return f"job #{HydraConfig.get().job.num}: "


class FailedJobs(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed, seen = failed_jobs(Path(str(config.hydra.sweep.dir)))
        if not failed:
            return
        print(f"error: {plural(len(failed), 'job')} of {seen} failed ({', '.join(f'#{j}' for j in failed)}: each said "
              "why above and in its train.log); the others finished: fix them and rerun the sweep with resume=auto",
              file=sys.stderr, flush=True)
        sys.exit(1)
