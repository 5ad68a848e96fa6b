"""vaelab-report <outputs or multirun dir>: compare finished runs.

Reads every run directory below the given one (`.hydra/config.yaml`, `results.json`, `metrics.csv`) and
writes into it: report.html (one self-contained page: the table, the figures, each configuration's labelled
grids; reporting/page.py), report.md and report.csv (one row per configuration, mean +/- std over seeds), runs.csv
(one row per run, failed ones included), nll.png (test NLL per configuration: seeds, spread, Monte Carlo error),
curves.png (training and validation ELBO, reconstruction and KL for all runs) and samples.png (each configuration's
prior samples side by side). `--wandb` logs the same table and figures to W&B.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vaelab.reporting.report import report as compare_runs


def report(root: str | Path, use_wandb: bool = False, project: str = "vaelab", gmm: bool = True,
           group: str | None = None) -> dict[str, Path]:
    """The report of the runs below `root`; GMM samples rebuild each run's data and model from its config
    (cli/config.py's restore, which knows Hydra's instantiate)."""
    from vaelab.cli.config import restore

    return compare_runs(root, use_wandb, project, restore=restore if gmm else None, group=group)


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
