"""vaelab-report <outputs or multirun dir>: compare finished runs.

Reads every run directory below the given one (`.hydra/config.yaml`, `results.json`, `metrics.csv`) and
writes into it: report.html (one self-contained page: the table, the figures, each configuration's labelled
grids; report_page.py), report.md and report.csv (one row per configuration, mean +/- std over seeds), runs.csv
(one row per run, failed ones included), nll.png (test NLL per configuration: seeds, spread, Monte Carlo error),
curves.png (training and validation ELBO, reconstruction and KL for all runs) and samples.png (each configuration's
prior samples side by side). `--wandb` logs the same table and figures to W&B.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from omegaconf import DictConfig, OmegaConf

from vaelab.cli.report_page import curves_figure, nll_figure, wandb_links, write_page
from vaelab.files import atomic_write

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


def _base_label(cfg) -> str:
    posterior = cfg.posterior.get("name", "gaussian") if cfg.get("posterior") else "gaussian"
    flow = "" if posterior == "gaussian" else f"+{posterior}"
    return f"{cfg.model.get('name', '?')}+{cfg.prior.get('name', '?')}{flow} ({cfg.likelihood.get('name', '?')})"


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
        cfg = OmegaConf.load(hydra_dir / "config.yaml")
        overrides_file = hydra_dir / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    except Exception as exc:  # noqa: BLE001 - YAML errors of every kind
        raise BrokenRun(f".hydra/ cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})") from None
    if not isinstance(cfg, DictConfig) or not all(isinstance(cfg.get(k), DictConfig) for k in ("model", "prior", "likelihood")):
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
              config=_flat(OmegaConf.to_container(cfg, resolve=False)))
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
            task = OmegaConf.load(sweep).hydra.overrides.task
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
        rows.append(row)
    return rows


def _fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def markdown(rows: list[dict], runs: list[Run]) -> str:
    head = ["configuration", "seeds"] + [h for _, h in COLUMNS] + ["parameters", "epochs", "train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda r: (math.isnan(r["test/nll"]), r["test/nll"])):
        cells = [row["configuration"], f"{row['finished']}/{row['runs']}"]
        cells += [_fmt(row[k], row[k + " std"], row["finished"]) for k, _ in COLUMNS]
        cells += [f"{row['parameters']:,}" if row["parameters"] else "-", str(row["epochs"] or "-"),
                  "-" if math.isnan(row["train time s"]) else f"{row['train time s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in runs if r.status != "finished"]
    text = "\n".join(lines)
    if links := wandb_links(runs):
        text += "\n\nW&B runs:\n" + "\n".join(f"- `{r.path}` ({r.label}, seed {r.seed}): {line}" for r, line in links)
    if failed:
        text += "\n\nFailed runs:\n" + "\n".join(f"- `{r.path}` ({r.label}, seed {r.seed}): {r.error}" for r in failed)
    return text + "\n"


def write_tables(root: Path, rows: list[dict], runs: list[Run]) -> dict[str, Path]:
    paths = {"report.md": root / "report.md", "report.csv": root / "report.csv", "runs.csv": root / "runs.csv"}
    with atomic_write(paths["report.md"]) as f:
        f.write(f"# vaelab report: {root}\n\nTest metrics in nats per image (bits/dim aside); mean ± std over "
                "seeds. The same as a page, figures included: [report.html](report.html).\n\n" + markdown(rows, runs)
                + "\n\n## Figures\n\n![test NLL per configuration](nll.png)\n\n![training and validation curves]"
                "(curves.png)\n\n![prior samples per configuration](samples.png)\n")
    with atomic_write(paths["report.csv"], newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(paths["runs.csv"], newline="") as f:
        fields = ["run_dir", "configuration", "seed", "status", "error"] + [k for k, _ in COLUMNS] + [
            "num_parameters", "epochs", "train_time_s"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in runs:
            writer.writerow({"run_dir": str(r.path), "configuration": r.label, "seed": r.seed, "status": r.status,
                             "error": r.error or "", **{k: r.metrics.get(k, "") for k, _ in COLUMNS},
                             **{k: r.results.get(k, "") for k in ("num_parameters", "epochs", "train_time_s")}})
    return paths


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


def plot_curves(root: Path, runs: list[Run]) -> Path:
    """curves.png: training and validation ELBO, reconstruction and KL of every run (report_page.curves_figure)."""
    path = root / "curves.png"
    with atomic_write(path, "wb") as f:
        f.write(curves_figure(runs))
    return path


def plot_nll(root: Path, rows: list[dict], runs: list[Run]) -> Path:
    """nll.png: test NLL per configuration, spread over seeds and Monte Carlo error (report_page.nll_figure)."""
    path = root / "nll.png"
    with atomic_write(path, "wb") as f:
        f.write(nll_figure(rows, runs))
    return path


def plot_samples(root: Path, runs: list[Run]) -> Path:
    """One prior-sample grid per configuration (its first finished seed), side by side."""
    chosen = {}
    for run in runs:
        grid = run.path / "samples" / "samples_final.png"
        if run.status == "finished" and grid.is_file() and run.label not in chosen:
            chosen[run.label] = grid
    n = max(1, len(chosen))
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 4.0), squeeze=False)
    for ax, (label, grid) in zip(axes[0], chosen.items()):
        ax.imshow(plt.imread(grid), cmap="gray")
        ax.set_title(label, fontsize=9)
    for ax in axes[0]:
        ax.axis("off")
    fig.suptitle("prior samples")
    fig.tight_layout()
    path = root / "samples.png"
    with atomic_write(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def runs_group(root: Path, runs: list[Run]) -> str:
    """The W&B group the runs logged to (results.json), when they share one; else the sweep's default name."""
    groups = {(r.results.get("wandb") or {}).get("group") for r in runs} - {None}
    return groups.pop() if len(groups) == 1 else f"sweep-{root.name}"


def log_to_wandb(root: Path, rows: list[dict], figures: list[Path], project: str, group: str) -> None:
    import wandb

    from vaelab.training.loggers import resolve_wandb_mode

    run = wandb.init(project=project, job_type="report", name=f"report-{root.name}", group=group,
                     dir=str(root), mode=resolve_wandb_mode("auto"))
    table = wandb.Table(columns=list(rows[0]), data=[[row[c] for c in rows[0]] for row in rows])
    run.log({"report/table": table, **{f"report/{p.stem}": wandb.Image(str(p)) for p in figures}})
    run.finish()


def draw_gmm_samples(runs: list[Run], components: int = 10) -> None:
    """For each configuration's first finished run without them: samples of a Gaussian mixture fitted to its
    training codes (vaelab-sample sampler=gmm's), for the page to show beside the prior samples. A run whose data or
    checkpoint cannot be read is said in one line and shown without them."""
    from vaelab.cli.config import restore
    from vaelab.errors import VaelabError
    from vaelab.evaluation.samplers import draw_gmm

    firsts = {}
    for run in runs:  # each configuration's first finished run, the one the page shows
        if run.status == "finished":
            firsts.setdefault(run.label, run)
    todo = [r for r in firsts.values() if not list((r.path / "samples").glob("*/gmm_samples.png"))]
    for k, run in enumerate(todo, 1):
        ckpt = Path(run.results.get("best_checkpoint") or run.path / "checkpoints" / "last.ckpt")
        t0 = time.perf_counter()
        print(f"vaelab-report: GMM samples {k}/{len(todo)}: {run.label} (reads its data set; --no-gmm skips "
              "this) ...", flush=True)
        try:
            _, datamodule, model = restore(ckpt)
            if len(datamodule.train_set) < components:
                raise VaelabError(f"{len(datamodule.train_set)} training images are too few for {components} components")
            draw_gmm(model, datamodule, run.path / "samples" / ckpt.stem, components)
            print(f"vaelab-report: GMM samples {k}/{len(todo)}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        except (VaelabError, OSError, ValueError) as exc:
            print(f"vaelab-report: no GMM samples for {run.label} ({run.path}): {exc}", file=sys.stderr, flush=True)


def report(root: str | Path, use_wandb: bool = False, project: str = "vaelab", gmm: bool = True,
           group: str | None = None) -> dict[str, Path]:
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"error: {root} is not a directory; pass an outputs/ or multirun directory.")
    runs = find_runs(root)
    if not runs:
        raise SystemExit(f"error: no runs under {root} (no .hydra/config.yaml found); pass the directory "
                         "vaelab-train wrote, e.g. outputs/multirun/<date>.")
    rows = summarise(runs)
    paths = write_tables(root, rows, runs)
    paths["curves.png"] = plot_curves(root, runs)
    paths["nll.png"] = plot_nll(root, rows, runs)
    paths["samples.png"] = plot_samples(root, runs)
    if gmm:
        draw_gmm_samples(runs)
    paths["report.html"] = write_page(root, rows, runs, COLUMNS, commands(root, runs), differing_keys(runs))
    if use_wandb:
        log_to_wandb(root, rows, [paths["curves.png"], paths["nll.png"], paths["samples.png"]], project,
                     group or runs_group(root, runs))
    print(paths["report.md"].read_text())
    print("\n".join(f"  {name:<12} {p}" for name, p in paths.items()))
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vaelab-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", help="an outputs/ or multirun directory holding finished runs")
    parser.add_argument("--wandb", action="store_true", help="also log the table and figures to W&B")
    parser.add_argument("--project", default="vaelab", help="W&B project for --wandb")
    parser.add_argument("--group", help="W&B group for --wandb (default: the group the runs logged to)")
    parser.add_argument("--no-gmm", action="store_true",
                        help="do not draw GMM samples for the runs that have none (they read each run's data set)")
    args = parser.parse_args(argv)
    report(args.directory, args.wandb, args.project, gmm=not args.no_gmm, group=args.group)


if __name__ == "__main__":
    main(sys.argv[1:])
