"""VAEModule: the Lightning wrapper every VAE shares. It knows the protocol (models/base.py), not the model.
Training uses manual optimisation: each `training_step` runs `steps_per_execution` optimiser steps through the
step engine (engine.py), eagerly or as one CUDA graph, and everything that counts steps counts optimiser steps.
Validation and test update one bundle of metrics (evaluation/metrics.py), the one vaelab-eval uses, with the
moving average's weights when trainer.ema_rate is set.

Why it is long: it is Lightning's one seam, every hook a run passes through (steps, epochs, validation, test,
the optimiser and the engine, checkpoints), each a few lines that hand over to the file that owns the work."""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor

from vaelab.data.batches import ExecutionPlan, batch_counts, step_images
from vaelab.evaluation.metrics import ElboMeans, EvalMetrics
from vaelab.models.base import VAEBase
from vaelab.pixels import without_data_module
from vaelab.training.checkpoints import load_checkpoint, model_of
from vaelab.training.engine import StepEngine
from vaelab.training.execution import count_optimizer_steps, plan_execution, steps_per_epoch
from vaelab.training.optim import build_optimizer
from vaelab.training.recipe import TrainingRecipe
from vaelab.training.run_state import TrainTime, restore_run_state, save_run_state
from vaelab.training.runner import Solo, clip_through_lightning
from vaelab.training.stabilisers import WeightAverage
from vaelab.training.step_records import StepCurves, StepMeans

log = logging.getLogger("vaelab")


class VAEModule(L.LightningModule):
    """Trains any VAE by a TrainingRecipe (recipe.py: -ELBO with KL warm-up, beta weighting and free bits; the
    optimiser, schedule and clipping; steps per execution; the checks), and tests it with the importance-sampled
    NLL. The app and a script build it alike: VAEModule(model, TrainingRecipe(...)). runner: how it trains and
    evaluates (runner.py: alone, the default; a stacked sweep's launcher hands its members theirs)."""

    def __init__(self, model: VAEBase, recipe: TrainingRecipe | dict | None = None, runner: Solo | None = None) -> None:
        super().__init__()
        self.runner = runner or Solo()
        # a checkpoint keeps the recipe as plain data (weights-only loadable); load_from_checkpoint hands it back so
        recipe = TrainingRecipe.from_spec(recipe) if isinstance(recipe, dict) else recipe or TrainingRecipe()
        # the app logs its whole composed config itself (lightning-hydra-template's way), so Lightning's copy of the
        # recipe goes to the loggers only when there is no run config
        self.save_hyperparameters({"recipe": recipe.spec()}, logger=recipe.config is None)
        self.recipe, self.loss = recipe, recipe.loss
        self.automatic_optimization = False  # the step engine runs the optimiser steps itself
        self.model = model
        # trainer.ema_rate: the weights' moving average, a submodule (in checkpoints); what evaluation uses
        self.average = WeightAverage(model, recipe.ema_rate) if recipe.ema_rate > 0 else None
        self.ema_model = self.average.model if self.average is not None else None
        self.execution_plan: ExecutionPlan | None = None  # resolved with the device, in configure_optimizers
        self.engine: StepEngine | None = None  # built at every fit's start; owns steps per epoch and the NaN rule
        self.restored_metrics: dict[str, float] = {}  # the metrics logged before the checkpoint a fit resumed from
        self.training_finished = False  # set in the checkpoint saved once training has ended (Preemption)
        self.curves = StepCurves()
        self.train_time = TrainTime()  # kept in checkpoints: a resumed run's time goes on from its checkpoint's
        self.train_means = ElboMeans(len(model.latent_dims))
        self.train_means.persistent(True)  # a run resumed mid-epoch keeps the epoch's sums
        self.step_means = StepMeans()  # the epoch's means of per-step statistics (train/grad_norm)
        self.step_means.persistent(True)
        self.val_metrics = EvalMetrics(model.latent_dims, model.num_pixels)
        self.test_metrics = EvalMetrics(model.latent_dims, model.num_pixels, recipe.importance_samples,
                                        recipe.importance_points_per_pass, recipe.importance_seed)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's load_from_checkpoint; the VAE (not a hyperparameter) is rebuilt from the checkpoint's model
        spec unless given as model=..., and the weights are loaded weights-only."""
        ckpt = load_checkpoint(checkpoint_path)
        if "model" not in kwargs:
            kwargs["model"] = model_of(ckpt, checkpoint_path, weights=False)
        if "recipe" not in kwargs:  # the run's own recipe, its config (kept beside it) included
            hp = ckpt.get("hyper_parameters", {})
            recipe = TrainingRecipe.from_spec(hp["recipe"]) if "recipe" in hp else TrainingRecipe.from_flat(hp)
            kwargs["recipe"] = replace(recipe, config=ckpt.get("vaelab_config"))
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, **kwargs)

    @property
    def eval_model(self) -> VAEBase:
        """The weights validation, test and sample grids use: the moving average with trainer.ema_rate, else the
        model's own."""
        return self.ema_model if self.ema_model is not None else self.model

    @property
    def attached(self) -> bool:
        """Whether a Trainer drives this module (Lightning's public `trainer` raises when none does)."""
        try:
            self.trainer  # noqa: B018 - the property's check is the test
        except RuntimeError:
            return False
        return True

    # -- the objective --------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Optimiser steps per training epoch: the engine's count (1 before training)."""
        return self.engine.steps_per_epoch if self.engine is not None else 1

    def beta(self, step: int | Tensor | None = None) -> float | Tensor:
        """KL weight at optimiser step `step` (default: now): the engine's (objective.Loss.weight over its epochs)."""
        return self.loss.beta if self.engine is None else self.engine.weight(self.global_step if step is None else step)

    # -- a training step: the engine runs the optimiser steps, the module counts and logs them ----------
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        steps, images = batch_counts(batch, self.execution_plan)
        size = images // steps
        step0 = self.global_step
        n = steps if self.trainer.max_steps < 0 else min(steps, self.trainer.max_steps - step0)
        stats = self.engine.run(batch, n, step0)
        count_optimizer_steps(self.trainer, n - (self.global_step - step0), n)
        self.train_means.update(stats.recon, stats.kl_layers.T, count=n * size)
        self.step_means.update(stats)
        every_log = self.trainer.log_every_n_steps
        for i in range(n):
            if every_log and (step0 + i + 1) % every_log == 0:  # per-step curves at Lightning's logging interval
                step = step0 + i
                self.curves.add(step, stats.at(i), size, {"train/beta": float(self.beta(step)),
                                                          "epoch": self.current_epoch})
        self.curves.flush(self.loggers)

    # -- NaN and inf: the engine tracks them on the device and checks at intervals; and before anything is saved --
    def raise_if_nonfinite(self) -> None:
        """One sync: a clear sentence if any step had a NaN or infinite loss (the engine's rule); before any save."""
        if self.engine is not None:
            self.engine.raise_if_nonfinite()

    # -- epochs, validation, test ------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """What the images are (vaelab/pixels.py), from vaelab's data module; else what the likelihood models."""
        pixels = getattr(self.trainer.datamodule, "pixels", None) or without_data_module(self.model.likelihood.pixels)
        self.val_metrics.pixels = self.test_metrics.pixels = pixels
        self.train_means.offset = self.val_metrics.means.offset  # train/ figures in the same nats
        self.runner.join(self.trainer)

    def on_fit_start(self) -> None:
        self.train_time.start()
        # Lightning keeps no logged metric in a checkpoint: a resumed fit starts with those logged before its
        # checkpoint, as the uninterrupted run has them (ModelCheckpoint's and EarlyStopping's monitor, after a
        # stop saved between an epoch's validation and its end; results.json after a stop in the test phase)
        metrics = self.trainer.callback_metrics
        for key, value in self.restored_metrics.items():
            metrics.setdefault(key, torch.tensor(value))
        self.restored_metrics = {}

    def on_train_start(self) -> None:
        # a fit resumed mid-epoch skips on_train_epoch_start for that epoch (Lightning's fit loop), and KL warm-up
        # reads steps per epoch at every step: the engine is told at every fit's start, and again each epoch
        self.engine = self._build_engine()
        self.engine.start_epoch(steps_per_epoch(self.trainer, self.execution_plan))

    def on_train_epoch_start(self) -> None:
        self.engine.start_epoch(steps_per_epoch(self.trainer, self.execution_plan))

    def on_validation_start(self) -> None:
        if self.trainer.training or self.trainer.state.fn == "fit":
            self.raise_if_nonfinite()

    def on_train_epoch_end(self) -> None:
        self.raise_if_nonfinite()
        self.curves.flush(self.loggers, wait=True)
        self.log_dict({f"train/{k}": v for k, v in self.train_means.compute_restored().items()})
        self.log_dict({f"train/{k}": v for k, v in self.step_means.compute_restored().items()})
        self.train_means.reset()
        self.step_means.reset()
        if self.global_step > 0:
            self.log("train/beta", float(self.beta(self.global_step - 1)))
        self.log("train/lr", float(self.optimizers().optimizer.param_groups[0]["lr"]))  # this epoch's rate
        schedule = self.lr_schedulers()
        if schedule is not None and not isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            with warnings.catch_warnings():  # an epoch whose every update was skipped (trainer.gradient_skip_threshold)
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
                schedule.step()

    def on_train_end(self) -> None:
        self.curves.flush(self.loggers, wait=True)

    def on_fit_end(self) -> None:
        self.train_time.stop()

    def on_validation_end(self) -> None:
        # Lightning runs the module's hook after every callback's, and sorts ModelCheckpoint last among those: here
        # an epoch's validation, grids and checkpoints are done, the point a stop after its last step is saved at
        from vaelab.training.callbacks.preemption import Preemption

        for callback in self.trainer.callbacks:
            if isinstance(callback, Preemption):
                callback.stop_after_validation(self.trainer, self)

    def validation_step(self, x: Tensor, batch_idx: int) -> None:
        self.runner.evaluate(self.val_metrics, self.eval_model, x)  # stacked: vmapped with the other members

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute("val")
        self.log_dict(metrics)
        self.val_metrics.reset()
        schedule = self.lr_schedulers() if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking else None
        if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            schedule.step(float(metrics["val/loss"]))

    def test_step(self, batch, batch_idx: int) -> None:
        x, index = batch if isinstance(batch, (tuple, list)) else (batch, None)
        self.runner.evaluate(self.test_metrics, self.eval_model, x, index)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute("test"))
        self.test_metrics.reset()

    # -- the optimiser and the engine ------------------------------------------------------------
    def configure_optimizers(self):
        recipe = self.recipe
        if not self.attached:  # outside a Trainer (a plain check of the optimiser): no engine to set up
            return build_optimizer(recipe.optimizer, list(self.model.parameters()))
        datamodule = self.trainer.datamodule
        takes_plans = hasattr(datamodule, "use_execution_plan")  # vaelab's ImageDataModule; a plain loader does not
        plan = plan_execution(self, recipe.cuda_graphs, recipe.steps_per_execution if takes_plans else 1)
        self.execution_plan = plan if takes_plans else None
        if takes_plans:
            datamodule.use_execution_plan(plan)  # its loader cuts executions of this plan
        optimizer = build_optimizer(recipe.optimizer, list(self.model.parameters()),
                                    capturable=plan.indices_on is not None)
        schedule = recipe.scheduler(optimizer) if recipe.scheduler is not None else None
        if schedule is None:
            return optimizer
        # stepped by this module at each epoch's end (plateau on val/loss): manual optimisation takes no monitor key
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch"}}

    def _build_engine(self) -> StepEngine:
        """The step engine, from plain arguments. On one device with no loss scaler, backward and the optimiser are
        called directly, so Lightning's per-step hooks (on_before_backward, on_after_backward,
        on_before_optimizer_step) are not run; otherwise through Lightning (manual_backward, its optimiser wrapper,
        its clipping, which unscales fp16 gradients first), which DDP's gradient all-reduce and fp16's loss
        scaling need, and which counts the step itself."""
        opt, clip_value = self.optimizers(), self.recipe.gradient_clip_val
        plan, gather = self.execution_plan, getattr(self.trainer.datamodule, "train_batch", None)
        direct = self.trainer.world_size == 1 and getattr(self.trainer.strategy.precision_plugin, "scaler", None) is None
        params = list(self.model.parameters())
        if self.average is not None:
            self.average.bind(self.model)  # after the device move and any checkpoint's weights
        if direct:
            optimizer, backward = opt.optimizer, None
            clip = partial(torch.nn.utils.clip_grad_norm_, params, clip_value, foreach=True) if clip_value else None
        else:
            optimizer, backward = opt, self.manual_backward
            clip = partial(clip_through_lightning, self, opt, params, clip_value)
        args = dict(model=self.model, optimizer=optimizer, loss=self.loss, backward=backward,
                    images=partial(step_images, plan=plan, gather=gather), clip=clip,
                    check_every=self.recipe.check_finite_every_n_steps, average=self.average,
                    skip_above=self.recipe.gradient_skip_threshold)
        batch_size = getattr(self.trainer.datamodule, "batch_size", None)
        return self.runner.engine(args, plan, batch_size, self.trainer.max_epochs, clip_value)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_run_state(self, checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a checkpoint saved before the per-step statistics' epoch means (train/grad_norm) loads with empty sums
        state = checkpoint.setdefault("state_dict", {})
        for key, value in self.step_means.state_dict(prefix="step_means.").items():
            state.setdefault(key, value)
        if self.attached:  # resumed by a fit; loaded as a model (load_from_checkpoint): nothing to restore
            restore_run_state(self, checkpoint)
