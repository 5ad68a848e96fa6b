"""Cluster habits that must not lose work: submitit's requeue, a sweep relaunched with resume=auto, runs that
start together, a directory a live run owns, refused starts that must change nothing. Real processes, real
signals and real submitit (its local launcher needs no SLURM)."""

import json
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, TINY, app_env, fault, run_app

SMALL = [*TINY, "data.subset=1000", "trainer.max_epochs=3", "logger=csv", "eval.importance_samples=8",
         "callbacks.image_grids.every_n_epochs=10"]  # 20 steps an epoch


def _kill_at(step: int, signum: int) -> list[str]:
    return fault("SignalAt", step=step, signum=signum)


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM])
def test_submitit_requeues_a_signalled_job_which_continues_the_same_run(tmp_path, fashion_mnist, signum):
    """SIGUSR2 is what SLURM sends before the time limit (conf/hydra/launcher/slurm.yaml), SIGTERM what scancel
    and preemption send: the run saves, hands the signal to submitit (for SIGTERM through the handler Lightning
    wraps around submitit's), submitit requeues the job, and the new start continues from the checkpoint."""
    sweep = tmp_path / "sweep"
    proc = run_app("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", *SMALL,
                   *_kill_at(25, signum), "logger=default", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((sweep / "0" / "results.json").read_text())
    assert res["status"] == "finished" and res["global_step"] == 60 and res["preemptions"] == 1
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.*"))
    assert f"stopped by {signal.Signals(signum).name} at epoch 1, step 30" in logs and "Requeued job" in logs
    runs = list((sweep / "0" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1  # two starts, one W&B run id
    assert res["wandb"]["id"] == runs[0].name.rsplit("-", 1)[1]


def test_a_sweep_relaunched_with_resume_auto_continues_its_jobs_and_skips_finished_ones(tmp_path, fashion_mnist):
    logs = tmp_path / "outputs"
    sweep = ["-m", "seed=1,2", *SMALL, *_kill_at(25, signal.SIGTERM), f"paths.log_dir={logs}"]
    first = run_app(*sweep)  # job 0 is stopped at step 30; the process ends there
    assert first.returncode == 0, first.stderr[-3000:]
    (sweep_dir,) = (logs / "multirun").iterdir()
    assert json.loads((sweep_dir / "0" / "results.json").read_text())["status"] == "preempted"
    assert not (sweep_dir / "1").exists()
    second = run_app(*sweep, "resume=auto")  # job 0 continues and finishes; job 1 starts and is stopped
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.name for p in (logs / "multirun").iterdir()] == [sweep_dir.name]  # the same sweep directory
    job0 = json.loads((sweep_dir / "0" / "results.json").read_text())
    assert job0["status"] == "finished" and job0["preemptions"] == 1 and job0["global_step"] == 60
    assert json.loads((sweep_dir / "1" / "results.json").read_text())["status"] == "preempted"
    third = run_app(*sweep, "resume=auto")
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"{sweep_dir / '0'} has finished already; not trained again" in third.stdout
    assert json.loads((sweep_dir / "0" / "results.json").read_text()) == job0  # untouched
    job1 = json.loads((sweep_dir / "1" / "results.json").read_text())
    assert job1["status"] == "finished" and job1["preemptions"] == 1 and job1["seed"] == 2


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vaelab.cli.train", *args], cwd=ROOT, env=app_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_runs_started_together_get_their_own_directories(tmp_path, fashion_mnist):
    logs = tmp_path / "outputs"
    procs = [_start(*SMALL, "trainer.max_epochs=1", f"seed={seed}", f"paths.log_dir={logs}") for seed in (1, 2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    dirs = sorted((logs / "train").iterdir())
    assert len(dirs) == 2
    assert sorted(json.loads((d / "results.json").read_text())["seed"] for d in dirs) == [1, 2]


def test_a_directory_a_live_run_owns_is_refused_and_left_untouched(tmp_path, fashion_mnist):
    run_dir = tmp_path / "run"
    live = _start(*SMALL, "data.subset=null", "trainer.max_epochs=50", f"hydra.run.dir={run_dir}")
    try:
        for _ in range(600):
            overrides = run_dir / ".hydra" / "overrides.yaml"  # Hydra writes it after config.yaml
            if (run_dir / "run.lock").is_file() and overrides.is_file() and overrides.stat().st_size > 0:
                break
            time.sleep(0.1)
        config = (run_dir / ".hydra" / "config.yaml").read_bytes()
        second = run_app(*SMALL, "seed=7", f"hydra.run.dir={run_dir}")
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith(f"error: {run_dir} is in use by another run (pid {live.pid}")
        assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config
    finally:
        live.send_signal(signal.SIGTERM)
        out, err = live.communicate(timeout=120)
    assert (run_dir / "results.json").is_file(), (live.returncode, out[-2000:], err[-3000:])  # what the run said
    assert json.loads((run_dir / "results.json").read_text())["status"] == "preempted"
    assert not (run_dir / "run.lock").exists()  # released at the end: the same command can continue it
    again = run_app(*SMALL, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", "resume=auto")
    assert again.returncode == 0, again.stderr[-3000:]


def test_a_refused_resume_changes_nothing(tmp_path, fashion_mnist):
    run_dir = tmp_path / "run"
    first = run_app(*SMALL, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}")
    assert first.returncode == 0, first.stderr[-3000:]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_app(*SMALL, "model=deep", "resume=auto", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "is from another model" in proc.stderr
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("where,expected", [
    ("/proc/vaelab-run", "cannot create the run directory /proc/vaelab-run"),
    ("FILE", "is a file; choose another hydra.run.dir"),
    ("CHECKPOINTS", "checkpoints is a file where the run keeps its checkpoints"),
])
def test_an_output_path_that_cannot_be_written_is_refused_before_training(tmp_path, fashion_mnist, where, expected):
    run_dir = {"/proc/vaelab-run": "/proc/vaelab-run", "FILE": str(tmp_path / "a-file"),
               "CHECKPOINTS": str(tmp_path / "run")}[where]
    if where == "FILE":
        (tmp_path / "a-file").write_text("not a directory")
    if where == "CHECKPOINTS":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "checkpoints").write_text("not a directory")
    proc = run_app(*SMALL, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert expected in line
    assert "epoch 1" not in proc.stdout  # refused before any training
