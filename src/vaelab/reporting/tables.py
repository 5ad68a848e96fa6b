"""vaelab-report's tables: report.md (one row per configuration, mean +- std over seeds; W&B runs and failed runs
listed below it), report.csv (the same rows) and runs.csv (one row per run, failed ones included)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from vaelab.files import atomic_write
from vaelab.pixels import pixels_note
from vaelab.reporting.page import wandb_links
from vaelab.reporting.runs import COLUMNS, Run


def _fmt(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.2f} ± {std:.2f}" if n > 1 else f"{mean:.2f}"


def markdown(rows: list[dict], runs: list[Run]) -> str:
    head = ["configuration", "seeds", "pixels"] + [h for _, h in COLUMNS] + ["parameters", "epochs", "train time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda r: (math.isnan(r["test/nll"]), r["test/nll"])):
        cells = [row["configuration"], f"{row['finished']}/{row['runs']}", row.get("pixels", "-")]
        cells += [_fmt(row[k], row[k + " std"], row["finished"]) for k, _ in COLUMNS]
        cells += [f"{row['parameters']:,}" if row["parameters"] else "-", str(row["epochs"] or "-"),
                  "-" if math.isnan(row["train time s"]) else f"{row['train time s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [r for r in runs if r.status != "finished"]
    text = "\n".join(lines) + "\n\n" + pixels_note(rows)
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
