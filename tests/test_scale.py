"""Beyond one process: DDP on CPU processes (gloo), the SLURM launcher's job script, the Optuna sweeper."""

import json
import signal

import pytest
import wandb_files
from conftest import TINY, fault, run_app

from vaelab.training.checkpoints import load_checkpoint

DDP = [*TINY, "trainer=ddp_cpu", "trainer.devices=2", "data.subset=400", "data.batch_size=50",
       "trainer.max_epochs=2", "eval.importance_samples=16"]


def test_ddp_on_two_processes_shards_data_and_matches_one_process_on_the_same_weights(tmp_path, fashion_mnist):
    """model=ladder with the stabilisers, every update skipped: each rank skips the same steps (the norm is of the
    all-reduced gradient), so train/skipped_steps counts one rank's steps, not their sum; the moving average is
    what the run tested and what vaelab-eval evaluates."""
    import csv

    run_dir = tmp_path / "ddp"
    proc = run_app(*DDP, f"hydra.run.dir={run_dir}", "model=ladder", "model.width=8", "model.cell_width=4",
                   "model.latent_channels=2", "model.encoder_blocks=[1,1,1]", "trainer.ema_rate=0.5",
                   "trainer.gradient_skip_threshold=1e-6")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["global_step"] == 2 * 400 // (2 * 50)  # each process takes half of every epoch
    with open(run_dir / "metrics.csv") as f:
        skipped = [float(r["train/skipped_steps"]) for r in csv.DictReader(f) if r.get("train/skipped_steps")]
    assert skipped == [4.0, 4.0]  # 4 steps an epoch on each rank
    assert (run_dir / "train_ddp_process_1.log").is_file()  # a second process really ran
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # one W&B run, not one per rank
    history = wandb_files.history(res["wandb"]["dir"])
    assert len([r for r in history if "val/loss" in r]) == 2

    out = tmp_path / "eval.json"
    ev = run_app(f"ckpt_path={res['best_checkpoint']}", "importance_samples=16", f"output={out}",
                 module="vaelab.cli.eval")
    assert ev.returncode == 0, ev.stderr[-3000:]
    single = json.loads(out.read_text())["metrics"]
    for key in ("test/nll", "test/nll_mc_se", "test/active_units"):
        assert single[key] == pytest.approx(res["metrics"][key], rel=1e-4), key


def test_ddp_run_survives_preemption(tmp_path, fashion_mnist):
    logs = tmp_path / "outputs"
    kill = [*fault("SignalAt", step=5, signum=signal.SIGTERM),
            "callbacks.preemption.check_every_n_steps=2",  # ranks agree every 2 steps (default 10)
            "trainer.steps_per_execution=1"]  # (with more, a run stops at the end of an execution)
    first = run_app(*DDP, *kill, f"paths.log_dir={logs}")
    assert first.returncode == 0, first.stderr[-4000:]
    (run_dir,) = (logs / "train").iterdir()
    stopped = json.loads((run_dir / "results.json").read_text())
    assert stopped["status"] == "preempted" and stopped["global_step"] == 6  # the next agreement point
    again = run_app(*DDP, *kill, f"paths.log_dir={logs}", "resume=auto")
    assert again.returncode == 0, again.stderr[-4000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "finished" and res["global_step"] == 8 and res["preemptions"] == 1


def test_slurm_launcher_renders_a_two_node_four_gpu_job_script():
    import sys

    sys.path.insert(0, str(__import__("conftest").ROOT / "scripts"))
    import os

    from slurm_preview import sbatch_script

    path = os.environ.get("PATH")
    script = sbatch_script(["hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu",
                            "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4", "resume=auto"])
    # its placeholder srun is gone again: the apps this test process starts later must not find one (Lightning
    # then warns on every run that srun is not used)
    assert os.environ.get("PATH") == path
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --partition=gpu", "#SBATCH --signal=USR2@120", "#SBATCH --job-name=vaelab-train",
                 "-m submitit.core._submit"):
        assert line in script, line


def test_submitit_launcher_runs_the_app(tmp_path, fashion_mnist):
    """The real hydra-submitit-launcher, with its local executor: pickled job, subprocess, results back."""
    sweep = tmp_path / "sweep"
    proc = run_app("-m", "hydra/launcher=submitit_local", "model.latent_dim=3,5", *TINY, "trainer.max_epochs=1",
                   "logger=csv", f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in (0, 1)]
    assert [r["status"] for r in results] == ["finished", "finished"]


def test_optuna_sweeper_minimises_the_returned_metric(tmp_path, fashion_mnist):
    import yaml

    sweep = tmp_path / "optuna"
    proc = run_app("hparams_search=optuna", "hydra.sweeper.n_trials=3", "hydra.sweeper.sampler.n_startup_trials=2",
                   *TINY, "trainer.max_epochs=1", "logger=csv", "data.subset=200", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "setup plugin alembic" not in proc.stdout + proc.stderr  # Optuna's database set-up stays quiet
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    trials = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(3)]
    losses = [t["metrics"]["val/loss"] for t in trials]
    assert best["best_value"] == pytest.approx(min(losses))
    assert {"optim.lr", "model.latent_dim", "prior.num_components", "loss.beta"} <= set(best["best_params"])
    assert {t["prior"] for t in trials} == {"vamp"}

    # the study persists in the sweep directory (SQLite): the same command there continues it, its new trials
    # numbered after the stored ones (jobs 3 and 4, the finished ones untouched), the sampler knowing all five
    import optuna

    study = optuna.load_study(study_name="vaelab", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.value for t in study.trials] == pytest.approx(losses)
    first = (sweep / "0" / "results.json").read_text()
    proc = run_app("hparams_search=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=2",
                   *TINY, "trainer.max_epochs=1", "logger=csv", "data.subset=200", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (sweep / "0" / "results.json").read_text() == first
    more = [json.loads((sweep / str(i) / "results.json").read_text())["metrics"]["val/loss"] for i in (3, 4)]
    study = optuna.load_study(study_name="vaelab", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    assert [t.value for t in study.trials] == pytest.approx(losses + more)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(losses + more))


def test_a_frozen_ddp_process_ends_the_run_with_one_line_after_the_timeout(tmp_path, fashion_mnist):
    import time

    run_dir = tmp_path / "frozen"
    start = time.monotonic()
    proc = run_app(*DDP, "trainer.max_epochs=3", *fault("FreezeAt", step=5), "trainer.strategy.timeout.seconds=10",
                   f"hydra.run.dir={run_dir}",
                   timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert line.startswith("error: rank 0: another process of this DDP run stopped answering for 10 s")
    assert elapsed < 120  # the timeout, not forever
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # saved after epoch 1, intact
    assert ckpt["global_step"] == 4


def test_a_bug_in_the_first_ddp_process_leaves_no_process_behind(tmp_path, fashion_mnist):
    """Rank 1 freezes at step 5 and rank 0 meets a bug there (not a collective's timeout, which is 600 s here): rank
    0's traceback ends the run, and the frozen process it started is stopped with it (left behind, it would hold
    the output open and the run would never be seen to end)."""
    proc = run_app(*DDP, "trainer.max_epochs=3", *fault("FreezeAt", step=5), *fault("BugAt", name="bug", step=5),
                   f"hydra.run.dir={tmp_path / 'bug'}", timeout=200)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "RuntimeError: a bug at step 5" in proc.stderr.splitlines()


def test_the_shipped_wandb_sweep_trains_through_vaelab_train(tmp_path, fashion_mnist):
    """scripts/wandb_sweep.yaml, as `wandb agent` would run one of its runs, offline: every parameter is a Hydra
    override vaelab-train accepts, and the command W&B's agent builds from the config (its own code for the
    arguments, its macro rules for ${env} and ${args_no_hyphens}) trains one ordinary run whose W&B run is the
    agent's (its id, and the chosen values in its config)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import yaml
    from conftest import ROOT, app_env, compose
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    from vaelab.cli.config import validate

    sweep = yaml.safe_load((ROOT / "scripts" / "wandb_sweep.yaml").read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["goal"] in ("minimize", "maximize")
    assert sweep["metric"]["name"] == "val/loss"  # logged every epoch, with W&B's summary at its minimum
    # one run's values, as the sweep server would choose them (the lowest of each), plus a tiny run's fixed ones
    chosen = {k: (v["values"][0] if "values" in v else v["min"]) for k, v in sweep["parameters"].items()}
    fixed = dict(o.split("=", 1) for o in TINY if "progress_bar" not in o)
    overrides = [f"{k}={v}" for k, v in {**chosen, **fixed}.items()]
    validate(compose(*overrides))  # every parameter is a key vaelab-train takes
    run_id = "agentrun1"
    command = {"args": {k: {"value": v} for k, v in {**chosen, **fixed,
                                                      "hydra.run.dir": str(tmp_path / "run")}.items()}}
    sweep_vars = {**create_sweep_command_args(command), "env": ["/usr/bin/env"], "program": [sweep["program"]]}
    argv = []
    for c in create_sweep_command(list(sweep["command"])):  # the agent's own loop (wandb/wandb_agent.py)
        argv += sweep_vars.get(c[2:-1]) or [] if c.startswith("${") and c.endswith("}") else [c]
    assert argv[:2] == ["/usr/bin/env", "vaelab-train"] and "loss.beta=0.5" in argv and "prior=standard" in argv
    env = dict(app_env(), WANDB_RUN_ID=run_id, PATH=os.pathsep.join([str(Path(sys.executable).parent),
                                                                      os.environ.get("PATH", "")]))
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "finished" and results["prior"] == "standard" and results["wandb"]["id"] == run_id
    (run_dir,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}")
    config = wandb_files.config(run_dir)
    assert config["loss"]["beta"] == 0.5 and config["model"]["latent_dim"] == 16
    assert config["optim"]["lr"] == pytest.approx(1e-4)
