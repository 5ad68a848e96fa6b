"""How a sweep ends, whatever launcher ran it: a failed job says so in one line naming its job number, the others
finish, and the sweep then exits with status 1 in one closing line; a wrong launcher setting is refused before
Hydra writes anything; each stacked member's W&B run carries its own console lines, in a W&B group of its
sweep's directory alone; the data-cache line is said only when the cache is read."""

from __future__ import annotations

import contextlib
import json
import logging

import numpy as np
import pytest
import wandb_files
from conftest import TINY, run_app

from vaelab.cli.rundirs import sweep_id

SMALL = [*TINY, "trainer.max_epochs=1", "data.subset=100", "eval.importance_samples=4",
         "extras.print_config=false"]
LAUNCHERS = {"basic": [], "joblib": ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
             "stacked": ["hydra/launcher=stacked", "hydra.launcher.stack=true"]}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_a_failed_job_is_named_in_one_line_and_fails_the_sweep_after_the_others(launcher, tmp_path, fashion_mnist):
    sweep = tmp_path / "sweep"
    proc = run_app("-m", *SMALL, "logger=csv", *LAUNCHERS[launcher], "loss.beta=0.5,-1,1.0",
                   f"hydra.sweep.dir={sweep}", timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert errors[0].startswith("error: job #1: "), errors
    assert errors[0].endswith("loss.beta must be at least 0, got -1"), errors
    assert errors[1].startswith("error: 1 job of 3 failed (#1") and "resume=auto" in errors[1], errors
    statuses = [json.loads((sweep / str(j) / "results.json").read_text())["status"] for j in range(3)]
    assert statuses == ["finished", "failed", "finished"]  # the others finished


def test_a_wrong_launcher_setting_is_refused_before_the_sweep_writes_anything(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_app("-m", "hydra/launcher=stacked", "hydra.launcher.max_members=0", "seed=1,2",
                   f"hydra.sweep.dir={sweep}", timeout=120)
    assert proc.returncode == 1
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == [
        "error: hydra.launcher.max_members=0 must be a whole number of at least 1"]
    assert not sweep.exists()  # no multirun.yaml, no empty sweep directory


def test_a_job_that_cannot_be_built_says_so_once(tmp_path, fashion_mnist):
    good = tmp_path / "good.npz"
    rng = np.random.default_rng(0)
    np.savez(good, train=rng.integers(0, 256, (120, 28, 28), dtype=np.uint8),
             test=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8))
    proc = run_app("-m", *SMALL, "logger=csv", *LAUNCHERS["stacked"], "data=arrays", "data.val_size=20",
                   f"data.path={good},{tmp_path / 'missing.npz'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   timeout=300)
    assert proc.returncode == 1
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "missing.npz is not a file" in ln]
    assert len(said) == 1 and said[0].startswith("error: job #1: "), said  # not also a "runs alone" line
    assert "1 job of 2 failed (#1" in proc.stderr


def test_each_stacked_member_logs_its_own_lines_to_its_own_wandb_run(tmp_path, fashion_mnist):
    sweep = tmp_path / "sweep"
    proc = run_app("-m", *SMALL, "logger=wandb", *LAUNCHERS["stacked"], "seed=1,2", f"hydra.sweep.dir={sweep}",
                   timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job, seed in ((0, 1), (1, 2)):
        (run_dir,) = (sweep / str(job) / "wandb").glob("offline-run-*")
        lines = (run_dir / "files" / "output.log").read_text().splitlines()
        starts = [ln for ln in lines if "vaelab: vanilla / standard prior" in ln and "parameters, on cpu" in ln]
        assert len(starts) == 1 and f"seed {seed}; run directory {sweep / str(job)}" in starts[0], lines[:5]
        assert any("test/nll " in ln for ln in lines), lines  # its own summary
        assert not any("finished: test/nll" in ln for ln in lines)  # the launcher's lines are the sweep's, not its
        assert wandb_files.run_info(run_dir)["group"] == f"sweep-{sweep_id(sweep)}"


def test_two_sweeps_in_folders_of_the_same_name_get_two_w_and_b_groups(tmp_path):
    a, b = tmp_path / "a" / "sweep", tmp_path / "b" / "sweep"
    assert sweep_id(a) != sweep_id(b) and sweep_id(a).startswith("sweep-") and sweep_id(a) == sweep_id(str(a))


def test_the_data_cache_line_is_said_only_when_the_cache_is_read(tmp_path, monkeypatch, caplog):
    from vaelab.data import sources

    monkeypatch.chdir(tmp_path)  # not a checkout: the default is the per-user cache
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "_SAID_WHERE", False)
    caplog.set_level(logging.INFO, logger="vaelab.data.sources")
    root = sources.default_data_dir()
    assert root == str(tmp_path / "cache" / "vaelab" / "data") and "keeps data sets" not in caplog.text
    with contextlib.suppress(Exception):  # read (from Debian's files, where installed) or not found: either way
        sources.load_images("fashion_mnist", tmp_path / "elsewhere", download=False)
    assert "keeps data sets" not in caplog.text
    with contextlib.suppress(Exception):
        sources.load_images("fashion_mnist", root, download=False)
    assert caplog.text.count("vaelab keeps data sets in") == 1
