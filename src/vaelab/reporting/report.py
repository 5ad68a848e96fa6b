"""vaelab-report's work: every run below a directory compared (runs.py), written into it as report.html (page.py),
report.md, report.csv and runs.csv (tables.py), nll.png, curves.png and samples.png (figures.py); optionally each
configuration's post-hoc GMM samples, and the same table and figures logged to W&B. cli/report.py parses the
command line and calls report()."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from vaelab.reporting.figures import plot_curves, plot_nll, plot_samples
from vaelab.reporting.page import write_page
from vaelab.reporting.runs import COLUMNS, Run, commands, differing_keys, find_runs, summarise
from vaelab.reporting.tables import write_tables

Restore = Callable[[Path], tuple]  # a checkpoint -> (its config, data module, model)


def runs_group(root: Path, runs: list[Run]) -> str:
    """The W&B group the runs logged to (results.json), when they share one; else the sweep's default name."""
    groups = {(r.results.get("wandb") or {}).get("group") for r in runs} - {None}
    return groups.pop() if len(groups) == 1 else f"sweep-{root.name}"


def log_to_wandb(root: Path, rows: list[dict], figures: list[Path], project: str, group: str) -> None:
    import wandb

    from vaelab.training.wandb_runs import resolve_wandb_mode

    run = wandb.init(project=project, job_type="report", name=f"report-{root.name}", group=group,
                     dir=str(root), mode=resolve_wandb_mode("auto"))
    table = wandb.Table(columns=list(rows[0]), data=[[row[c] for c in rows[0]] for row in rows])
    run.log({"report/table": table, **{f"report/{p.stem}": wandb.Image(str(p)) for p in figures}})
    run.finish()


def draw_gmm_samples(runs: list[Run], restore: Restore, components: int = 10) -> None:
    """For each configuration's first finished run without them: samples of a Gaussian mixture fitted to its
    training codes (vaelab-sample sampler=gmm's), for the page to show beside the prior samples. `restore(ckpt)`
    gives (config, data module, model) of a checkpoint (the app's, which rebuilds the run's data from its config). A
    run whose data or checkpoint cannot be read is said in one line and shown without them."""
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


def report(root: str | Path, use_wandb: bool = False, project: str = "vaelab", restore: Restore | None = None,
           group: str | None = None) -> dict[str, Path]:
    """Compare the runs below `root` and write the report into it; GMM samples too when `restore` is given (what
    rebuilds a checkpoint's data module and model: cli/config.py's restore). Returns the files written."""
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
    if restore is not None:
        draw_gmm_samples(runs, restore)
    paths["report.html"] = write_page(root, rows, runs, COLUMNS, commands(root, runs), differing_keys(runs))
    if use_wandb:
        log_to_wandb(root, rows, [paths["curves.png"], paths["nll.png"], paths["samples.png"]], project,
                     group or runs_group(root, runs))
    print(paths["report.md"].read_text())
    print("\n".join(f"  {name:<12} {p}" for name, p in paths.items()))
    return paths
