"""Hydra's handle on vaelab's stacked launcher (Hydra takes launchers only from the hydra_plugins package); its work
is _core.py (the plan itself: vaelab.stacking.plan) and _processes.py (a process per GPU).
conf/hydra/launcher/stacked.yaml configures it."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class StackedLauncher(Launcher):
    def __init__(self, stack: str | bool = "auto", max_members: int = 64, member_timeout: float = 600,
                 processes: str | int = "auto") -> None:
        self.stack, self.max_members, self.member_timeout = stack, max_members, member_timeout
        self.processes = processes
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra_plugins.vaelab_stacked_launcher._core import check_settings

        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        _said(check_settings, self)  # before Hydra writes the sweep's directory

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        return _said(_launch, self, job_overrides, initial_job_idx)


def _launch(launcher: StackedLauncher, job_overrides, initial_job_idx: int) -> Sequence[JobReturn]:
    """Plan the sweep (_core.py), then run its units here, or, on every GPU of a node, in a process per GPU
    (_processes.py, which runs each process's units with _core.py's run_unit)."""
    from hydra_plugins.vaelab_stacked_launcher._core import plan_sweep, run_units
    from vaelab.devices import cpu_cores
    from vaelab.stacking.plan import plan

    units, configs, processes = plan_sweep(launcher, job_overrides, initial_job_idx)
    if processes > 1:
        from hydra_plugins.vaelab_stacked_launcher._processes import run_processes

        return run_processes(launcher, units, configs, plan(units, processes, cpu_cores()))
    return run_units(launcher, units, configs)


def _said(fn, *args):
    """fn(*args); a VaelabError (a wrong launcher setting) is one line and exit status 1, as the app says its own."""
    import sys

    from vaelab.errors import VaelabError

    try:
        return fn(*args)
    except VaelabError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
