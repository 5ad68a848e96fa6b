"""Beyond one process: DDP on CPU processes (gloo), the SLURM launcher's job script, the Optuna sweeper."""

import json
import signal

import pytest
import wandb_files
from conftest import TINY, run_app

from vaelab.training.checkpoints import load_checkpoint

DDP = [*TINY, "trainer=ddp_cpu", "trainer.devices=2", "data.subset=400", "data.batch_size=50",
       "trainer.max_epochs=2", "eval.importance_samples=16"]


def test_ddp_on_two_processes_shards_data_and_matches_one_process_on_the_same_weights(tmp_path, fashion_mnist):
    run_dir = tmp_path / "ddp"
    proc = run_app(*DDP, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["global_step"] == 2 * 400 // (2 * 50)  # each process takes half of every epoch
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
    kill = ["+callbacks.kill._target_=fault_callbacks.SignalAt", "+callbacks.kill.step=5",
            f"+callbacks.kill.signum={int(signal.SIGTERM)}",
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


def test_a_frozen_ddp_process_ends_the_run_with_one_line_after_the_timeout(tmp_path, fashion_mnist):
    import time

    run_dir = tmp_path / "frozen"
    start = time.monotonic()
    proc = run_app(*DDP, "trainer.max_epochs=3", "+callbacks.freeze._target_=fault_callbacks.FreezeAt",
                   "+callbacks.freeze.step=5", "trainer.strategy.timeout.seconds=10", f"hydra.run.dir={run_dir}",
                   timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert line.startswith("error: rank 0: another process of this DDP run stopped answering for 10 s")
    assert elapsed < 120  # the timeout, not forever
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # saved after epoch 1, intact
    assert ckpt["global_step"] == 4
