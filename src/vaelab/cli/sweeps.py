"""How a sweep's jobs use the machine. Parallel jobs (hydra/launcher=joblib) each take their GPU and their share
of the cores (use_job_share). And hydra/launcher=stacked: a multirun's jobs grouped by what they build (their model
and image shape, and the keys that fix their code), each group trained as one stacked model in this process. Every
member is still a run: Hydra's run_job of vaelab-train's whole task (its run directory, .hydra/ with its own
overrides, loggers, checkpoints, test phase, results.json), in a thread of its own; the members take turns and
their optimiser steps run stacked (training/stack_group.py).

Groups run one after another. A group of one, or any group when stacking is off (stack=false, or stack=auto on a
CPU: README, Sweeps), runs its jobs one after another in this process, as Hydra's basic launcher does.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab.cli.node import Unit, plan, process_count, run_processes
from vaelab.console import quiet_here
from vaelab.devices import cpu_cores, job_share
from vaelab.errors import ConfigError
from vaelab.training.stack import STACKED_OPTIMIZERS

log = logging.getLogger("vaelab")


# The config that fixes a member's tensor shapes and code: jobs that agree on all of it train as one stack. Every
# other key (seed, loss.*, optim.lr and weight_decay, trainer.max_epochs and max_steps, callbacks, loggers, eval,
# scheduler, data.seed and data.subset, ...) may differ between the members of a stack.
SHAPE_KEYS = ("model", "prior", "posterior", "likelihood", "data.name", "data.batch_size", "data.binarize",
              "data.device", "optim._target_", "trainer.accelerator", "trainer.devices", "trainer.strategy",
              "trainer.num_nodes", "trainer.precision", "trainer.steps_per_execution", "compile", "matmul_precision")


@dataclass
class Group:
    jobs: list[int]
    key: dict
    alone: str | None = None  # why these jobs cannot be stacked, when they cannot


def _select(cfg: DictConfig, dotted: str):
    node = OmegaConf.select(cfg, dotted, throw_on_missing=False)
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def shape_key(cfg: DictConfig) -> dict:
    """The values of SHAPE_KEYS in this job's config."""
    return {key: _select(cfg, key) for key in SHAPE_KEYS}


def why_alone(cfg: DictConfig) -> str | None:
    """Why a job cannot be a member of a stack, or None when it can."""
    trainer = cfg.trainer
    if str(trainer.get("devices", 1)) not in ("1", "auto") or int(trainer.get("num_nodes", 1)) != 1:
        return "a multi-device job (DDP) trains alone"
    if str(trainer.get("precision", "32-true")) not in ("32", "32-true"):
        return f"trainer.precision={trainer.precision} is not stacked (float32 only)"
    if cfg.get("compile"):
        return "compile=true is not stacked"
    target = str(cfg.optim.get("_target_", ""))
    if _qualified(target) not in STACKED_OPTIMIZERS or cfg.optim.get("amsgrad") or cfg.optim.get("maximize"):
        return f"optim._target_={target} is not stacked (Adam, AdamW and AdamNormGrad are)"
    return None


def _qualified(target: str) -> str:
    """The class a config's _target_ names, by its defining module (torch.optim.Adam is torch.optim.adam.Adam)."""
    from hydra.utils import get_object

    try:
        cls = get_object(target)
    except Exception:  # noqa: BLE001 - a target that does not import: instantiate says so in the job
        return target
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else target


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
        return {"image_shape": None, "spec": None}, f"its data or model could not be built here ({_first_line(exc)})"
    spec = model.spec()
    if spec is None:
        return {"image_shape": list(shape), "spec": None}, "its model has parts no spec describes (a custom part)"
    return {"image_shape": list(shape), "spec": json.loads(json.dumps(spec, default=str))}, None


def _first_line(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def group_jobs(configs: list[DictConfig], built: list[tuple[dict, str | None]] | None = None
               ) -> tuple[list[Group], list[str]]:
    """The jobs, grouped by shape key and by what they build (built_key) in order of first appearance; and a line
    for each key that split them."""
    groups: list[Group] = []
    for j, cfg in enumerate(configs):
        made, unbuilt = built[j] if built is not None else ({}, None)
        key, alone = {**shape_key(cfg), **made}, why_alone(cfg) or unbuilt
        match = next((g for g in groups if g.key == key and g.alone is None and alone is None), None)
        if match is None:
            groups.append(Group([j], key, alone))
        else:
            match.jobs.append(j)
    notes = []
    stackable = [g for g in groups if g.alone is None]
    for key in SHAPE_KEYS if len(stackable) > 1 else ():
        values = [g.key[key] for g in stackable]
        names = [v.get("name") if isinstance(v, dict) else None for v in values]
        if len(set(names)) > 1:  # another model, prior, ...: said by its name; then what differs within one
            notes.append(_split_note(key, names))
        for name in dict.fromkeys(names):
            leaves = [_flatten(v, key) for v, n in zip(values, names) if n == name]
            for leaf in dict.fromkeys(k for one in leaves for k in one):
                if len({json.dumps(one.get(leaf), sort_keys=True, default=str) for one in leaves}) > 1:
                    notes.append(_split_note(leaf, [one.get(leaf) for one in leaves]))
    shapes = {json.dumps(g.key.get("image_shape")): g.key.get("image_shape") for g in stackable}
    if len(shapes) > 1:
        notes.append(_split_note("the data's image shape", ["x".join(map(str, s)) for s in shapes.values() if s]))
    if not notes and len(stackable) > 1:  # the same configs built different models (a value resolved at build time)
        notes.append("stacked launcher: the built models differ between jobs: one stack for each")
    for g in groups:
        if g.alone:
            notes.append(f"stacked launcher: job {', '.join(map(str, g.jobs))} runs alone: {g.alone}")
    return groups, notes


def _split_note(key: str, values: list) -> str:
    shown = ", ".join(dict.fromkeys(json.dumps(v, default=str).strip('"') for v in values))
    return f"stacked launcher: {key} differs between jobs ({shown}): one stack for each value"


def _flatten(node, prefix: str = "") -> dict:
    """{dotted key: leaf value} of a nested config, so that a split is said by the leaf that differs."""
    if not isinstance(node, dict):
        return {prefix: node}
    out = {}
    for key, value in node.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def split(jobs: list[int], most: int) -> list[list[int]]:
    """A group cut into stacks of at most `most` members, as even as possible."""
    parts = max(1, math.ceil(len(jobs) / most))
    sizes = [len(jobs) // parts + (i < len(jobs) % parts) for i in range(parts)]
    return [jobs[sum(sizes[:i]):sum(sizes[:i + 1])] for i in range(parts)]


def stack_device(cfg: DictConfig) -> str:
    """Where a stack of these jobs trains: their trainer's accelerator."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def stacking_on(setting, device: str) -> bool:
    """stack: true | false | auto (auto: on a GPU; on a CPU the members run one after another, which measured
    as fast: README, Sweeps)."""
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    if setting != "auto":
        raise ConfigError(f"hydra.launcher.stack={setting!r} is not one of auto, true, false")
    return device == "cuda"


def parallel_jobs() -> int:
    """How many jobs of this process's sweep run at once: hydra/launcher=joblib's n_jobs (-1: one per core), else
    1 (Hydra's basic launcher runs one after another; the stacked launcher sets its members' threads itself)."""
    if not HydraConfig.initialized():
        return 1
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or "Joblib" not in str(hydra_cfg.launcher.get("_target_", "")):
        return 1
    n_jobs = int(hydra_cfg.launcher.get("n_jobs") or -1)
    return cpu_cores() if n_jobs < 0 else n_jobs


def use_job_share(cfg) -> None:
    """Under hydra/launcher=joblib: give this job its GPU (trainer.devices=[i mod G], for a one-device job whose
    devices the command line did not name) and its share of the cores as torch threads."""
    parallel = parallel_jobs()
    if parallel <= 1:
        return
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if on_gpu else 0
    gpu, threads = job_share(int(HydraConfig.get().job.num), parallel, cpu_cores(), gpus)
    torch.set_num_threads(threads)
    if gpu is not None and str(cfg.trainer.get("devices", 1)) == "1":
        with open_dict(cfg):
            cfg.trainer.devices = [gpu]


def launch(launcher, job_overrides, initial_job_idx: int) -> list[JobReturn]:
    stacking_on(launcher.stack, "cpu")  # a wrong setting is refused before any job starts
    if not isinstance(launcher.max_members, int) or launcher.max_members < 1:
        raise ConfigError(f"hydra.launcher.max_members={launcher.max_members!r} must be a whole number of at least 1")
    process_count(getattr(launcher, "processes", "auto"), [], 0)  # likewise
    timeout = launcher.member_timeout
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ConfigError(f"hydra.launcher.member_timeout={timeout!r} must be a number of seconds greater than 0")
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
    groups, notes = group_jobs(configs, [built_key(cfg, shapes) for cfg in configs])
    for note in notes:
        log.info(note)
    units = []
    for g in groups:
        device = stack_device(configs[g.jobs[0]])
        stacked = g.alone is None and len(g.jobs) > 1 and stacking_on(launcher.stack, device)
        if not stacked:
            if g.alone is None and len(g.jobs) > 1:
                log.info("stacked launcher: %d jobs on %s run one after another (hydra.launcher.stack=%s)",
                         len(g.jobs), device, launcher.stack)
            units.append(Unit(g.jobs, False, device))
            for j in g.jobs:
                log.info("\t#%d : %s", initial_job_idx + j, " ".join(filter_overrides(job_overrides[j])))
            continue
        for part in split(g.jobs, int(launcher.max_members)):
            log.info("stacked launcher: %d jobs as one stacked model on %s:", len(part), device)
            for j in part:
                log.info("\t#%d : %s", initial_job_idx + j, " ".join(filter_overrides(job_overrides[j])))
            units.append(Unit(part, True, device))
    gpus = torch.cuda.device_count() if any(u.device == "cuda" for u in units) else 0
    processes = process_count(getattr(launcher, "processes", "auto"), units, gpus)
    if processes > 1:  # every GPU of the node: a process per GPU, each its share of the units
        return run_processes(launcher, units, configs, plan(units, processes, cpu_cores()))
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
    optimiser steps run as one stacked model (training/stack_group.py). One progress line for the stack and one line
    per member as it ends: the members' own lines go to their train.log."""
    from vaelab.training.stack_group import StackGroup, logging_state, restore_logging

    dirs = [Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir) for cfg in configs]
    names = [f"member {cfg.hydra.job.num} ({d})" for cfg, d in zip(configs, dirs)]
    returns: list[JobReturn | None] = [None] * len(configs)
    hydra_config = HydraConfig.instance()
    logger_names = tuple(OmegaConf.to_container(configs[0].hydra.job_logging, resolve=False).get("loggers") or {})
    launcher_logging = logging_state(("", *logger_names))  # restored once the members, each its train.log, are done

    def job(i: int):
        def member() -> None:
            quiet_here()
            ret = run_job(hydra_context=launcher.hydra_context, task_function=launcher.task_function,
                          config=configs[i], job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
            if ret.status == JobStatus.FAILED:  # not one of vaelab's sentences (a bug): its traceback, as alone
                traceback.print_exception(ret._return_value)
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
    epochs = results.get("epochs", 0)
    line = (f"vaelab: #{cfg.hydra.job.num} finished: {figure}{epochs} epoch{'s' if epochs != 1 else ''}, "
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
    failed += [f"{names[i]} ({ret._return_value})" for i, ret in enumerate(returns)
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
