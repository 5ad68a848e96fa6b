"""The runs below a directory, as vaelab-train left them: each one's saved config and overrides (.hydra/, read as
plain YAML), results.json and per-epoch curves (metrics.csv), and one row per configuration (mean and std over
its seeds). A run that cannot be read is skipped with one line naming it and why."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats (1e-3 is a number, as Hydra, which wrote the file, reads it)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def read_yaml(path: Path):
    with open(path) as f:
        return yaml.load(f, Loader=_YamlLoader)  # noqa: S506 - a safe loader


COLUMNS = [  # (results key, table header)
    ("test/nll", "test NLL"), ("test/elbo", "test ELBO"), ("test/recon", "recon"), ("test/kl", "KL"),
    ("test/active_units", "active units"), ("test/bpd", "bits/dim"),
]


@dataclass
class Run:
    path: Path
    label: str
    seed: int | None
    status: str
    results: dict = field(default_factory=dict)
    error: str | None = None
    curves: dict = field(default_factory=dict)  # validation curves from metrics.csv: {key: [(epoch, value)]}
    config: dict = field(default_factory=dict)  # .hydra/config.yaml, flattened (key.subkey: value), unresolved
    overrides: list = field(default_factory=list)  # .hydra/overrides.yaml: this job's command-line overrides

    @property
    def metrics(self) -> dict:
        return self.results.get("metrics", {})


def _base_label(cfg: dict) -> str:
    posterior = cfg["posterior"].get("name", "gaussian") if isinstance(cfg.get("posterior"), dict) else "gaussian"
    flow = "" if posterior == "gaussian" else f"+{posterior}"
    return f"{cfg['model'].get('name', '?')}+{cfg['prior'].get('name', '?')}{flow} ({cfg['likelihood'].get('name', '?')})"


def _extra_overrides(overrides: list[str]) -> list[str]:
    """Overrides other than seeds and the groups the label already names."""
    named = {"model", "prior", "posterior", "likelihood", "seed", "experiment"}
    return [o for o in overrides if o.split("=")[0].lstrip("+~") not in named and not o.startswith("hydra.")]


class BrokenRun(Exception):
    """A run directory the report cannot read: it is skipped, with one line saying why."""


def read_run(hydra_dir: Path) -> tuple[Run, list[str]]:
    """One run directory: its config, overrides, results and curves, all read and checked before any is used."""
    run_dir = hydra_dir.parent
    try:
        cfg = read_yaml(hydra_dir / "config.yaml")
        overrides_file = hydra_dir / "overrides.yaml"
        overrides = [str(o) for o in read_yaml(overrides_file) or []] if overrides_file.is_file() else []
    except Exception as exc:  # noqa: BLE001 - YAML errors of every kind
        raise BrokenRun(f".hydra/ cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in ("model", "prior", "likelihood")):
        raise BrokenRun(".hydra/config.yaml names no model, prior and likelihood: not a vaelab-train run")
    results, status, error = {}, "failed", "no results.json: the run crashed or is still running"
    results_file = run_dir / "results.json"
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text())
        except (UnicodeDecodeError, ValueError):
            raise BrokenRun("results.json is not valid JSON") from None
        if not isinstance(results, dict) or not isinstance(results.get("metrics", {}), dict):
            raise BrokenRun("results.json holds no object with metrics")
        status, error = results.get("status", "finished"), results.get("error")
    run = Run(run_dir, _base_label(cfg), cfg.get("seed"), status, results, error, overrides=overrides,
              config=_flat(cfg))
    try:
        run.curves = _val_curves(run)
    except (ValueError, KeyError, UnicodeDecodeError, csv.Error) as exc:
        raise BrokenRun(f"metrics.csv cannot be read ({type(exc).__name__}: {str(exc)[:100]})") from None
    return run, _extra_overrides(overrides)


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def differing_keys(runs: list[Run]) -> list[str]:
    """The config keys whose values differ between the runs' configurations (not seed, not where runs write)."""
    keys = sorted({k for r in runs for k in r.config})
    return [k for k in keys if k != "seed" and not k.startswith(("paths.", "hydra."))
            and len({repr(r.config.get(k)) for r in runs}) > 1]


def commands(root: Path, runs: list[Run]) -> list[str]:
    """The command(s) that made the runs: a sweep's from its multirun.yaml, else each distinct run's overrides."""
    sweep = root / "multirun.yaml"
    if sweep.is_file():
        try:
            task = read_yaml(sweep)["hydra"]["overrides"]["task"]
            return ["vaelab-train -m " + " ".join(str(o) for o in task)]
        except Exception:  # noqa: BLE001 - an unreadable multirun.yaml: the runs' own overrides say it too
            pass
    return list(dict.fromkeys("vaelab-train " + " ".join(r.overrides) for r in runs))


def find_runs(root: Path) -> list[Run]:
    """Every run directory below root. A configuration's label is model+prior (likelihood) plus the
    overrides that differ between runs; seeds never split a configuration. A run that cannot be read is
    skipped with one line on stderr naming it and why."""
    runs, extras = [], []
    for hydra_dir in sorted(root.rglob(".hydra")):
        if not (hydra_dir / "config.yaml").is_file():
            continue
        try:
            run, extra = read_run(hydra_dir)
        except BrokenRun as why:
            print(f"vaelab-report: skipped {hydra_dir.parent}: {why}", file=sys.stderr, flush=True)
            continue
        runs.append(run)
        extras.append(extra)
    common = set.intersection(*map(set, extras)) if extras else set()
    for run, extra in zip(runs, extras):
        run.label = " ".join([run.label, *(o for o in extra if o not in common)])
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[Run]) -> list[dict]:
    """One row per configuration: mean and std over its finished runs (seeds)."""
    rows = []
    for label in dict.fromkeys(r.label for r in runs):
        group = [r for r in runs if r.label == label]
        done = [r for r in group if r.status == "finished"]
        row = {"configuration": label, "runs": len(group), "finished": len(done)}
        for key, _ in COLUMNS:
            row[key], row[key + " std"] = _mean_std([r.metrics[key] for r in done if key in r.metrics])
        row["parameters"] = done[0].results.get("num_parameters") if done else None
        row["train time s"], _ = _mean_std([r.results["train_time_s"] for r in done if "train_time_s" in r.results])
        row["nll mc se"], _ = _mean_std([r.metrics["test/nll_mc_se"] for r in done if "test/nll_mc_se" in r.metrics])
        row["epochs"] = done[0].results.get("epochs") if done else None
        row["pixels"] = (done[0].results.get("pixels") if done else None) or "-"  # which figure is which (pixels.py)
        rows.append(row)
    return rows


def _val_curves(run: Run) -> dict[str, list[tuple[int, float]]]:
    """The per-epoch training and validation curves (ELBO, reconstruction, KL) in a run's metrics.csv."""
    file = run.path / "metrics.csv"
    curves: dict[str, list[tuple[int, float]]] = {f"{split}/{key}": [] for split in ("val", "train")
                                                  for key in ("elbo", "recon", "kl")}
    if not file.is_file():
        return curves
    with open(file, newline="") as f:
        for row in csv.DictReader(f):
            for key, points in curves.items():
                if row.get(key):
                    points.append((int(row["epoch"]) + 1, float(row[key])))
    return curves
