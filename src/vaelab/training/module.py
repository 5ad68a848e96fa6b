"""VAEModule: the Lightning wrapper every VAE shares. It knows the protocol (models/base.py), not the model.
Training uses manual optimisation: each `training_step` runs `steps_per_execution` optimiser steps through the
step engine (engine.py), eagerly or as one CUDA graph, and everything that counts steps counts optimiser steps.
Validation and test update one bundle of metrics (evaluation/metrics.py), the one vaelab-eval uses."""

from __future__ import annotations

import logging
from dataclasses import asdict
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import Tensor

from vaelab.checks import Arg, check_args, non_negative, one_of, positive
from vaelab.data.batches import ExecutionPlan, batch_counts, step_images
from vaelab.evaluation.metrics import IMPORTANCE_ARGS, ElboMeans, EvalMetrics
from vaelab.models.base import VAEBase
from vaelab.training.checkpoints import load_model
from vaelab.training.engine import CudaGraphEngine, StepEngine
from vaelab.training.execution import plan_execution
from vaelab.training.objective import Loss
from vaelab.training.optim import Factory, as_spec, build_optimizer, optimizer_factory, scheduler_factory
from vaelab.training.stack_member import StackedEngine, current_member, update_metrics
from vaelab.training.step_records import StepCurves

log = logging.getLogger("vaelab")


class VAEModule(L.LightningModule):
    """Trains any VAE on -ELBO = recon + KL with linear KL warm-up, beta weighting and free bits; tests it
    with the importance-sampled NLL.

    loss: the objective (objective.Loss: beta, warmup_epochs, free_bits), or given flat as beta (the KL weight
        after warm-up; 1 gives the true ELBO), warmup_epochs (beta rises linearly from 0 over this many epochs; 0:
        no warm-up) and free_bits (a floor, in nats, on each stochastic layer's batch-mean KL; 0: off).
    importance_samples: K for test/nll.
    steps_per_execution: optimiser steps per Lightning step (each on its own batch), or "auto" (engine.AUTO_STEPS).
    cuda_graphs: "auto" (capture the whole step as a CUDA graph when training on one CUDA device and it can
        be captured; else eager, saying why), True (the same, but refuse to start when it cannot), False.
    optimizer: a factory called with the parameters (a torch.optim class or a functools.partial of one, as
        conf/optim/ instantiates it), or a name, adam | adamw | adam_normgrad, with lr, weight_decay and fused (the
        fused kernel where the parameters' device has one).
    scheduler: a factory called with the optimiser (conf/scheduler/), or a name, none | cosine | plateau |
        exponential, with scheduler_options; stepped once per epoch (plateau: on val/loss), the rate logged as
        train/lr.
    gradient_clip_val: clip the gradients' global L2 norm to this before each optimiser step (None: off). Under
        manual optimisation Lightning's Trainer(gradient_clip_val) is not allowed; vaelab clips itself.
    """

    ARGS: dict[str, Arg] = {  # named by their config keys: conf/train.yaml's optim, eval; conf/loss, conf/trainer
        "lr": positive("optim.lr"),
        "weight_decay": non_negative("optim.weight_decay"),
        "fused": one_of("optim.fused", True, False),
        **Loss.ARGS,
        "importance_samples": IMPORTANCE_ARGS["importance_samples"],
        "importance_points_per_pass": IMPORTANCE_ARGS["points_per_pass"],
        "check_finite_every_n_steps": Arg("eval.check_finite_every_n_steps", "int", 1, nullable=True),
        "importance_seed": Arg("eval.importance_seed", "int", 0),
        "steps_per_execution": Arg("trainer.steps_per_execution", "int", 1, auto=True),
        "cuda_graphs": one_of("cuda_graphs", "auto", True, False),
        "gradient_clip_val": positive("trainer.gradient_clip_val", nullable=True),
    }

    def __init__(
        self,
        model: VAEBase,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        beta: float = 1.0,
        warmup_epochs: float = 0.0,
        free_bits: float = 0.0,
        importance_samples: int = 1000,
        importance_points_per_pass: int | str = "auto",
        check_finite_every_n_steps: int | None = None,
        importance_seed: int = 0,
        fused: bool = True,
        steps_per_execution: int | str = 1,
        cuda_graphs: bool | str = "auto",
        gradient_clip_val: float | None = None,
        optimizer: str | dict | Factory = "adam",
        scheduler: str | dict | Factory | None = "none",
        scheduler_options: dict | None = None,
        loss: Loss | dict | None = None,
        run_config: dict | None = None,
    ) -> None:
        check_args(self.ARGS, locals())
        super().__init__()
        # the objects the app instantiates (conf/optim, conf/scheduler, conf/loss) are kept as plain data, so that a
        # checkpoint stays weights-only loadable; given by name, the flat arguments (lr, beta, ...) describe them
        factories = {"optimizer": optimizer, "scheduler": scheduler, "loss": loss}
        ignore = ["model", "run_config", *(k for k, v in factories.items() if not isinstance(v, str | None))]
        ignore += ["lr", "weight_decay", "fused"] if not isinstance(optimizer, str) else []
        ignore += ["scheduler_options"] if not isinstance(scheduler, str | None) else []
        ignore += ["beta", "warmup_epochs", "free_bits"] if loss is not None else []
        # the app logs its whole composed config itself (lightning-hydra-template's way), so Lightning's flat copy of
        # these arguments goes to the loggers only when there is no run config
        self.save_hyperparameters(ignore=ignore, logger=run_config is None)
        self.loss = loss if isinstance(loss, Loss) else Loss(**(loss or {"beta": beta, "warmup_epochs": warmup_epochs,
                                                                           "free_bits": free_bits}))
        self.optimizer_factory = optimizer_factory(optimizer, lr, weight_decay, fused)
        self.scheduler_factory = scheduler  # resolved with the trainer's max_epochs in configure_optimizers
        if not isinstance(optimizer, str):
            self.hparams["optimizer"] = as_spec(self.optimizer_factory)
        if not isinstance(scheduler, str | None):
            self.hparams["scheduler"] = as_spec(scheduler_factory(scheduler))
        if loss is not None:
            self.hparams["loss"] = asdict(self.loss)
        self.automatic_optimization = False  # the step engine runs the optimiser steps itself
        self.model = model
        self.run_config = run_config
        self.execution_plan: ExecutionPlan | None = None  # resolved with the device, in configure_optimizers
        self.engine: StepEngine | None = None
        self.steps_per_epoch = 1  # optimiser steps per training epoch, set at every fit's and epoch's start
        self.restored_metrics: dict[str, float] = {}  # the metrics logged before the checkpoint a fit resumed from
        self.training_finished = False  # set in the checkpoint saved once training has ended (Preemption)
        layers = len(model.latent_dims)
        self.curves = StepCurves()
        self.train_means = ElboMeans(layers)
        self.train_means.persistent(True)  # a run resumed mid-epoch keeps the epoch's sums
        self.val_metrics = EvalMetrics(model.latent_dims, model.num_pixels)
        self.test_metrics = EvalMetrics(model.latent_dims, model.num_pixels, importance_samples,
                                        importance_points_per_pass, importance_seed)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path, map_location=None, hparams_file=None, strict=None, **kwargs):
        """Lightning's load_from_checkpoint; the VAE (not a hyperparameter) is rebuilt from the checkpoint's model
        spec unless given as model=..., and the weights are loaded weights-only."""
        if "model" not in kwargs:
            kwargs["model"] = load_model(checkpoint_path, weights=False)
        kwargs.setdefault("weights_only", True)
        return super().load_from_checkpoint(checkpoint_path, map_location=map_location, hparams_file=hparams_file,
                                            strict=strict, **kwargs)

    # -- the objective --------------------------------------------------------------------------
    def beta(self, step: int | Tensor | None = None) -> float | Tensor:
        """KL weight at optimiser step `step` (default: now): the loss's warm-up (objective.Loss.weight)."""
        if self._trainer is None:
            return self.loss.beta
        return self.loss.weight(self.global_step if step is None else step, self.steps_per_epoch)

    # -- a training step: the engine runs the optimiser steps, the module counts and logs them ----------
    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        steps, images = batch_counts(batch, self.execution_plan)
        size = images // steps
        step0 = self.global_step
        n = steps if self.trainer.max_steps < 0 else min(steps, self.trainer.max_steps - step0)
        stats = self.engine.run(batch, n, step0)
        self._count_steps(n - (self.global_step - step0))
        # Lightning advances its loggers' step by one per training_step; make it count optimiser steps
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += n - 1
        self.train_means.update(stats.recon, stats.kl_layers.T, count=n * size)
        every_log = self.trainer.log_every_n_steps
        for i in range(n):
            if every_log and (step0 + i + 1) % every_log == 0:  # per-step curves at Lightning's logging interval
                step = step0 + i
                self.curves.add(step, stats.at(i), size, {"train/beta": float(self.beta(step)),
                                                          "epoch": self.current_epoch})
        self.curves.flush(self.loggers)

    def _count_steps(self, n: int) -> None:
        """Count n optimiser steps that ran outside Lightning's optimizer.step (a replayed graph, or direct
        steps), so that global_step, max_steps, checkpoints and resume count optimiser steps."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        for _ in range(n):
            progress.increment_ready()
            progress.increment_completed()

    # -- NaN and inf: tracked on the device, checked at intervals and before anything is saved ----
    @property
    def check_every(self) -> int:
        """Steps between host-device syncs for the NaN check: every step on CPU (free there), every 50 on
        an accelerator unless eval.check_finite_every_n_steps says otherwise."""
        every = self.hparams.check_finite_every_n_steps
        return every if every is not None else (1 if self.device.type == "cpu" else 50)

    def raise_if_nonfinite(self) -> None:
        """One sync: stop with a clear sentence if any step so far had a NaN or infinite loss. Runs at
        intervals and before anything is saved (validation, preemption)."""
        if self.engine is not None:
            self.engine.nonfinite.raise_if_any()

    # -- epochs, validation, test ------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # Lightning keeps no logged metric in a checkpoint: a resumed fit starts with those logged before its
        # checkpoint, as the uninterrupted run has them (ModelCheckpoint's and EarlyStopping's monitor, after a
        # stop saved between an epoch's validation and its end; results.json after a stop in the test phase)
        metrics = self.trainer.callback_metrics
        for key, value in self.restored_metrics.items():
            metrics.setdefault(key, torch.tensor(value))
        self.restored_metrics = {}

    def on_train_start(self) -> None:
        # a fit resumed mid-epoch skips on_train_epoch_start for that epoch (Lightning's fit loop), and KL warm-up
        # reads steps_per_epoch at every step: it is counted here, at every fit's start, and again each epoch
        self.engine = self._build_engine()
        self._set_steps_per_epoch()

    def on_train_epoch_start(self) -> None:
        self._set_steps_per_epoch()

    def _set_steps_per_epoch(self) -> None:
        self.steps_per_epoch = self.engine.steps_per_epoch = self._count_steps_per_epoch()

    def _count_steps_per_epoch(self) -> int:
        """Optimiser steps in a training epoch, after the trainer's limits."""
        loader = self.trainer.train_dataloader
        executions = self.trainer.num_training_batches  # Lightning's count: executions (after limits)
        batches = getattr(loader, "num_batches", None)
        if batches is None:  # a plain loader: one step per batch
            return max(1, executions)
        limited = executions < len(loader)
        return max(1, executions * self.execution_plan.steps if limited else batches)

    def on_validation_start(self) -> None:
        if self.trainer.training or self.trainer.state.fn == "fit":
            self.raise_if_nonfinite()

    def on_train_epoch_end(self) -> None:
        self.raise_if_nonfinite()
        self.curves.flush(self.loggers, wait=True)
        self.log_dict({f"train/{k}": v for k, v in self.train_means.compute().items()})
        self.train_means.reset()
        if self.global_step > 0:
            self.log("train/beta", float(self.beta(self.global_step - 1)))
        self.log("train/lr", float(self.optimizers().optimizer.param_groups[0]["lr"]))  # this epoch's rate
        schedule = self.lr_schedulers()
        if schedule is not None and not isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            schedule.step()

    def on_train_end(self) -> None:
        self.curves.flush(self.loggers, wait=True)

    def leave_stack(self) -> None:
        """A member of a stacked sweep leaves its stack when its training ends, however it ends (fit.py calls it)."""
        if isinstance(self.engine, StackedEngine):
            self.engine.detach()

    def on_validation_end(self) -> None:
        # Lightning runs the module's hook after every callback's, and sorts ModelCheckpoint last among those: here
        # an epoch's validation, grids and checkpoints are done, the point a stop after its last step is saved at
        from vaelab.training.callbacks.preemption import Preemption

        for callback in self.trainer.callbacks:
            if isinstance(callback, Preemption):
                callback.stop_after_validation(self.trainer, self)

    def validation_step(self, x: Tensor, batch_idx: int) -> None:
        update_metrics(self.val_metrics, self.model, x)  # in a stacked sweep: vmapped with the other members

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute("val")
        self.log_dict(metrics)
        self.val_metrics.reset()
        schedule = self.lr_schedulers() if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking else None
        if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            schedule.step(float(metrics["val/loss"]))

    def test_step(self, batch, batch_idx: int) -> None:
        x, index = batch if isinstance(batch, (tuple, list)) else (batch, None)
        update_metrics(self.test_metrics, self.model, x, index)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute("test"))
        self.test_metrics.reset()

    # -- the optimiser and the engine ------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        if self._trainer is None:  # outside a Trainer (a plain check of the optimiser): no engine to set up
            return build_optimizer(self.optimizer_factory, list(self.parameters()))
        datamodule = self.trainer.datamodule
        takes_plans = hasattr(datamodule, "use_execution_plan")  # vaelab's ImageDataModule; a plain loader does not
        plan = plan_execution(self, hp.cuda_graphs, hp.steps_per_execution if takes_plans else 1)
        self.execution_plan = plan if takes_plans else None
        if takes_plans:
            datamodule.use_execution_plan(plan)  # its loader cuts executions of this plan
        optimizer = build_optimizer(self.optimizer_factory, list(self.parameters()),
                                    capturable=plan.indices_on is not None)
        factory = scheduler_factory(self.scheduler_factory, hp.get("scheduler_options"), self.trainer.max_epochs)
        schedule = factory(optimizer) if factory is not None else None
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
        opt, clip_value = self.optimizers(), self.hparams.gradient_clip_val
        plan, gather = self.execution_plan, getattr(self.trainer.datamodule, "train_batch", None)
        direct = self.trainer.world_size == 1 and getattr(self.trainer.strategy.precision_plugin, "scaler", None) is None
        if direct:
            optimizer, backward = opt.optimizer, None
            clip = partial(torch.nn.utils.clip_grad_norm_, list(self.parameters()), clip_value, foreach=True)
        else:
            optimizer, backward = opt, self.manual_backward
            clip = partial(self.clip_gradients, opt, gradient_clip_val=clip_value, gradient_clip_algorithm="norm")
        args = dict(model=self.model, optimizer=optimizer, loss=self.loss, backward=backward,
                    images=partial(step_images, plan=plan, gather=gather), clip=clip if clip_value else None,
                    check_every=self.check_every)
        member = current_member()
        if member is not None:  # a member of a stacked sweep: its group runs the steps, stacked with the others'
            engine = StackedEngine(**args, member=member, max_grad_norm=clip_value)
            engine.attach(plan.steps if plan is not None else 1, self.trainer.datamodule.batch_size,
                          self.trainer.max_epochs)
            return engine
        if plan is not None and plan.indices_on is not None:
            return CudaGraphEngine(**args, shape=(plan.steps, self.trainer.datamodule.batch_size),
                                   on_fallback=lambda why: log.warning("cuda graphs: %s; training continues eagerly", why))
        return StepEngine(**args)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:  # the run's whole config: vaelab-eval and -sample rebuild its data too
            checkpoint["vaelab_config"] = self.run_config
        spec = self.model.spec()
        if spec is not None:  # the model as plain data: load_model and load_from_checkpoint rebuild it
            checkpoint["vaelab_model"] = spec
        if self._trainer is not None:  # what was logged so far: a resumed run reports it for epochs it did not redo
            checkpoint["vaelab_metrics"] = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                                            if isinstance(v, (int, float, Tensor)) and torch.as_tensor(v).numel() == 1}
            if self.training_finished:  # training ended (max_epochs, max_steps or early stopping) at these limits
                checkpoint["vaelab_training_finished"] = {"max_epochs": self.trainer.max_epochs,
                                                          "max_steps": self.trainer.max_steps}
        # the generators behind reparameterisation noise: a resumed run draws what an unbroken one would
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if self.device.type == "cuda":
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is None:  # loaded as a model (load_from_checkpoint), not resumed: leave the RNG alone
            return
        self.restored_metrics = dict(checkpoint.get("vaelab_metrics", {}))
        limits = checkpoint.get("vaelab_training_finished")
        if limits == {"max_epochs": self.trainer.max_epochs, "max_steps": self.trainer.max_steps}:
            # training had ended under these limits (early stopping too, whose stop flag no checkpoint keeps): the
            # resumed fit trains nothing and the run goes on to its test phase
            self.trainer.should_stop = True
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
        if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state(checkpoint["cuda_rng_state"])
