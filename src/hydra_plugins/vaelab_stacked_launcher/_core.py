"""The stacked launcher's work (Hydra launchers keep theirs beside the plugin class, as hydra_joblib_launcher does):
load each job's config, plan the sweep (vaelab.stacking.plan: stacks of same-shape jobs, jobs alone, a
process per GPU), then run each unit. A stack's members are Hydra's run_job of vaelab-train's whole task (its run
directory, .hydra/ with its own overrides, loggers, checkpoints, test phase, results.json), each in a thread of
this process, taking turns while their optimiser steps run stacked (vaelab.stacking.group). A unit that is
not stacked runs its jobs one after another here, as Hydra's basic launcher does."""

from __future__ import annotations

import functools
import json
import logging
import math
import traceback
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab.console import plural, quiet_here
from vaelab.errors import ConfigError
from vaelab.stacking.plan import (
    FACT_KEYS,
    UNBUILT,
    Unit,
    group_jobs,
    process_count,
    split,
    stack_device,
    stacking_on,
)

log = logging.getLogger("vaelab")


def job_facts(cfg: DictConfig) -> dict:
    """What the plan reads of a job's config (vaelab.stacking.plan.FACT_KEYS), resolved to plain values."""
    facts = {}
    for key in FACT_KEYS:
        node = OmegaConf.select(cfg, key, throw_on_missing=False)
        facts[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    return facts


def built_key(cfg: DictConfig, shapes: dict | None = None) -> tuple[dict, str | None]:
    """What a job builds: its data's image shape [C, H, W] and its model as plain data (the spec a checkpoint
    stores), built on the meta device (no memory). Jobs stack only when these agree, whatever their configs say
    (two .npz files of 28x28 and 32x32 images differ in no shape key). Returns (key, why the job trains alone):
    a job whose data or model cannot be built here (a missing data set, a bad value) runs alone, where its own run
    says what is wrong in one line. `shapes` caches image shapes by data config across the jobs of a sweep."""
    from vaelab.cli.config import build, build_model

    shapes = {} if shapes is None else shapes
    try:
        data = OmegaConf.to_container(cfg.data, resolve=True)
        cache_key = json.dumps(data, sort_keys=True, default=str)
        if cache_key not in shapes:
            shapes[cache_key] = tuple(build(cfg.data).find_image_shape())
        shape = shapes[cache_key]
        with torch.device("meta"):
            model = build_model(cfg, shape)
    except Exception as exc:  # noqa: BLE001 - said by the job's own run, which builds the same things
        return {"image_shape": None, "spec": None}, f"{UNBUILT} ({_first_line(exc)})"
    spec = model.spec()
    if spec is None:
        return {"image_shape": list(shape), "spec": None}, "its model has parts no spec describes (a custom part)"
    return {"image_shape": list(shape), "spec": json.loads(json.dumps(spec, default=str))}, None


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def job_error(ret: JobReturn) -> BaseException:
    """The error a failed job's return holds. No public way: JobReturn.return_value raises it (after a line of its
    own on stderr), so its dataclass field is read; tests/test_stacked.py pins the member's traceback and line."""
    return ret._return_value


def check_settings(launcher) -> None:
    """The launcher's settings, refused in one sentence at its setup: before Hydra writes the sweep's directory
    (multirun.yaml) or starts any job."""
    stacking_on(launcher.stack, "cpu")
    if isinstance(launcher.max_members, bool) or not isinstance(launcher.max_members, int) or launcher.max_members < 1:
        raise ConfigError(f"hydra.launcher.max_members={launcher.max_members!r} must be a whole number of at least 1")
    process_count(launcher.processes, [], 0)
    timeout = launcher.member_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ConfigError(f"hydra.launcher.member_timeout={timeout!r} must be a number of seconds greater than 0")


def plan_sweep(launcher, job_overrides, initial_job_idx: int) -> tuple[list[Unit], list[DictConfig], int]:
    """The sweep's jobs' configs, their units of work (stacks, jobs alone) and how many processes run them."""
    check_settings(launcher)
    setup_globals()
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    configs = []
    for j, overrides in enumerate(job_overrides):
        cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = f"{cfg.hydra.job.name}_{initial_job_idx + j}"
            cfg.hydra.job.num = initial_job_idx + j
            # the sweep's directory as this process resolved it: a member's process would resolve it again, from its
            # own overrides and start time (a new dated directory each, which resume=auto could never find)
            cfg.hydra.sweep.dir = str(sweep_dir)
        configs.append(cfg)
    shapes: dict = {}
    facts = [job_facts(cfg) for cfg in configs]
    groups, notes = group_jobs(facts, [built_key(cfg, shapes) for cfg in configs])
    for note in notes:
        log.info(note)
    units = []
    for g in groups:
        device = stack_device(facts[g.jobs[0]])
        stacked = g.alone is None and len(g.jobs) > 1 and stacking_on(launcher.stack, device)
        if not stacked:
            if g.alone is None and len(g.jobs) > 1:
                log.info("stacked launcher: %s on %s run one after another (hydra.launcher.stack=%s)",
                         plural(len(g.jobs), "job"), device, launcher.stack)
            units.append(Unit(g.jobs, False, device))
            for j in g.jobs:
                log.info("\t#%d : %s", initial_job_idx + j, " ".join(filter_overrides(job_overrides[j])))
            continue
        for part in split(g.jobs, int(launcher.max_members)):
            log.info("stacked launcher: %s as one stacked model on %s:", plural(len(part), "job"), device)
            for j in part:
                log.info("\t#%d : %s", initial_job_idx + j, " ".join(filter_overrides(job_overrides[j])))
            units.append(Unit(part, True, device))
    gpus = torch.cuda.device_count() if any(u.device == "cuda" for u in units) else 0
    return units, configs, process_count(getattr(launcher, "processes", "auto"), units, gpus)


def run_units(launcher, units: list[Unit], configs: list[DictConfig]) -> list[JobReturn]:
    """Every unit in this process, one after another; each job's JobReturn, in job order."""
    returns: list[JobReturn | None] = [None] * len(configs)
    for unit in units:
        for j, ret in zip(unit.jobs, run_unit(launcher, unit.stacked, unit.device, [configs[j] for j in unit.jobs])):
            returns[j] = ret
    return returns


def run_unit(launcher, stacked: bool, device: str, configs: list[DictConfig]) -> list[JobReturn]:
    """A stack's jobs as one stacked model, or jobs one after another in this process."""
    if stacked:
        return run_stack(launcher, configs, device)
    return [run_here(launcher, cfg) for cfg in configs]


def run_here(launcher, cfg: DictConfig) -> JobReturn:
    HydraConfig.instance().set_config(cfg)
    return run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function, config=cfg,
                   job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")


def run_stack(launcher, configs: list[DictConfig], device: str) -> list[JobReturn]:
    """The members, each Hydra's run_job of the vaelab-train task in a thread of this process, taking turns; their
    optimiser steps run as one stacked model (vaelab/stacking/group.py). One progress line for the stack and one line
    per member as it ends: the members' own lines go to their train.log."""
    from vaelab.stacking.group import StackGroup
    from vaelab.stacking.member import MemberRunner
    from vaelab.stacking.turns import logging_state, restore_logging

    dirs = [Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir) for cfg in configs]
    names = [f"member {cfg.hydra.job.num} ({d})" for cfg, d in zip(configs, dirs)]
    returns: list[JobReturn | None] = [None] * len(configs)
    hydra_config = HydraConfig.instance()
    logger_names = tuple(OmegaConf.to_container(configs[0].hydra.job_logging, resolve=False).get("loggers") or {})
    launcher_logging = logging_state(("", *logger_names))  # restored once the members, each its train.log, are done

    def job(i: int):
        def member() -> None:
            quiet_here()
            # vaelab-train's task, told that this run is a member: how it trains and evaluates is its runner's
            task = functools.partial(launcher.task_function, runner=MemberRunner(group.members[i]))
            ret = run_job(hydra_context=launcher.hydra_context, task_function=task,
                          config=configs[i], job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            if ret.status == JobStatus.FAILED:  # not one of vaelab's sentences (a bug): its traceback, as alone
                traceback.print_exception(job_error(ret))
            returns[i] = ret
        return member

    group = StackGroup(names, device, float(launcher.member_timeout), logger_names=logger_names,
                       swaps=[(lambda: hydra_config.cfg, lambda cfg: setattr(hydra_config, "cfg", cfg))],
                       on_end=lambda i: member_ended(configs[i], dirs[i], group.members[i].exit_code))
    try:
        group.run([job(i) for i in range(len(configs))])
    finally:
        restore_logging(launcher_logging)
    return stack_ended(names, [m.exit_code for m in group.members], returns, dirs)


def member_ended(cfg: DictConfig, run_dir: Path, exit_code) -> None:
    """A finished member's one line (in its own thread, its train.log gets it too): its test figure (or validation
    figure), epochs, training time and run directory. A stopped member is counted in the stack's closing line; a
    failed one said its error already."""
    results = _results(run_dir)
    if results.get("status") != "finished":
        return
    metrics = results.get("metrics", {})
    key = next((k for k in ("test/nll", "test/loss", "val/loss") if k in metrics), None)
    figure = f"{key} {metrics[key]:.2f}, " if key else ""
    line = (f"vaelab: #{cfg.hydra.job.num} finished: {figure}{plural(results.get('epochs', 0), 'epoch')}, "
            f"{results.get('train_time_s', 0):.0f} s training; {run_dir}")
    print(line, flush=True)
    logging.getLogger("vaelab.console").info(line)


def _results(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def stack_ended(names: list[str], exits: list, returns: list, dirs: list[Path]) -> list[JobReturn]:
    """How a stack's members ended, as the launcher says it: each job's return, or one line and the sweep's exit
    (1 when a member failed, as a run alone exits; 0 when members were stopped by a signal and saved)."""
    failed = [names[i] for i, code in enumerate(exits) if code not in (0, None)]
    # a job whose error was not one of vaelab's sentences (Hydra's run_job caught it)
    failed += [f"{names[i]} ({job_error(ret)})" for i, ret in enumerate(returns)
               if ret is not None and ret.status == JobStatus.FAILED]
    if failed:  # a member's own error (a full disk, say) is said in its own line: the sweep fails, as a solo run does
        log.error("stacked launcher: %s ended with an error; the checkpoints saved are whole and the other "
                  "members' runs are kept: rerun the sweep with resume=auto once it is fixed", "; ".join(failed))
        raise SystemExit(1)
    stopped = [_results(dirs[i]) for i, code in enumerate(exits) if code == 0]
    if stopped:  # as vaelab-train alone: stopped by a signal, each stopped member's checkpoint saved, exit 0
        signals = sorted({r.get("signal") for r in stopped if r.get("signal")}) or ["a signal"]
        steps = ", ".join(str(r.get("global_step", "?")) for r in stopped)
        log.info("stacked launcher: stopped by %s: %d of %d members saved their checkpoints (at step %s); run the "
                 "same command with resume=auto to continue them", " and ".join(signals), len(stopped), len(exits),
                 steps)
        raise SystemExit(0)
    offline = sorted({str(d) for d in dirs if any((d / "wandb").glob("offline-run-*"))})
    if offline:
        log.info("stacked launcher: the members' W&B runs are offline; upload them with wandb sync %s",
                 " ".join(f"{d}/wandb/offline-run-*" for d in offline) if len(offline) <= 2 else
                 f"{Path(offline[0]).parent}/*/wandb/offline-run-*")
    return returns
