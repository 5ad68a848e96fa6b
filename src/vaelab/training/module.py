"""VAEModule: the Lightning wrapper every VAE shares. It knows the protocol (models/base.py), not the model.
Training uses manual optimisation: each `training_step` runs `steps_per_execution` optimiser steps through the
step engine (engine.py), eagerly or as one CUDA graph, and everything that counts steps counts optimiser steps.
Validation and test update one bundle of metrics (evaluation/metrics.py), the one vaelab-eval uses."""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning as L
import torch
from torch import Tensor

from vaelab.checks import Arg, check_args, non_negative, one_of, positive
from vaelab.evaluation.metrics import IMPORTANCE_ARGS, ElboMeans, EvalMetrics
from vaelab.models.base import ElboTerms, VAEBase
from vaelab.training.checkpoints import load_model
from vaelab.training.engine import CudaGraphEngine, EagerEngine, ExecutionPlan, batch_counts
from vaelab.training.execution import plan_execution
from vaelab.training.optim import OPTIMIZER, SCHEDULER, build_optimizer, build_scheduler
from vaelab.training.tracking import NonFiniteTracker, StepCurves

log = logging.getLogger("vaelab")


class VAEModule(L.LightningModule):
    """Trains any VAE on -ELBO = recon + KL with linear KL warm-up, beta weighting and free bits; tests it
    with the importance-sampled NLL.

    beta: weight of the KL term after warm-up (1 gives the true ELBO).
    warmup_epochs: beta rises linearly from 0 over this many epochs (0: no warm-up).
    free_bits: floor, in nats, on the batch-mean KL of each stochastic layer (0: off).
    importance_samples: K for test/nll.
    fused: use Adam's fused kernel where the parameters' device supports it (CPU and CUDA): one kernel for
        all parameters instead of a handful of ops per tensor.
    steps_per_execution: optimiser steps per Lightning step (each on its own batch), or "auto" (engine.AUTO_STEPS).
    cuda_graphs: "auto" (capture the whole step as a CUDA graph when training on one CUDA device and it can
        be captured; else eager, saying why), True (the same, but refuse to start when it cannot), False.
    optimizer: adam | adamw | adam_normgrad (training/optim.py), with lr, weight_decay and fused.
    scheduler: none | cosine | plateau | exponential, stepped once per epoch (plateau: on val/loss), with its
        scheduler_options (conf/scheduler/); the learning rate is logged as train/lr.
    gradient_clip_val: clip the gradients' global L2 norm to this before each optimiser step (None: off). Under
        manual optimisation Lightning's Trainer(gradient_clip_val) is not allowed; vaelab clips itself.
    """

    ARGS: dict[str, Arg] = {  # named by their config keys: conf/train.yaml's optim, eval; conf/loss, conf/trainer
        "lr": positive("optim.lr"),
        "weight_decay": non_negative("optim.weight_decay"),
        "fused": one_of("optim.fused", True, False),
        "beta": non_negative("loss.beta"),
        "warmup_epochs": non_negative("loss.warmup_epochs"),
        "free_bits": non_negative("loss.free_bits"),
        "importance_samples": IMPORTANCE_ARGS["importance_samples"],
        "importance_points_per_pass": IMPORTANCE_ARGS["points_per_pass"],
        "check_finite_every_n_steps": Arg("eval.check_finite_every_n_steps", "int", 1, nullable=True),
        "importance_seed": Arg("eval.importance_seed", "int", 0),
        "steps_per_execution": Arg("trainer.steps_per_execution", "int", 1, auto=True),
        "cuda_graphs": one_of("cuda_graphs", "auto", True, False),
        "gradient_clip_val": positive("trainer.gradient_clip_val", nullable=True),
        "optimizer": OPTIMIZER,
        "scheduler": SCHEDULER,
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
        optimizer: str = "adam",
        scheduler: str = "none",
        scheduler_options: dict | None = None,
        run_config: dict | None = None,
    ) -> None:
        check_args(self.ARGS, locals())
        super().__init__()
        # the app logs its whole composed config itself (lightning-hydra-template's way), so Lightning's flat copy of
        # these arguments goes to the loggers only when there is no run config
        self.save_hyperparameters(ignore=["model", "run_config"], logger=run_config is None)
        self.automatic_optimization = False  # the step engine runs the optimiser steps itself
        self.model = model
        self.run_config = run_config
        self.execution_plan = ExecutionPlan()  # resolved with the device, in configure_optimizers
        self.engine: EagerEngine | None = None
        self.steps_per_epoch = 1  # optimiser steps per training epoch, set at each epoch's start
        self._direct = False
        layers = len(model.latent_dims)
        self.nonfinite = NonFiniteTracker(layers, epoch_of=self._epoch_of_step)
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
        """KL weight at optimiser step `step` (default: now): linear warm-up from 0 to loss.beta over
        warmup_epochs (fractional epochs). A tensor step (inside a CUDA graph) gives a tensor."""
        b, warm = self.hparams.beta, self.hparams.warmup_epochs
        if warm <= 0 or self._trainer is None:
            return b
        step = self.global_step if step is None else step
        progress = step / self.steps_per_epoch / warm
        return b * progress.clamp(max=1.0) if isinstance(progress, Tensor) else b * min(1.0, progress)

    def objective(self, terms: ElboTerms, beta: float | Tensor) -> Tensor:
        """What training minimises: recon + beta * sum_l max(free_bits, KL_l), batch means. With beta=1 and
        no free bits it is -ELBO; free bits (Kingma et al. 2016) remove the pressure on a layer's KL below
        free_bits nats, against posterior collapse."""
        kl_layers = terms.kl_layers.mean(1)  # [L]
        if self.hparams.free_bits > 0:
            kl_layers = kl_layers.clamp(min=self.hparams.free_bits)
        return terms.recon.mean() + beta * kl_layers.sum()

    # -- the step engine's side of a training step ----------------------------------------------
    def images(self, batch: Tensor, i: int) -> Tensor:
        """Sub-batch i of an execution as float images: cut (and binarised) on the device from indices, or
        taken from the images the loader cut."""
        if batch.dtype == torch.long:  # [n, B] image indices (CUDA graphs): the data module gathers on the device
            return self.trainer.datamodule.train_batch(batch[i])
        return batch[i] if batch.dim() == 5 else batch

    def check_step(self, objective: Tensor, terms: ElboTerms, step: int) -> None:
        """With a check every step (CPU, where reading a scalar costs no sync): stop before a non-finite
        objective reaches the weights."""
        if self.check_every == 1 and not math.isfinite(objective.item()):
            rows = torch.cat([terms.recon.detach().sum(0, keepdim=True), terms.kl_layers.detach().sum(1)])[None]
            self.nonfinite.track(rows, step)
            self.nonfinite.raise_if_any()

    def optimizer_step_now(self, objective: Tensor) -> None:
        """zero_grad, backward, step. On one device with no loss scaler, backward and the optimiser are called
        directly, so Lightning's per-step hooks (on_before_backward, on_after_backward, on_before_optimizer_step)
        are not run; otherwise through Lightning, which DDP's gradient all-reduce and fp16's loss scaling need,
        and which counts the step itself."""
        opt = self.optimizers()
        clip = self.hparams.gradient_clip_val
        if self._direct:
            opt.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            self.clip_now()
            opt.optimizer.step()
        else:
            opt.zero_grad(set_to_none=True)
            self.manual_backward(objective)
            if clip:  # through Lightning, which unscales fp16 gradients first
                self.clip_gradients(opt, gradient_clip_val=clip, gradient_clip_algorithm="norm")
            opt.step()

    def clip_now(self) -> None:
        """Clip the gradients' global norm to trainer.gradient_clip_val (no host sync: capturable too)."""
        if self.hparams.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(self.parameters(), self.hparams.gradient_clip_val, foreach=True)

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        steps, images = batch_counts(batch, self)
        size = images // steps
        step0 = self.global_step
        n = steps if self.trainer.max_steps < 0 else min(steps, self.trainer.max_steps - step0)
        stats = self.engine.run(batch, n, step0)  # [n, L + 2]
        self._count_steps(n - (self.global_step - step0))
        # Lightning advances its loggers' step by one per training_step; make it count optimiser steps
        self.trainer.fit_loop.epoch_loop._batches_that_stepped += n - 1
        layers = len(self.model.latent_dims)
        self.train_means.update(stats[:, 0], stats[:, 1 : 1 + layers].T, count=n * size)
        every = self.check_every
        if every != 1:
            self.nonfinite.track(stats, step0)
            if every and step0 // every != (step0 + n) // every:
                self.nonfinite.check()
        every_log = self.trainer.log_every_n_steps
        for i in range(n):
            if every_log and (step0 + i + 1) % every_log == 0:  # per-step curves at Lightning's logging interval
                step = step0 + i
                self.curves.add(step, stats[i], size, {"train/beta": float(self.beta(step)),
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
        self.nonfinite.raise_if_any()

    def _epoch_of_step(self, step: int) -> int:
        return step // self.steps_per_epoch if self._trainer is not None else self.current_epoch

    # -- epochs, validation, test ------------------------------------------------------------------
    def on_train_start(self) -> None:
        # a fit resumed mid-epoch skips on_train_epoch_start for that epoch (Lightning's fit loop), and KL warm-up
        # reads steps_per_epoch at every step: it is counted here, at every fit's start, and again each epoch
        self.steps_per_epoch = self._count_steps_per_epoch()

    def on_train_epoch_start(self) -> None:
        self.steps_per_epoch = self._count_steps_per_epoch()

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

    def validation_step(self, x: Tensor, batch_idx: int) -> None:
        self.val_metrics.update(self.model, x)

    def on_validation_epoch_end(self) -> None:
        metrics = self.val_metrics.compute("val")
        self.log_dict(metrics)
        self.val_metrics.reset()
        schedule = self.lr_schedulers() if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking else None
        if isinstance(schedule, torch.optim.lr_scheduler.ReduceLROnPlateau):
            schedule.step(float(metrics["val/loss"]))

    def test_step(self, batch, batch_idx: int) -> None:
        x, index = batch if isinstance(batch, (tuple, list)) else (batch, None)
        self.test_metrics.update(self.model, x, index)

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute("test"))
        self.test_metrics.reset()

    # -- the optimiser and the engine ------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        if self._trainer is None:  # outside a Trainer (a plain check of the optimiser): no engine to set up
            return build_optimizer(hp.optimizer, list(self.parameters()), hp.lr, hp.weight_decay, hp.fused)
        self.execution_plan = plan_execution(self, hp.cuda_graphs, hp.steps_per_execution)
        graphs = self.execution_plan.indices_on is not None
        strategy = self.trainer.strategy
        self._direct = (self.trainer.world_size == 1 and getattr(strategy.precision_plugin, "scaler", None) is None)
        optimizer = build_optimizer(hp.optimizer, list(self.parameters()), hp.lr, hp.weight_decay, hp.fused,
                                    capturable=graphs)
        if graphs:
            shape = (self.execution_plan.steps, self.trainer.datamodule.batch_size)
            self.engine = CudaGraphEngine(self, optimizer, shape, self._graphs_failed)
        else:
            self.engine = EagerEngine(self)
        schedule = build_scheduler(optimizer, hp.scheduler, self.trainer.max_epochs, **(hp.scheduler_options or {}))
        if schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "epoch",
                                                         "monitor": "val/loss"}}

    def _graphs_failed(self, reason: str) -> None:
        log.warning("cuda graphs: %s; training continues eagerly", reason)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:  # the run's whole config: vaelab-eval and -sample rebuild its data too
            checkpoint["vaelab_config"] = self.run_config
        spec = self.model.spec()
        if spec is not None:  # the model as plain data: load_model and load_from_checkpoint rebuild it
            checkpoint["vaelab_model"] = spec
        # the generators behind reparameterisation noise: a resumed run draws what an unbroken one would
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if self.device.type == "cuda":
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("epoch_means.train_.")]:  # vaelab <= 0.1's name for them
            state["train_means." + key[len("epoch_means.train_."):]] = state.pop(key)
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        manual = loops.get("epoch_loop.manual_optimization.optim_step_progress")
        automatic = loops.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
        if manual is not None and automatic and manual["total"]["completed"] == 0 < automatic["total"]["completed"]:
            # written before training moved to manual optimisation: its optimiser steps were counted there
            loops["epoch_loop.manual_optimization.optim_step_progress"] = automatic
        if self._trainer is None:  # loaded as a model (load_from_checkpoint), not resumed: leave the RNG alone
            return
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
        if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state(checkpoint["cuda_rng_state"])
