"""A run killed outright (SIGKILL: no handler runs, nothing is saved) at any moment, then resumed, ends with the
same histories as the uninterrupted run: every row of metrics.csv, of TensorBoard's event files and of the W&B
history (read back from W&B's own local logs) once, in one W&B run, with its results, checkpoints and training
time. A tiny run (2 epochs of 2 optimiser steps, all three loggers, grids every epoch) is killed at every phase
boundary: each step, in each validation, after each checkpoint file is written, at each epoch's end, after
training and in the test phase. Each start is a fork of this test process (its imports done once), killed by a
real SIGKILL, and the resume is the same config with resume=auto, as a user repeats the command."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest
import wandb_files
from conftest import compose, fault

from vaelab.training.checkpoints import readable_checkpoints, saved_entries

RUN = ["data.subset=100", "data.batch_size=50", "data.eval_batch_size=100", "trainer.max_epochs=2",
       "trainer.steps_per_execution=1", "eval.importance_samples=8", "trainer.enable_progress_bar=false",
       "callbacks.image_grids.every_n_epochs=1", "callbacks.image_grids.num_samples=4",
       "callbacks.image_grids.num_reconstructions=4", "loss.warmup_epochs=2", "scheduler=cosine",
       "trainer.log_every_n_steps=1", "model.hidden_dim=32", "model.latent_dim=4", "logger=many",
       "extras.print_config=false"]
# 5 checkpoint files: epoch_000 and last.ckpt after each epoch's validation, last.ckpt once training has ended
KILLS = ([f"step:{s}" for s in range(4)] + ["val:0", "val:1"] + [f"saved:{k}" for k in range(1, 6)]
         + ["epoch_end:0", "epoch_end:1", "train_end", "test:0"])
_WHOLE: dict = {}


def in_fork(out: Path, root: Path, *extra: str) -> int:
    """Train in a forked child of this process; its exit code (-9 when killed)."""
    cfg = compose(*RUN, f"paths.output_dir={out}", f"data.root={root}", *extra)
    pid = os.fork()
    if pid == 0:  # the child: train, and leave without running the parent's exit handlers
        code = 0
        try:
            from vaelab.cli.train import train

            train(cfg)
        except BaseException as exc:  # noqa: BLE001 - said, and the exit code fails the test
            print(f"in_fork: {exc!r}", flush=True)
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def csv_rows(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return [{k: v for k, v in r.items() if v and not k.startswith("perf/")} for r in csv.DictReader(f)]


def tensorboard_values(run: Path) -> list[tuple]:
    """Every value of every event file, in the order TensorBoard reads them (by file name)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out = []
    for path in sorted((run / "tensorboard").rglob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                if not v.tag.startswith("perf/"):
                    data = v.image.encoded_image_string or v.tensor.SerializeToString() or str(v.simple_value).encode()
                    out.append((event.step, v.tag, hashlib.sha256(data).hexdigest()[:16]))
    return out


# W&B's own numbering (its _step, and media file names and artifact addresses that carry it) starts again in each
# start's local log; wall-clock figures differ
_W_AND_B_OWN = ("/filenames", "/path", "/artifact_path", "/_latest_artifact_path")


def wandb_history(run: Path) -> tuple[set[str], list[dict]]:
    """The W&B run ids and the history rows of every local log of the run, in the order `wandb sync` takes them."""
    ids, rows = set(), []
    for log_dir in sorted((run / "wandb").glob("*run-*")):
        ids.add(wandb_files.run_info(log_dir)["id"])
        rows += [{k: v for k, v in row.items() if not k.startswith(("_", "perf/")) and not k.endswith(_W_AND_B_OWN)}
                 for row in wandb_files.history(log_dir)]
    return ids, rows


def histories(run: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    return {"csv": csv_rows(run), "tensorboard": tensorboard_values(run), "wandb": wandb_history(run)[1],
            "metrics": {k: v for k, v in results["metrics"].items() if not k.startswith("perf/")},
            "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()),
            "epochs": results["epochs"], "global_step": results["global_step"], "results": results}


def whole(tmp_path_factory, root: Path) -> dict:
    if not _WHOLE:
        out = tmp_path_factory.mktemp("whole") / "run"
        assert in_fork(out, root) == 0
        _WHOLE.update(histories(out))
    return _WHOLE


@pytest.mark.parametrize("where", KILLS)
def test_a_kill_anywhere_resumes_to_the_uninterrupted_run(where, tmp_path, tmp_path_factory, fashion_mnist,
                                                          monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ref = whole(tmp_path_factory, fashion_mnist)
    out = tmp_path / "run"
    assert in_fork(out, fashion_mnist, *fault("KillAt", where=where)) == -9
    assert f"fault_callbacks: killing at {where}" in capfd.readouterr().out
    good, _ = readable_checkpoints(out / "checkpoints")
    saved_time = saved_entries(good[0][1], "vaelab_train_time_s")["vaelab_train_time_s"] if good else 0.0

    assert in_fork(out, fashion_mnist, "resume=auto") == 0
    said = capfd.readouterr()
    assert "in_fork:" not in said.out and "W&B kept" not in said.out, said.out[-3000:]
    got = histories(out)
    for key in ("csv", "tensorboard", "wandb", "checkpoints", "epochs", "global_step"):
        assert got[key] == ref[key], (key, [r for r in got[key] if r not in ref[key]][:3],
                                      [r for r in ref[key] if r not in got[key]][:3])
    assert got["metrics"].keys() == ref["metrics"].keys()
    for key, value in ref["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert [r["epoch"] for r in got["csv"] if "train/loss" in r] == ["0", "1"]  # each epoch's train/ row once
    # one W&B run, the one named in run_state.json from the run's start
    ids, _ = wandb_history(out)
    assert ids == {json.loads((out / "run_state.json").read_text())["wandb_run_id"]}
    assert got["results"]["wandb"]["id"] in ids
    # the training time of the killed start, up to its checkpoint, is kept
    assert got["results"]["train_time_s"] >= round(saved_time, 2) and got["results"]["train_time_s"] > 0
