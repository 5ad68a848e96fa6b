"""A stopped run, resumed, is the same run, and no save can strand it: checkpoints are written atomically
beside their destination, a resume takes the newest whole checkpoint, a full disk is one line, a signal in the
test phase is a preemption. Real processes, signals, SIGKILLs and a real small filesystem; nothing mocked."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, app_env, fault, run_app, run_ok, stopped_then_resumed

from vaelab.training.checkpoints import checkpoint_step, load_checkpoint

# the default config's KL warm-up (10 epochs) is active all run long: beta must continue where it stopped
WARM = [*TINY, "data.subset=3000", "trainer.max_epochs=3", "loss.warmup_epochs=10", "trainer.deterministic=true",
        "eval.importance_samples=16", "callbacks.image_grids.every_n_epochs=10"]
_WHOLE: dict = {}


def whole_run(tmp_path_factory) -> tuple[dict, list[dict]]:
    """results.json and metrics.csv rows of the uninterrupted run (once per test process)."""
    if not _WHOLE:
        run_dir = tmp_path_factory.mktemp("whole") / "run"
        proc = run_app(*WARM, "logger=csv", f"hydra.run.dir={run_dir}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        _WHOLE.update(results=json.loads((run_dir / "results.json").read_text()), rows=epoch_rows(run_dir))
    return _WHOLE["results"], _WHOLE["rows"]


def epoch_rows(run_dir: Path) -> list[dict]:
    """The per-epoch train/beta and train/lr that metrics.csv logged."""
    epochs: dict[float, dict] = {}
    with open(run_dir / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for key in ("train/beta", "train/lr"):
                if row.get(key):
                    epochs.setdefault(float(row["epoch"]), {})[key] = float(row[key])
    return [{"epoch": e, **values} for e, values in sorted(epochs.items())]


# (signal, the step it comes at, optimiser steps per execution, loggers): the run stops at the end of the execution
# holding that step; W&B runs in one case, to see the resumed run continue the same W&B run
@pytest.mark.parametrize("signum,step,steps,logger", [(signal.SIGUSR2, 25, 5, "default"), (signal.SIGTERM, 95, 1, "csv"),
                                                      (signal.SIGINT, 150, 10, "csv")])
def test_a_run_stopped_mid_epoch_with_warmup_ends_where_the_whole_run_ends(tmp_path, tmp_path_factory,
                                                                           fashion_mnist, signum, step, steps, logger):
    logs = tmp_path / "outputs"
    seen = {}

    def look():  # the stopped run, before the same command with resume=auto finds its run directory
        (seen["dir"],) = (logs / "train").iterdir()
        seen["preempted"] = json.loads((seen["dir"] / "results.json").read_text())

    _, resumed = stopped_then_resumed(*WARM, f"trainer.steps_per_execution={steps}", f"logger={logger}",
                                      f"paths.log_dir={logs}", between=look,
                                      fault_args=fault("SignalAt", step=step, signum=signum))
    run_dir, preempted = seen["dir"], seen["preempted"]
    assert preempted["status"] == "preempted" and preempted["signal"] == signal.Signals(signum).name
    assert preempted["global_step"] == (step // steps + 1) * steps  # the end of the execution holding the step
    assert [p.name for p in (logs / "train").iterdir()] == [run_dir.name]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["preemptions"] == 1
    if logger == "default":  # the resumed run continues its W&B run
        assert res["wandb"]["id"] == json.loads((run_dir / "run_state.json").read_text())["wandb_run_id"]
    ref, ref_rows = whole_run(tmp_path_factory)
    assert res["status"] == "finished" and res["global_step"] == ref["global_step"]
    assert res["metrics"].keys() == ref["metrics"].keys()
    for key, value in ref["metrics"].items():
        if not key.startswith("perf/"):
            assert res["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    rows = epoch_rows(run_dir)  # every epoch's beta and learning rate, as the whole run logged them
    assert len(rows) == len(ref_rows) == 3 and all(r == pytest.approx(w) for r, w in zip(rows, ref_rows)), rows
    assert [round(r["train/beta"], 3) for r in ref_rows] == [0.098, 0.198, 0.298]
    assert not [ln for ln in resumed.stdout.splitlines() if "done in" in ln and float(ln.split()[4]) > 120]


def test_a_signal_in_the_test_phase_is_a_preemption_and_resume_tests_without_training(tmp_path, fashion_mnist):
    run_dir = tmp_path / "run"
    args = [*TINY, "logger=csv", f"hydra.run.dir={run_dir}"]
    seen = {}

    def look():
        seen.update(stopped=json.loads((run_dir / "results.json").read_text()),
                    trained=json.loads((run_dir / "run_state.json").read_text())["train_time_s"])

    stop, resumed = stopped_then_resumed(*args, fault_args=fault("SignalAtTest", batch=0, signum=signal.SIGTERM),
                                         between=look, fault_on_resume=False)  # the resume tests again
    assert "stopped by SIGTERM during the test phase" in stop.stdout
    stopped, trained = seen["stopped"], seen["trained"]
    assert stopped["status"] == "preempted" and stopped["phase"] == "test"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and "test/nll" in res["metrics"] and res["preemptions"] == 1
    # results.json gives the training time to the hundredth of a second, run_state.json in full
    assert res["global_step"] == stopped["global_step"] and res["train_time_s"] >= round(trained, 2) > 0
    assert not any(ln.startswith("epoch ") for ln in resumed.stdout.splitlines())  # no training again


def test_a_truncated_last_checkpoint_resumes_from_the_older_whole_one(tmp_path, fashion_mnist):
    run_dir = tmp_path / "run"
    args = [*WARM, "logger=csv", "trainer.max_epochs=2", "data.subset=1000", f"hydra.run.dir={run_dir}"]
    run_ok(*args[:-1], f"hydra.run.dir={tmp_path / 'whole'}")
    last = run_dir / "checkpoints" / "last.ckpt"
    # cut short, as a kill during a copy leaves it
    _, resumed = stopped_then_resumed(*args, fault_args=fault("SignalAt", step=25, signum=signal.SIGTERM),
                                      between=lambda: last.write_bytes(last.read_bytes()[:100_000]),
                                      fault_on_resume=False)  # it resumes from before step 25
    assert "last.ckpt in" in resumed.stdout and "resuming from epoch_000.ckpt" in resumed.stdout
    nll = json.loads((run_dir / "results.json").read_text())["metrics"]["test/nll"]
    assert nll == pytest.approx(json.loads((tmp_path / "whole" / "results.json").read_text())["metrics"]["test/nll"],
                                rel=1e-6)


def test_sigkill_inside_saves_on_another_filesystem_never_strands_the_run(tmp_path, fashion_mnist):
    """The run directory on /tmp's disk, the temporary directory on a tmpfs (/dev/shm): a kill at a random moment
    inside a save leaves every checkpoint readable, and resume=auto ends where the whole run ends."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's temporary directory")
    tmpdir = Path(os.environ.get("VAELAB_TEST_SHM", shm)) / f"vaelab-{os.getpid()}"
    tmpdir.mkdir(exist_ok=True)
    run_dir = tmp_path / "run"
    args = [*TINY, "logger=csv", "trainer.max_epochs=6", "data.subset=600", "eval.importance_samples=8",
            "callbacks.image_grids.every_n_epochs=10", *fault("SlowSave"),
            f"hydra.run.dir={run_dir}", "extras.print_config=false"]
    env = dict(app_env(), TMPDIR=str(tmpdir))
    rng = random.Random(0)
    kills = 0
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "vaelab.cli.train", *args, "resume=auto"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            if "fault_callbacks: saving" in line and rng.random() < 0.5:
                time.sleep(rng.uniform(0.0, 0.3))
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
        proc.wait(timeout=300)
        proc.stdout.close()
        for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
            assert checkpoint_step(ckpt) is not None, f"{ckpt.name} is broken after a kill"
            load_checkpoint(ckpt)
        assert not list(tmpdir.iterdir()), "temporary files left outside the run directory"
        if (run_dir / "results.json").is_file() and json.loads((run_dir / "results.json").read_text())["status"] == "finished":
            break
    assert kills >= 2
    final = run_app(*args, "resume=auto")
    assert final.returncode == 0, final.stdout[-2000:] + final.stderr[-2000:]
    res = json.loads((run_dir / "results.json").read_text())
    whole_dir = tmp_path / "whole"
    whole = run_app(*args[:-2], f"hydra.run.dir={whole_dir}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    ref = json.loads((whole_dir / "results.json").read_text())
    assert res["status"] == "finished" and res["metrics"]["test/nll"] == pytest.approx(ref["metrics"]["test/nll"],
                                                                                       rel=1e-6)
    assert not list((run_dir / "checkpoints").glob(".*.tmp")) and not list((run_dir / "checkpoints").glob("*-v*"))


@pytest.fixture
def small_fs(tmp_path):
    """A real 64 MB filesystem (tmpfs) for the run directory; needs root, as CI and the dev machine run."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_at_a_checkpoint_is_one_line_and_every_checkpoint_left_loads(small_fs, fashion_mnist):
    run_dir = small_fs / "run"
    proc = run_app(*TINY, "logger=csv", "trainer.max_epochs=4", f"hydra.run.dir={run_dir}",
                   *fault("FillDiskAt", path=small_fs, epoch=1))
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "Logging error" not in out, out[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on {small_fs} while saving "), errors
    assert errors[0].endswith("free space and rerun with resume=auto") and "whole (" in errors[0]
    left = sorted((run_dir / "checkpoints").iterdir())
    assert left and all(p.suffix == ".ckpt" for p in left), left  # no temporary file
    for ckpt in left:
        load_checkpoint(ckpt)
    (small_fs / "filler").unlink()  # space again: the run continues
    resumed = run_app(*TINY, "logger=csv", "trainer.max_epochs=4", f"hydra.run.dir={run_dir}", "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["epochs"] == 4


def test_an_unwritable_checkpoint_folder_is_one_line_never_a_false_saved(small_fs, fashion_mnist):
    run_dir = small_fs / "run"
    first = run_app(*TINY, "logger=csv", "trainer.max_epochs=1", "test=false", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    os.chmod(run_dir / "checkpoints", 0o555)
    try:
        if os.access(run_dir / "checkpoints", os.W_OK):  # root ignores modes: make the filesystem read-only
            subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
        proc = run_app(*TINY, "logger=csv", "trainer.max_epochs=2", "test=false", f"hydra.run.dir={run_dir}",
                       "resume=auto", "extras.print_config=false")
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_fs)], capture_output=True)
        os.chmod(run_dir / "checkpoints", 0o755)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "saved" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 8  # the good one, as it was


def mount_small(where: Path) -> Path:
    where.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)], check=True)
    return where


@pytest.mark.parametrize("launcher", ["basic", "stacked"])
def test_a_full_disk_in_a_sweep_ends_it_non_zero_and_keeps_every_row_logged(launcher, small_fs, fashion_mnist):
    """A full disk is no configuration's fault: the sweep stops with a non-zero exit (one line per run that met it),
    as a run alone does, and metrics.csv keeps every row logged before the failing save (epoch 0's train/ and val/
    rows, epoch 1's, epoch 2's steps). A stack's members each meet their own full disk at their epoch 1's end
    (each job directory is a disk of its own: which write meets a shared full disk first is a race, said below)."""
    stacked = launcher == "stacked"
    sweep_dir = small_fs / "sweep"
    disks = [mount_small(sweep_dir / str(i)) for i in range(2)] if stacked else [small_fs]
    try:
        proc = run_app("-m", *TINY, "logger=csv", "trainer.max_epochs=3", "seed=1,2", f"hydra.sweep.dir={sweep_dir}",
                       *(["hydra/launcher=stacked", "hydra.launcher.stack=true"] if stacked else []),
                       *fault("FillDiskAt", path="${paths.output_dir}" if stacked else small_fs, epoch=1),
                       "extras.print_config=false")
        assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
        errors = sorted(ln for ln in proc.stderr.splitlines() if ln.strip())
        # the basic launcher stops at the first job; a stack's members meet their full disks together, one line each
        assert len(errors) == len(disks), errors
        for i, (error, disk, job) in enumerate(zip(errors, disks, [sweep_dir / str(i) for i in range(len(disks))])):
            # the disk fills at epoch 1's end, after its checkpoints (saved once its validation ended): the first
            # write to meet it is epoch 2's (a grid's PNG, drawn before that epoch's checkpoint)
            assert error.startswith(f"error: job #{i}: no space left on {disk} while saving {job}/"), [error]
        assert not (sweep_dir / "1").exists() or stacked
        for job in [sweep_dir / str(i) for i in range(len(errors))]:
            with open(job / "metrics.csv") as f:
                rows = list(csv.DictReader(f))
            assert [r["epoch"] for r in rows if r["train/loss"]] == ["0", "1"]
            assert [r["epoch"] for r in rows if r["val/loss"]] == ["0", "1"]  # epoch 2's failed before it was logged
            assert {r["step"] for r in rows if r["train_step/loss"]} >= {"1", "3", "5", "7", "21", "23"}  # every 2nd
            assert (job / "checkpoints" / "epoch_001.ckpt").is_file()
    finally:
        for disk in disks[::-1]:
            if disk != small_fs:
                subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_members_sharing_a_disk_that_fills_each_say_so_in_one_line(small_fs, fashion_mnist):
    """Two stacked members on one disk that the first to reach its epoch 1's end fills: the other meets it wherever
    it is (its checkpoint, a grid's PNG, ...). Whichever write that is, each member ends with its one line naming
    the file, the sweep exits 1, no traceback, and every checkpoint left loads."""
    sweep_dir = small_fs / "sweep"
    proc = run_app("-m", *TINY, "logger=csv", "trainer.max_epochs=3", "seed=1,2", f"hydra.sweep.dir={sweep_dir}",
                   "hydra/launcher=stacked", "hydra.launcher.stack=true", "extras.print_config=false",
                   *fault("FillDiskAt", path=small_fs, epoch=1))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    errors = sorted(ln for ln in proc.stderr.splitlines() if ln.strip())
    assert len(errors) == 2, errors
    for i, error in enumerate(errors):
        assert error.startswith(f"error: job #{i}: no space left on {small_fs} while saving {sweep_dir / str(i)}/"), errors
        assert error.endswith("free space and rerun with resume=auto"), error
    for ckpt in sweep_dir.glob("*/checkpoints/*"):
        assert ckpt.suffix == ".ckpt", ckpt  # no temporary file
        load_checkpoint(ckpt)
    assert not [p for p in sweep_dir.glob("*/samples/*.png") if p.stat().st_size == 0]  # no empty PNG left


def test_a_full_disk_met_by_a_grid_or_any_write_is_one_line_naming_the_file(small_fs, fashion_mnist):
    """Not only a checkpoint meets a full disk: here the run's samples/ folder is a disk of its own, too small for
    one grid. The run ends with one line naming the PNG and what is kept, and leaves no half-written PNG."""
    run_dir = small_fs / "run"
    samples = mount_small(run_dir / "samples")
    subprocess.run(["mount", "-o", "remount,size=8k", str(samples)], check=True)
    try:
        proc = run_app(*TINY, "logger=csv", "trainer.max_epochs=2", f"hydra.run.dir={run_dir}")
        assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
        errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(errors) == 1 and errors[0].startswith(f"error: no space left on {samples} while saving "
                                                         f"{samples}/"), errors
        assert errors[0].split(" while saving ")[1].split(";")[0].endswith(".png")
        assert errors[0].endswith("free space and rerun with resume=auto")
        assert not [p for p in samples.iterdir() if p.stat().st_size == 0]
    finally:
        subprocess.run(["umount", "-l", str(samples)], capture_output=True)


def test_a_full_disk_met_by_any_other_write_is_one_line(tmp_path, fashion_mnist):
    """A full disk met by a write vaelab does not make itself (a logger's file, say) is the same one line, naming
    the file the error names, not a traceback."""
    from conftest import compose

    from vaelab.cli.train import train
    from vaelab.errors import SaveError
    from vaelab.training.checkpoints import mount_point

    out = tmp_path / "run"
    with pytest.raises(SaveError) as info:
        train(compose(*TINY, "logger=csv", "extras.print_config=false", f"paths.output_dir={out}",
                      *fault("NoSpaceAt", path=f"{out}/metrics.csv")))
    message = str(info.value)
    assert message.startswith(f"no space left on {mount_point(out)} while saving {out}/metrics.csv; the checkpoints already there "
                              "are whole (last.ckpt at step 16, epoch_001.ckpt at step 16)"), message  # saved before epoch 1's end
