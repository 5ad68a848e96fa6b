"""A stacked sweep's plan, from plain data: which jobs train as one stack (the same shape keys and the same built
model and image shape), which train alone and why, a group cut into stacks of at most max_members, and the units
(stacks, jobs alone) spread over one process per GPU. The stacked launcher (hydra_plugins/vaelab_stacked_launcher)
reads each job's facts from its Hydra config and runs the plan; nothing here knows Hydra."""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from typing import Any

from vaelab.devices import on_gpu
from vaelab.errors import ConfigError
from vaelab.stacking.stack import STACKED_OPTIMIZERS

# The config that fixes a member's tensor shapes and code: jobs that agree on all of it train as one stack (the
# objective and its samples fix the step's noise and code). Every other key (seed, loss.beta, loss.warmup_epochs,
# loss.free_bits, optim.lr and weight_decay, trainer.max_epochs and max_steps, callbacks, loggers, eval,
# scheduler, data.seed and data.subset, ...) may differ between the members of a stack.
SHAPE_KEYS = ("model", "prior", "posterior", "likelihood", "data.name", "data.batch_size", "data.binarize",
              "data.device", "optim._target_", "trainer.accelerator", "trainer.devices", "trainer.strategy",
              "trainer.num_nodes", "trainer.precision", "trainer.steps_per_execution", "compile", "matmul_precision",
              "loss.objective", "loss.samples")
# the job facts the plan reads: {dotted config key: its resolved value} (None where the config has no such key)
FACT_KEYS = (*SHAPE_KEYS, "optim.amsgrad", "optim.maximize")

Facts = dict[str, Any]


UNBUILT = "its data or model could not be built here"  # why a job runs alone that its own run will fail in one line


@dataclass
class Group:
    jobs: list[int]
    key: dict
    alone: str | None = None  # why these jobs cannot be stacked, when they cannot


@dataclass
class Unit:
    """A stack (its jobs as members) or a job that runs alone (stacked False: one job, or several one after
    another), on `device`."""

    jobs: list[int]
    stacked: bool
    device: str


def why_alone(facts: Facts) -> str | None:
    """Why a job cannot be a member of a stack, or None when it can."""
    if str(facts.get("trainer.devices") or 1) not in ("1", "auto") or int(facts.get("trainer.num_nodes") or 1) != 1:
        return "a multi-device job (DDP) trains alone"
    precision = str(facts.get("trainer.precision") or "32-true")
    if precision not in ("32", "32-true"):
        return f"trainer.precision={precision} is not stacked (float32 only)"
    if facts.get("compile"):
        return "compile=true is not stacked"
    target = str(facts.get("optim._target_") or "")
    if qualified(target) not in STACKED_OPTIMIZERS or facts.get("optim.amsgrad") or facts.get("optim.maximize"):
        return f"optim._target_={target} is not stacked (Adam, AdamW and AdamNormGrad are)"
    return None


def qualified(target: str) -> str:
    """The class a config's _target_ names, by its defining module (torch.optim.Adam is torch.optim.adam.Adam)."""
    module, _, name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except Exception:  # noqa: BLE001 - a target that does not import: instantiate says so in the job
        return target
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else target


def group_jobs(facts: list[Facts], built: list[tuple[dict, str | None]] | None = None
               ) -> tuple[list[Group], list[str]]:
    """The jobs, grouped by shape key and by what they build (their model spec and image shape: the launcher's
    built_key) in order of first appearance; and a line for each key that split them."""
    groups: list[Group] = []
    for j, job in enumerate(facts):
        made, unbuilt = built[j] if built is not None else ({}, None)
        key, alone = {**{k: job.get(k) for k in SHAPE_KEYS}, **made}, why_alone(job) or unbuilt
        match = next((g for g in groups if g.key == key and g.alone is None and alone is None), None)
        if match is None:
            groups.append(Group([j], key, alone))
        else:
            match.jobs.append(j)
    return groups, split_notes(groups)


def split_notes(groups: list[Group]) -> list[str]:
    """One line for each key (a leaf of it, where it is a group of keys) whose values split the jobs."""
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
        if g.alone and not g.alone.startswith(UNBUILT):  # one that cannot be built says its own error, in one line
            notes.append(f"stacked launcher: job {', '.join(map(str, g.jobs))} runs alone: {g.alone}")
    return notes


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


def stack_device(facts: Facts) -> str:
    """Where a stack of these jobs trains: their trainer's accelerator."""
    return "cuda" if on_gpu(str(facts.get("trainer.accelerator") or "auto")) else "cpu"


def stacking_on(setting, device: str) -> bool:
    """stack: true | false | auto (auto: on a GPU; on a CPU the members run one after another, which measured
    as fast: docs/sweeps.md)."""
    if setting in (True, "true"):
        return True
    if setting in (False, "false"):
        return False
    if setting != "auto":
        raise ConfigError(f"hydra.launcher.stack={setting!r} is not one of auto, true, false")
    return device == "cuda"


def process_count(setting, units: list[Unit], gpus: int) -> int:
    """hydra.launcher.processes: auto (one per visible GPU when the units train on a GPU and there are several
    of both; else 1) or a whole number (at most one process per unit)."""
    if setting == "auto":
        on_gpu = any(u.device == "cuda" for u in units)
        return max(1, min(gpus, len(units))) if on_gpu and gpus > 1 else 1
    if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
        raise ConfigError(f"hydra.launcher.processes={setting!r} must be auto or a whole number of at least 1")
    return max(1, min(setting, len(units)))


def plan(units: list[Unit], processes: int, cores: int) -> list[dict]:
    """What each process is given: its units (the largest first, each to the process with the fewest members so
    far), its device (GPU p, as CUDA_VISIBLE_DEVICES, when its units train on a GPU) and its threads
    (cores // processes)."""
    loads, given = [0] * processes, [[] for _ in range(processes)]
    for u in sorted(range(len(units)), key=lambda u: -len(units[u].jobs)):
        p = loads.index(min(loads))
        given[p].append(u)
        loads[p] += len(units[u].jobs)
    specs = []
    for p, mine in enumerate(given):
        on_gpu = any(units[u].device == "cuda" for u in mine)
        specs.append({"units": sorted(mine), "env": {"CUDA_VISIBLE_DEVICES": str(p)} if on_gpu else {},
                      "threads": max(1, cores // processes)})
    return specs
