"""Several optimiser steps per Lightning step (trainer.steps_per_execution): everything that counts steps
counts optimiser steps, and N steps per execution train exactly the run that one step per execution trains."""

import json

import pytest
from conftest import TINY, run_app

# 400 images in batches of 50: 8 steps per epoch; with 3 steps per execution they come as 3 + 3 + 2
BASE = [*TINY, "trainer.max_epochs=3", "logger=csv", "trainer.deterministic=true"]


def _run(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    proc = run_app(*BASE, f"hydra.run.dir={run_dir}", *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    head = rows[0].split(",")
    table = [dict(zip(head, r.split(","))) for r in rows[1:]]
    return json.loads((run_dir / "results.json").read_text()), table


def _column(table, key):
    return [(int(r["step"]), float(r[key])) for r in table if r.get(key)]


def test_n_steps_per_execution_train_the_same_run_as_one(tmp_path, fashion_mnist):
    one, one_csv = _run(tmp_path, "one", "trainer.steps_per_execution=1")
    three, three_csv = _run(tmp_path, "three", "trainer.steps_per_execution=3")
    assert one["global_step"] == three["global_step"] == 24 and three["epochs"] == 3
    for key in ("train/loss", "train/kl", "val/loss", "val/kl", "test/nll", "test/elbo", "train/beta"):
        assert three["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-6), key
    # the per-step curves: the same optimiser steps (log_every_n_steps=2), the same values, the same x-axis
    for key in ("train_step/loss", "train_step/objective"):
        a, b = _column(one_csv, key), _column(three_csv, key)
        assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 24, 2))
        assert [v for _, v in b] == pytest.approx([v for _, v in a], rel=1e-6)
    # epoch metrics land at the same step on the loggers' x-axis (optimiser steps, not executions): Lightning counts
    # training_step calls there, and execution.count_optimizer_steps advances its private counter (no public way)
    for key, steps in (("val/loss", [7, 15, 23]), ("train/loss", [7, 15, 23]), ("test/nll", [24])):
        assert [s for s, _ in _column(three_csv, key)] == [s for s, _ in _column(one_csv, key)] == steps, key


def test_step_limits_count_optimiser_steps(tmp_path, fashion_mnist):
    res, table = _run(tmp_path, "limits", "trainer.steps_per_execution=4", "trainer.max_steps=14",
                      "trainer.val_check_interval=4")
    assert res["global_step"] == 14  # the last execution is cut to 2 steps
    # validation every 4 optimiser steps (one execution of 4), and at the end of the epoch
    assert [s for s, _ in _column(table, "val/loss")] == [3, 7, 11, 13]


def test_a_step_limit_that_splits_an_execution_is_refused_in_one_line(tmp_path, fashion_mnist):
    proc = run_app(*BASE, f"hydra.run.dir={tmp_path / 'bad'}", "trainer.steps_per_execution=3",
                   "trainer.val_check_interval=4")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == ("error: trainer.val_check_interval=4 counts optimiser steps and "
                                                    "must be a multiple of trainer.steps_per_execution=3")
    proc = run_app(*BASE, f"hydra.run.dir={tmp_path / 'bad2'}", "trainer.steps_per_execution=0")
    assert proc.returncode == 1 and "error: trainer.steps_per_execution must be at least 1, got 0" in proc.stderr


def test_auto_takes_ten_steps_per_execution_on_a_cpu(tmp_path, fashion_mnist):
    from vaelab.training.checkpoints import load_checkpoint

    res, table = _run(tmp_path, "auto", "trainer.steps_per_execution=auto", "trainer.max_epochs=2",
                      "data.subset=1000")  # 20 steps an epoch: two executions of 10
    assert res["global_step"] == 40
    assert [s for s, _ in _column(table, "train_step/loss")] == list(range(1, 40, 2))
    loops = load_checkpoint(tmp_path / "auto" / "checkpoints" / "last.ckpt")["loops"]["fit_loop"]
    assert loops["epoch_loop.batch_progress"]["total"]["completed"] == 4  # Lightning saw 4 batches: executions
