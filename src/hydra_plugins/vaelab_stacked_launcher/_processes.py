"""Every device of a node: a stacked sweep's units of work (a stack, or a job that runs alone) run in one process
per visible GPU, each process seeing its one device (CUDA_VISIBLE_DEVICES) and its share of the cores, as
vaelab.stacking.plan.plan gives them out (hydra.launcher.processes: auto is a process per GPU; a number asks
for that many processes, on a CPU too).

The launching process only hands out the units and forwards stop signals; each process runs its units as the
launcher would (a stack in one process, its members threads: vaelab.stacking.group) and reports how each
job ended."""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import os
import signal
from types import SimpleNamespace

import cloudpickle
import torch
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, setup_globals

from hydra_plugins.vaelab_stacked_launcher._core import job_error, run_unit
from vaelab.stacking.plan import Unit

log = logging.getLogger("vaelab")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


def run_processes(launcher, units: list[Unit], configs: list, specs: list[dict]) -> list[JobReturn | None]:
    """Run each spec's units in a process of its own; return every job's JobReturn, or end the sweep as a
    stack does (exit 1 when a job failed, 0 when jobs were stopped by a signal and saved)."""
    ctx = mp.get_context("spawn")
    task = launcher.task_function
    state = Singleton.get_state()
    conns, procs = [], []
    for p, spec in enumerate(specs):
        mine = [(units[u].stacked, units[u].device, units[u].jobs, [configs[j] for j in units[u].jobs])
                for u in spec["units"]]
        payload = cloudpickle.dumps((launcher.hydra_context, (task.__module__, task.__qualname__),
                                     float(launcher.member_timeout), state, mine, spec["threads"]))
        here, there = ctx.Pipe()
        saved = {k: os.environ.get(k) for k in spec["env"]}
        os.environ.update(spec["env"])  # what the process sees from its start: its one GPU
        try:
            proc = ctx.Process(target=process_main, args=(there, payload), name=f"vaelab-node-{p}")
            proc.start()
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        there.close()
        conns.append(here)
        procs.append(proc)
        log.info("stacked launcher: process %d (pid %d) runs jobs %s%s with %d threads", p, proc.pid,
                 ", ".join(str(configs[j].hydra.job.num) for u in spec["units"] for j in units[u].jobs),
                 f" on GPU {spec['env']['CUDA_VISIBLE_DEVICES']}" if spec["env"] else "", spec["threads"])
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def forward(signum, frame):  # each process's stacks flag their members; a job alone saves as a run does
        for proc in procs:
            if proc.is_alive():
                os.kill(proc.pid, signum)

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    returns: list[JobReturn | None] = [None] * len(configs)
    codes = []
    try:
        for p, conn in enumerate(conns):
            try:
                got, code = conn.recv()
            except (EOFError, OSError):  # the process died before it could say (killed)
                procs[p].join()
                log.error("stacked launcher: process %d ended (exit code %s) before its jobs said how they ended; "
                          "the checkpoints saved are whole: rerun the sweep with resume=auto", p, procs[p].exitcode)
                got, code = {}, 1
            for j, ret in got.items():
                returns[j] = ret
            codes.append(code)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for proc in procs:
            proc.join()
    if any(code not in (0, None) for code in codes):
        raise SystemExit(1)  # the process's own line said which job failed and how
    if any(code == 0 for code in codes):
        raise SystemExit(0)
    return returns


def process_main(conn, payload: bytes) -> None:
    """One process of the node: its units, run as the launcher runs them; then how each job ended."""
    hydra_context, task_ref, timeout, state, units, threads = cloudpickle.loads(payload)
    os.setsid()  # out of the terminal's process group: a Ctrl-C reaches the launcher, which forwards it once
    torch.set_num_threads(threads)
    setup_globals()
    Singleton.set_state(state)
    module, name = task_ref
    task = getattr(importlib.import_module(module), name)
    task = getattr(task, "__wrapped__", task)  # hydra.main's wrapper: the task function itself
    launcher = SimpleNamespace(hydra_context=hydra_context, task_function=task, member_timeout=timeout)
    returns, code = {}, None
    try:
        for stacked, device, jobs, cfgs in units:
            returns.update(zip(jobs, run_unit(launcher, stacked, device, cfgs)))
    except SystemExit as stop:
        code = stop.code
    conn.send(({j: plain(ret) for j, ret in returns.items() if ret is not None}, code))
    conn.close()


def plain(ret: JobReturn) -> JobReturn:
    """How a job ended, without Hydra's config objects (not all of them pickle)."""
    out = JobReturn(overrides=ret.overrides, cfg=ret.cfg, hydra_cfg=None, working_dir=ret.working_dir,
                    task_name=ret.task_name, status=ret.status)
    out.return_value = ret.return_value if ret.status == JobStatus.COMPLETED else RuntimeError(str(job_error(ret)))
    return out
