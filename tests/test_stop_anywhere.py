"""A stop at any step, in any phase, resumed, is the same run: a tiny run (3 epochs of 4 optimiser steps, signal
checks every step, grids every epoch, KL warm-up and a cosine schedule, so that a repeated or skipped epoch end
shows) is stopped by a real signal to this process at every step in turn and at each phase boundary (in
validation, as its checkpoints are saved, at the epoch's end, after training, in the test phase), resumed with
resume=auto, and compared with the uninterrupted run: every metric of results.json, and every row of
metrics.csv, each epoch once. In-process (train() on the composed config) to fit the test budget; the boundary
cases run once more as real processes of the app in test_saves.py."""

from __future__ import annotations

import csv
import json
import math
import signal
from pathlib import Path

import pytest
from conftest import compose, fault

TINY_RUN = ["data.subset=200", "data.batch_size=50", "data.eval_batch_size=100", "trainer.max_epochs=3",
            "trainer.steps_per_execution=1", "callbacks.preemption.check_every_n_steps=1", "eval.importance_samples=8",
            "trainer.enable_progress_bar=false", "callbacks.image_grids.every_n_epochs=1",
            "callbacks.image_grids.num_samples=4", "callbacks.image_grids.num_reconstructions=4",
            "loss.warmup_epochs=2", "scheduler=cosine", "trainer.log_every_n_steps=1", "model.hidden_dim=32",
            "model.latent_dim=4", "logger=csv", "extras.print_config=false"]
SIGNALS = [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT]
STOPS = ([f"step:{s}" for s in range(12)] + [f"val:{e}" for e in range(3)] + [f"checkpoint:{e}" for e in range(3)]
         + [f"epoch_end:{e}" for e in range(3)] + ["train_end", "test:0", "test:1"])
_WHOLE: dict = {}


def train_tiny(out: Path, root: Path, *extra: str) -> dict:
    from vaelab.cli.train import train

    return train(compose(*TINY_RUN, f"paths.output_dir={out}", f"data.root={root}", *extra))


def rows(run_dir: Path) -> list[dict]:
    """metrics.csv's rows, without the wall-clock figures (perf/)."""
    with open(run_dir / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if v and not k.startswith("perf/")} for r in csv.DictReader(f)]


def assert_same_run(resumed: dict, ref: dict, got: list[dict], ref_rows: list[dict]) -> None:
    """Every figure of the uninterrupted run's results.json (but wall-clock ones) to 1e-4, and every metrics.csv row
    once, as it wrote them."""
    for key, value in ref["metrics"].items():
        if not key.startswith("perf/"):
            assert math.isclose(resumed["metrics"][key], value, rel_tol=1e-4, abs_tol=1e-6), (key, value,
                                                                                              resumed["metrics"][key])
    assert got == ref_rows, [r for r in got if r not in ref_rows] + [r for r in ref_rows if r not in got]


def whole(tmp_path_factory, root: Path) -> tuple[dict, list[dict]]:
    if not _WHOLE:
        out = tmp_path_factory.mktemp("whole") / "run"
        _WHOLE.update(results=train_tiny(out, root), rows=rows(out))
    return _WHOLE["results"], _WHOLE["rows"]


@pytest.mark.parametrize("where", STOPS)
def test_a_stop_anywhere_resumes_to_the_uninterrupted_run(where, tmp_path, tmp_path_factory, fashion_mnist,
                                                          monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    signum = SIGNALS[STOPS.index(where) % len(SIGNALS)]
    out = tmp_path / "run"
    stopped = train_tiny(out, fashion_mnist, *fault("StopAt", where=where, signum=signum))
    assert stopped["status"] == "preempted" and stopped["signal"] == signal.Signals(signum).name, stopped
    # where it was saved: inside an epoch at the end of the step; after an epoch's last step or in its validation,
    # once validation and its checkpoints are done; after the last epoch's validation, in the test phase
    kind, _, at = where.partition(":")
    saved_at = {"step": lambda n: n + 1, "val": lambda e: 4 * (e + 1),
                "checkpoint": lambda e: 4 * (e + 1), "epoch_end": lambda e: 4 * (e + 1) + 1}
    want_phase = "test" if kind in ("train_end", "test") or where == "epoch_end:2" else "train"
    assert stopped["phase"] == want_phase, stopped
    if want_phase == "train":
        assert stopped["global_step"] == saved_at[kind](int(at)), stopped
    assert json.loads((out / "results.json").read_text())["status"] == "preempted"

    resumed = train_tiny(out, fashion_mnist, "resume=auto")
    ref, ref_rows = whole(tmp_path_factory, fashion_mnist)
    assert resumed["status"] == "finished" and resumed["preemptions"] == 1
    assert (resumed["epochs"], resumed["global_step"]) == (ref["epochs"], ref["global_step"]) == (3, 12)
    assert resumed["metrics"].keys() == ref["metrics"].keys()
    got = rows(out)
    assert_same_run(resumed, ref, got, ref_rows)
    epochs = [r["epoch"] for r in got if "train/loss" in r]
    assert epochs == ["0", "1", "2"]  # each epoch's train/ row once
    assert Path(resumed["best_checkpoint"]).name == Path(ref["best_checkpoint"]).name


# A 2-member stacked sweep (seeds 1 and 2, threads of one process, their steps stacked), each member stopped at its
# own point as a stop signal stops it (StopAt), then the same command with resume=auto: the
# points that differ for a stacked member (an epoch's last step, validation, checkpoints, epoch end, after training,
# the test phase, and mid-epoch, where the other member goes on alone in the stack).
STACKED_STOPS = [("step:3", "val:1"), ("checkpoint:0", "test:0"), ("epoch_end:1", "step:6"), ("train_end", "step:11")]
STACKED_SWEEP = ["-m", *TINY_RUN, "hydra/launcher=stacked", "hydra.launcher.stack=true", "seed=1,2"]
_STACKED: dict = {}


def stacked_sweep(sweep_dir: Path, *extra: str) -> dict[int, tuple[dict, list[dict]]]:
    """Run the stacked sweep; results.json and metrics.csv rows of each member, by seed."""
    from conftest import run_app

    proc = run_app(*STACKED_SWEEP, f"hydra.sweep.dir={sweep_dir}", *extra, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return {i + 1: (json.loads((sweep_dir / str(i) / "results.json").read_text()), rows(sweep_dir / str(i)))
            for i in range(2)}


def assert_rows_close(got: list[dict], want: list[dict]) -> None:
    """The same rows (epoch, step and keys) with the same figures to 1e-4: a member's stacked step is a vmapped
    batch whose numerics may differ in the last bits with what else is in the stack at that step."""
    assert [(r["epoch"], r["step"], sorted(r)) for r in got] == [(r["epoch"], r["step"], sorted(r)) for r in want]
    for a, b in zip(got, want):
        for key in b:
            assert math.isclose(float(a[key]), float(b[key]), rel_tol=1e-4, abs_tol=1e-6), (key, a, b)


@pytest.mark.parametrize("stops", STACKED_STOPS, ids=["-".join(s) for s in STACKED_STOPS])
def test_stacked_members_stopped_anywhere_resume_to_the_uninterrupted_sweep(stops, tmp_path, tmp_path_factory,
                                                                             fashion_mnist):
    if not _STACKED:
        _STACKED.update(stacked_sweep(tmp_path_factory.mktemp("stacked") / "whole"))
    signum = SIGNALS[STACKED_STOPS.index(stops) % len(SIGNALS)]
    sweep_dir = tmp_path / "sweep"
    where = "[" + ",".join(f'"{s}"' for s in stops) + "]"
    stopped = stacked_sweep(sweep_dir, *fault("StopAt", where=where, signum=signum))
    assert [r["status"] for r, _ in stopped.values()] == ["preempted", "preempted"], stopped
    resumed = stacked_sweep(sweep_dir, "resume=auto")
    for seed, (results, got_rows) in resumed.items():
        ref, ref_rows = _STACKED[seed]
        assert results["status"] == "finished" and results["preemptions"] == 1, results
        assert (results["epochs"], results["global_step"]) == (ref["epochs"], ref["global_step"]) == (3, 12)
        assert results["metrics"].keys() == ref["metrics"].keys()
        for key, value in ref["metrics"].items():
            if not key.startswith("perf/"):
                assert math.isclose(results["metrics"][key], value, rel_tol=1e-4, abs_tol=1e-6), (seed, key)
        assert_rows_close(got_rows, ref_rows)
        assert [r["epoch"] for r in got_rows if "train/loss" in r] == ["0", "1", "2"]
        assert Path(results["best_checkpoint"]).name == Path(ref["best_checkpoint"]).name


def train_stabilised(out: Path, root: Path, *extra: str) -> dict:
    from vaelab.cli.train import train

    tiny = [o for o in TINY_RUN if not o.startswith(("model.hidden_dim", "model.latent_dim"))]
    return train(compose(*tiny, *STABILISED, f"paths.output_dir={out}", f"data.root={root}", *extra))


STABILISED = ["model=ladder", "model.width=8", "model.cell_width=4", "model.latent_channels=2",
              "model.encoder_blocks=[1,1,1]", "trainer.ema_rate=0.8", "trainer.gradient_skip_threshold=265"]
_STABILISED: dict = {}


@pytest.mark.parametrize("where", ["step:6", "val:1", "test:0"])
def test_a_stabilised_ladder_stopped_anywhere_resumes_to_the_uninterrupted_run(where, tmp_path, tmp_path_factory,
                                                                              fashion_mnist, monkeypatch):
    """model=ladder with an EMA of its weights and gradient skipping: the average and the skip count are in the
    checkpoint, so a stop inside an epoch, in validation, at an epoch's end or in the test phase resumes to the
    uninterrupted run (which skips some updates and not others)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    if not _STABILISED:
        out = tmp_path_factory.mktemp("stabilised") / "run"
        _STABILISED.update(results=train_stabilised(out, fashion_mnist), rows=rows(out))
    ref, ref_rows = _STABILISED["results"], _STABILISED["rows"]
    skipped = [float(r["train/skipped_steps"]) for r in ref_rows if "train/skipped_steps" in r]
    assert len(skipped) == 3 and 0 < sum(skipped) < 12, skipped  # some updates skipped, not all
    out = tmp_path / "run"
    stopped = train_stabilised(out, fashion_mnist, *fault("StopAt", where=where, signum=signal.SIGTERM))
    assert stopped["status"] == "preempted", stopped
    resumed = train_stabilised(out, fashion_mnist, "resume=auto")
    assert resumed["status"] == "finished" and resumed["global_step"] == ref["global_step"] == 12
    assert_same_run(resumed, ref, rows(out), ref_rows)
