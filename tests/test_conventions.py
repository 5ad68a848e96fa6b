"""What Lightning, Hydra and W&B users expect: debug configs, optimiser and schedule groups, gradient clipping,
early stopping, the TensorBoard logger, and the config tree (the W&B side is in test_train_app.py)."""

import csv
import json
import math

import lightning as L
import pytest
import torch
from conftest import TINY, run_app

from vaelab import VAE, ImageDataModule, VAEModule
from vaelab.training.optim import AdamNormGrad


def epochs_of(run_dir, key):
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    return [float(r[key]) for r in rows if r.get(key)]


def test_debug_fdr_runs_one_batch_of_each_stage(tmp_path, fashion_mnist):
    proc = run_app("debug=fdr", "data.subset=400", "eval.importance_samples=4", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["global_step"] == 1 and res["metrics"]["test/nll"] > 0
    assert "fast_dev_run" in proc.stdout + proc.stderr


def test_debug_profiler_and_limit(tmp_path, fashion_mnist):
    proc = run_app("debug=profiler", "data.subset=400", "data.batch_size=50", "eval.importance_samples=4",
                   f"hydra.run.dir={tmp_path / 'p'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FIT Profiler Report" in proc.stdout + proc.stderr
    proc = run_app("debug=limit", "data.subset=4000", "data.batch_size=20", "data.eval_batch_size=100",
                   "eval.importance_samples=4",
                   f"hydra.run.dir={tmp_path / 'l'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "l" / "results.json").read_text())
    assert res["epochs"] == 3 and res["global_step"] == 3 * 2  # 1 % of 200 batches a epoch: 2 steps
    proc = run_app("debug=limit", "data.subset=400", f"hydra.run.dir={tmp_path / 'bad'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: Lightning rejected the run's settings: You requested to check 0.01" in proc.stderr


def test_overfit_batches_are_the_same_batches_every_epoch(fashion_mnist):
    dm = ImageDataModule(root=str(fashion_mnist), subset=600, batch_size=50, seed=3)
    dm.setup("fit")
    for overfit, same in ((3, True), (0.0, False)):
        trainer = L.Trainer(overfit_batches=overfit, logger=False, enable_checkpointing=False, accelerator="cpu")
        dm.trainer = trainer
        first = torch.stack(list(dm.train_dataloader())[:3])
        trainer.fit_loop.epoch_progress.current.completed = 5  # a later epoch
        later = torch.stack(list(dm.train_dataloader())[:3])
        assert torch.equal(first, later) == same


def test_debug_overfit_drives_the_training_loss_down(tmp_path, fashion_mnist):
    proc = run_app("debug=overfit", "logger=csv", "data.subset=400", "data.batch_size=20", "optim.lr=3e-3",
                   "trainer.max_epochs=30", "eval.importance_samples=4", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = epochs_of(tmp_path, "train/loss")
    assert len(train) == 30 and train[-1] < 0.6 * train[0]


def test_optimiser_and_schedule_from_the_command_line(train_in_process):
    run_dir, res = train_in_process("optim=adamw", "scheduler=cosine", "trainer.max_epochs=3", "logger=csv",
                                    "trainer.gradient_clip_val=1.0")
    lrs = epochs_of(run_dir, "train/lr")
    lr0 = 5e-4
    expected = [lr0 * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    assert lrs == pytest.approx(expected, rel=1e-5) and res["status"] == "finished"
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    recipe = saved["hyper_parameters"]["recipe"]  # the run's TrainingRecipe, as plain data
    assert recipe["optimizer"]["_target_"] == "torch.optim.adamw.AdamW" and saved["lr_schedulers"]
    assert recipe["scheduler"]["_target_"] == "torch.optim.lr_scheduler.CosineAnnealingLR" and recipe["scheduler"]["T_max"] == 3
    assert recipe["gradient_clip_val"] == 1.0
    assert saved["optimizer_states"][0]["param_groups"][0]["weight_decay"] == 0.01  # AdamW's, from optim/adamw


def test_any_optimiser_instantiates_from_its_target_and_loads_back(train_in_process):
    """lightning-hydra-template's way: optim/ is a _partial_ _target_, so another torch optimiser and its own
    arguments need no code."""

    run_dir, res = train_in_process("optim._target_=torch.optim.SGD", "+optim.momentum=0.9", "optim.lr=0.01",
                                    "trainer.max_epochs=1", "logger=csv", "loss.free_bits=0.5")
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    group = saved["optimizer_states"][0]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["lr"] == 0.01 and "dampening" in group  # SGD's own state
    assert saved["hyper_parameters"]["recipe"]["loss"] == {"beta": 1.0, "warmup_epochs": 1, "free_bits": 0.5,
                                                           "objective": "elbo", "samples": 1}
    module = VAEModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # still weights-only
    assert isinstance(module.configure_optimizers(), torch.optim.SGD) and module.loss.free_bits == 0.5
    assert res["status"] == "finished"


def test_plateau_halves_the_rate_after_an_epoch_without_a_better_val_loss(train_in_process):
    run_dir, _ = train_in_process("scheduler=plateau", "scheduler.patience=0", "trainer.max_epochs=4", "logger=csv",
                                  "optim.lr=3e-3")
    val, lrs = epochs_of(run_dir, "val/loss"), epochs_of(run_dir, "train/lr")
    expected = [3e-3]
    for e in range(1, 4):  # ReduceLROnPlateau(mode=min, threshold=1e-4 relative): halve unless val/loss improved
        improved = val[e - 1] < min(val[: e - 1], default=math.inf) * (1 - 1e-4)
        expected.append(expected[-1] * (1 if improved else 0.5))
    assert lrs == pytest.approx(expected, rel=1e-5)


def test_early_stopping_stops_after_patience_epochs_without_improvement(train_in_process):
    _, res = train_in_process("callbacks=early_stopping", "callbacks.early_stopping.patience=1",
                              "callbacks.early_stopping.min_delta=1e6", "trainer.max_epochs=6", "logger=csv")
    assert res["epochs"] == 2  # min_delta 1e6: no epoch counts as better; patience 1 stops after the second


def test_gradient_clipping_and_adam_normgrad_do_what_they_say():
    from functools import partial

    from vaelab.data.batches import ExecutionPlan, step_images
    from vaelab.training.engine import StepEngine
    from vaelab.training.objective import Loss

    torch.manual_seed(0)
    vae = VAE((1, 28, 28), latent_dim=4, hidden_dim=16)
    x = torch.rand(1, 8, 1, 28, 28).bernoulli()  # an execution of one step

    def norm_after_a_step(clip_value):
        params = list(vae.parameters())
        clip = partial(torch.nn.utils.clip_grad_norm_, params, clip_value, foreach=True) if clip_value else None
        engine = StepEngine(vae, torch.optim.SGD(params, lr=0.0), Loss(beta=100.0), clip=clip,
                            images=partial(step_images, plan=ExecutionPlan(1)))  # lr 0: the gradients stay
        engine.run(x, 1, 0)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))

    assert norm_after_a_step(None) > 0.5
    assert norm_after_a_step(0.5) == pytest.approx(0.5, rel=1e-4)  # the engine clips between backward and step
    # AdamNormGrad: Adam on each tensor's gradient divided by its norm
    a, b = torch.nn.Parameter(torch.ones(5)), torch.nn.Parameter(torch.ones(5))
    grad = torch.arange(5.0)
    a.grad, b.grad = grad.clone(), grad / (grad.norm() + 1e-7)
    AdamNormGrad([a], lr=0.1).step()
    torch.optim.Adam([b], lr=0.1).step()
    assert torch.allclose(a, b)


def test_tensorboard_logger_writes_curves_and_image_grids(train_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = train_run("logger=tensorboard")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert {"val/loss", "train_step/loss", "test/nll", "train/lr"} <= set(tags["scalars"])
    assert len(events.Scalars("val/loss")) == 2 and "images/samples" in tags["images"]


def test_the_config_tree_is_printed_unless_switched_off(tmp_path, fashion_mnist):
    proc = run_app(*TINY, "trainer.max_epochs=1", "logger=none", "extras.print_config=false",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0 and "├── data" not in proc.stdout
