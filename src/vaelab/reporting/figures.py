"""vaelab-report's figures, as PNG bytes or files: the training and validation curves of every run (curves.png),
the test NLL per configuration with its spread over seeds and its Monte Carlo error (nll.png), and each
configuration's prior samples side by side (samples.png)."""

from __future__ import annotations

import io
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from vaelab.files import atomic_write
from vaelab.reporting.runs import Run

CURVE_KEYS = ("elbo", "recon", "kl")
CURVE_TITLES = {"elbo": "ELBO (nats)", "recon": "reconstruction (nats)", "kl": "KL (nats)"}
SHORT_RUN = 20  # runs with at most this many points per curve are drawn with markers, so one epoch is a dot


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _name(run) -> str:
    return run.label + (f" s{run.seed}" if run.seed is not None else "") + ("" if run.status == "finished" else
                                                                             " (failed)")


def curves_figure(runs) -> bytes:
    """Training (top) and validation (bottom) ELBO, reconstruction and KL per epoch: one colour per configuration,
    its seeds as thin lines and their mean as a thick one (dotted: a run that did not finish), one legend for the
    figure, markers where runs are short, integer epoch ticks."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), squeeze=False)
    labels = list(dict.fromkeys(r.label for r in runs))
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for row, split in enumerate(("train", "val")):
        for col, key in enumerate(CURVE_KEYS):
            ax = axes[row][col]
            drawn, epochs = False, []
            for label in labels:
                seeds = [(r, r.curves.get(f"{split}/{key}", [])) for r in runs if r.label == label]
                seeds = [(r, points) for r, points in seeds if points]
                for run, points in seeds:
                    marker = "o" if len(points) <= SHORT_RUN and len(seeds) == 1 else None
                    ax.plot(*zip(*points), marker=marker, color=colour[label], markersize=4,
                            linewidth=1.8 if len(seeds) == 1 else 0.8, alpha=1.0 if len(seeds) == 1 else 0.35,
                            linestyle="-" if run.status == "finished" else ":")
                    epochs += [x for x, _ in points]
                if len(seeds) > 1:  # the mean over the seeds at the epochs they share
                    by_epoch: dict = {}
                    for _, points in seeds:
                        for x, y in points:
                            by_epoch.setdefault(x, []).append(y)
                    shared = sorted(x for x, ys in by_epoch.items() if len(ys) == len(seeds))
                    ax.plot(shared, [statistics.fmean(by_epoch[x]) for x in shared], color=colour[label],
                            linewidth=2.2, marker="o" if len(shared) <= SHORT_RUN else None, markersize=4)
                drawn = drawn or bool(seeds)
            if epochs:  # whole epochs only, with room around a single one
                ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
            ax.set_title(f"{'training' if split == 'train' else 'validation'} {CURVE_TITLES[key]}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
            ax.grid(alpha=0.3)
            if not drawn:
                ax.text(0.5, 0.5, "no points recorded", ha="center", va="center", transform=ax.transAxes)
    seeds_of = {label: sum(r.label == label for r in runs) for label in labels}
    handles = [Line2D([], [], color=colour[label], linewidth=2.2) for label in labels]
    names = [f"{label} ({seeds_of[label]} seeds)" if seeds_of[label] > 1 else label for label in labels]
    # the seeds' key said once, as the legend's title: each entry stays short enough for four to a row
    title = "each seed a thin line, their mean a thick one" if max(seeds_of.values(), default=1) > 1 else None
    fig.legend(handles, names, loc="lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False,
               title=title, title_fontsize=9)
    fig.tight_layout(rect=(0, 0.04 * (1 + (len(labels) - 1) // 4) + (0.03 if title else 0), 1, 1))
    return _png(fig)


def nll_figure(rows: list[dict], runs) -> bytes:
    """Test NLL per configuration: each seed a dot, the mean with the seeds' standard deviation as a thick bar, and
    the Monte Carlo standard error of the importance-sampled estimate as a thin bar inside it."""
    labels = [row["configuration"] for row in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(labels) + 2), 4.2))
    for i, label in enumerate(labels):
        done = [r for r in runs if r.label == label and r.status == "finished" and "test/nll" in r.metrics]
        values = [r.metrics["test/nll"] for r in done]
        if not values:
            continue
        mean = statistics.fmean(values)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        mc_se = statistics.fmean(r.metrics.get("test/nll_mc_se", 0.0) for r in done)
        ax.errorbar(i, mean, yerr=spread, fmt="o", color="C0", capsize=8, linewidth=3,
                    label="mean ± std over seeds" if i == 0 else None)
        ax.errorbar(i + 0.12, mean, yerr=mc_se, fmt="none", color="C3", capsize=4, linewidth=1,
                    label="Monte Carlo standard error" if i == 0 else None)
        ax.scatter([i - 0.12] * len(values), values, color="k", s=14, zorder=3, label="seeds" if i == 0 else None)
    ax.set_xticks(range(len(labels)), labels, rotation=15, ha="right", fontsize=8)
    ax.set_xlim(-0.6, len(labels) - 0.4)  # a unit of width per configuration, its dots and bars together in it
    ax.set_ylabel("test NLL (nats, lower is better)")
    ax.set_title("test NLL per configuration")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def plot_curves(root: Path, runs: list[Run]) -> Path:
    """curves.png: training and validation ELBO, reconstruction and KL of every run (curves_figure)."""
    path = root / "curves.png"
    with atomic_write(path, "wb") as f:
        f.write(curves_figure(runs))
    return path


def plot_nll(root: Path, rows: list[dict], runs: list[Run]) -> Path:
    """nll.png: test NLL per configuration, spread over seeds and Monte Carlo error (nll_figure)."""
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
