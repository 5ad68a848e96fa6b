"""VAEModule: the Lightning wrapper every VAE shares. It knows the protocol (models/base.py), not the model.
Training uses manual optimisation: each `training_step` runs `steps_per_execution` optimiser steps through the
step engine (engine.py), eagerly or as one CUDA graph, and everything that counts steps counts optimiser steps."""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from vaelab.engine import CudaGraphEngine, EagerEngine, ExecutionPlan, batch_counts
from vaelab.errors import ConfigError, NonFiniteLossError
from vaelab.metrics import ActiveUnits, ElboMeans, ImportanceSampledNLL, bits_per_dim, importance_log_weights
from vaelab.models.base import ElboTerms, VAEBase

log = logging.getLogger("vaelab")

# trainer.steps_per_execution=auto, by device and engine, as measured by scripts/benchmarks/train_throughput.py
# (README, Speed). CPU: 10 steps spread Lightning's ~1 ms a step over ten (vanilla: 0.86 -> 1.00 of the bare
# loop). H200, CUDA graph: 1 / 10 / 20 steps a replay gave 0.47 / 0.95 / 0.94 of the graph ceiling. H200, eager:
# 10 steps gave 1.27x the images/s of 1.
AUTO_STEPS = {"cpu": 10, "cuda": 10, "cuda_graph": 10}

KL_DESCRIPTION = {
    True: "closed-form KL(q(z|x) || p(z))",
    False: "Monte Carlo KL estimate log q(z|x) - log p(z) at z ~ q(z|x) (no closed form for this prior)",
}


class VAEModule(L.LightningModule):
    """Trains any VAE on -ELBO = recon + KL with linear KL warm-up, beta weighting and free bits; tests it
    with the importance-sampled NLL.

    beta: weight of the KL term after warm-up (1 gives the true ELBO).
    warmup_epochs: beta rises linearly from 0 over this many epochs (0: no warm-up).
    free_bits: floor, in nats, on the batch-mean KL of each stochastic layer (0: off).
    importance_samples: K for test/nll.
    fused: use Adam's fused kernel where the parameters' device supports it (CPU and CUDA): one kernel for
        all parameters instead of a handful of ops per tensor.
    steps_per_execution: optimiser steps per Lightning step (each on its own batch), or "auto" (AUTO_STEPS).
    cuda_graphs: "auto" (capture the whole step as a CUDA graph when training on one CUDA device and it can
        be captured; else eager, saying why), True (the same, but refuse to start when it cannot), False.
    """

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
        run_config: dict | None = None,
    ) -> None:
        super().__init__()
        if not lr > 0:
            raise ConfigError(f"optim.lr must be positive, got {lr} (conf/train.yaml)")
        if beta < 0:
            raise ConfigError(f"loss.beta must be >= 0, got {beta} (conf/loss/)")
        if warmup_epochs < 0:
            raise ConfigError(f"loss.warmup_epochs must be >= 0 (0 turns warm-up off), got {warmup_epochs}")
        if free_bits < 0:
            raise ConfigError(f"loss.free_bits must be >= 0 nats (0 turns it off), got {free_bits}")
        if isinstance(importance_samples, bool) or not isinstance(importance_samples, int) or importance_samples <= 0:
            raise ConfigError(
                f"eval.importance_samples must be a positive integer (K for test/nll, e.g. 1000), "
                f"got {importance_samples!r}"
            )
        if steps_per_execution != "auto" and (isinstance(steps_per_execution, bool)
                                              or not isinstance(steps_per_execution, int) or steps_per_execution < 1):
            raise ConfigError(f"trainer.steps_per_execution must be auto or a positive integer, got {steps_per_execution!r}")
        if cuda_graphs not in ("auto", True, False):
            raise ConfigError(f"cuda_graphs must be one of auto, true, false, got {cuda_graphs!r}")
        self.save_hyperparameters(ignore=["model", "run_config"])
        self.automatic_optimization = False  # the step engine runs the optimiser steps itself
        self.model = model
        self.run_config = run_config
        self.execution_plan = ExecutionPlan()  # resolved with the device, in configure_optimizers
        self.engine: EagerEngine | None = None
        self.steps_per_epoch = 1  # optimiser steps per training epoch, set at each epoch's start
        self._first_bad: Tensor | None = None
        self._finite_probe: tuple[Tensor, Any] | None = None
        self._pending_curves: list[tuple[int, Tensor, Any, int]] = []
        self._direct = False
        self.num_dims = math.prod(model.image_shape)
        self.test_nll = ImportanceSampledNLL()
        layers = len(model.latent_dims)
        self.epoch_means = nn.ModuleDict({f"{s}_": ElboMeans(layers) for s in ("train", "val", "test")})
        self.epoch_means["train_"].persistent(True)  # a run resumed mid-epoch keeps the epoch's sums
        self.val_active = nn.ModuleList(ActiveUnits(d) for d in model.latent_dims)
        self.test_active = nn.ModuleList(ActiveUnits(d) for d in model.latent_dims)

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

    def _log_epoch_means(self, stage: str) -> None:
        """Log the epoch's means of -ELBO's terms as {stage}/loss, /elbo, /recon, /kl (and /kl_l per layer)."""
        metric = self.epoch_means[f"{stage}_"]  # (ModuleDict keys may not shadow Module.train)
        self.log_dict({f"{stage}/{k}": v for k, v in metric.compute().items()})
        metric.reset()

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
            self._track_finite(step_stats_rows(terms), step)
            self.raise_if_nonfinite()

    def optimizer_step_now(self, objective: Tensor) -> None:
        """zero_grad, backward, step. On one device with no loss scaler, backward and the optimiser are called
        directly, so Lightning's per-step hooks (on_before_backward, on_after_backward, on_before_optimizer_step)
        are not run; otherwise through Lightning, which DDP's gradient all-reduce and fp16's loss scaling need,
        and which counts the step itself."""
        opt = self.optimizers()
        if self._direct:
            opt.optimizer.zero_grad(set_to_none=True)
            objective.backward()
            opt.optimizer.step()
        else:
            opt.zero_grad(set_to_none=True)
            self.manual_backward(objective)
            opt.step()

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
        self.epoch_means["train_"].update(stats[:, 0], stats[:, 1 : 1 + layers].T, count=n * size)
        if self.check_every != 1:
            self._track_finite(stats, step0)
            every = self.check_every
            if every and step0 // every != (step0 + n) // every:
                self._probe_finite()
        every_log = self.trainer.log_every_n_steps
        for i in range(n):
            if every_log and (step0 + i + 1) % every_log == 0:  # per-step curves at Lightning's logging interval
                self._queue_curve(step0 + i, stats[i], size)
        self._log_ready_curves()

    def _count_steps(self, n: int) -> None:
        """Count n optimiser steps that ran outside Lightning's optimizer.step (a replayed graph, or direct
        steps), so that global_step, max_steps, checkpoints and resume count optimiser steps."""
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        for _ in range(n):
            progress.increment_ready()
            progress.increment_completed()

    def _queue_curve(self, step: int, row: Tensor, size: int) -> None:
        """Per-step curves (train_step/*) of one optimiser step, logged straight to the loggers at that step.
        On a GPU the row is copied to host memory without a sync and logged once the copy has landed."""
        if row.device.type == "cuda":
            host = torch.empty(row.shape, dtype=row.dtype, pin_memory=True)
            host.copy_(row, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._pending_curves.append((step, host, done, size))
        else:
            self._pending_curves.append((step, row.clone(), None, size))

    def _log_ready_curves(self, wait: bool = False) -> None:
        while self._pending_curves:
            step, row, done, size = self._pending_curves[0]
            if done is not None and not (wait or done.query()):
                return
            if done is not None:
                done.synchronize()
            self._pending_curves.pop(0)
            values = row.tolist()
            recon, kl, objective = values[0] / size, sum(values[1:-1]) / size, values[-1]
            metrics = {"train_step/loss": recon + kl, "train_step/elbo": -(recon + kl), "train_step/recon": recon,
                       "train_step/kl": kl, "train_step/objective": objective, "train/beta": float(self.beta(step)),
                       "epoch": self.current_epoch}
            for logger in self.loggers:
                logger.log_metrics(metrics, step=step)

    # -- NaN and inf: tracked on the device, checked at intervals and before anything is saved ----
    @property
    def check_every(self) -> int:
        """Steps between host-device syncs for the NaN check: every step on CPU (free there), every 50 on
        an accelerator unless eval.check_finite_every_n_steps says otherwise."""
        every = self.hparams.check_finite_every_n_steps
        return every if every is not None else (1 if self.device.type == "cpu" else 50)

    def _track_finite(self, stats: Tensor, step0: int) -> None:
        """Remember, on the device and without a sync, the first step whose recon or KL was not finite.
        stats: the engine's rows [n, L + 2] for steps step0 .. step0 + n - 1."""
        layers = len(self.model.latent_dims)
        bad = ~torch.isfinite(stats[:, : 1 + layers])  # [n, 1 + L]
        recon_bad, kl_bad = bad[:, 0], bad[:, 1:].any(1)  # [n]
        any_bad = recon_bad | kl_bad
        first = any_bad.int().argmax().reshape(1)  # the first bad step's row (0 if none)
        if self._first_bad is None or self._first_bad.device != stats.device:
            self._first_bad = torch.full((3,), -1, dtype=torch.long, device=stats.device)  # step, recon, kl
        now = torch.cat([first + step0, recon_bad.index_select(0, first).long(), kl_bad.index_select(0, first).long()])
        self._first_bad = torch.where(any_bad.any() & (self._first_bad[0] < 0), now, self._first_bad)

    def _probe_finite(self) -> None:
        """The periodic check. On a CPU it reads the tracker at once. On a GPU it copies the tracker to host
        memory without waiting and reads the previous copy, so the training step never waits for the GPU;
        raise_if_nonfinite (a sync) still runs before anything is saved."""
        if self._first_bad is None:
            return
        if self._first_bad.device.type != "cuda":
            self.raise_if_nonfinite()
            return
        if self._finite_probe is not None:
            host, done = self._finite_probe
            if not done.query():
                return
            if int(host[0]) >= 0:
                self.raise_if_nonfinite()
        host = torch.empty(3, dtype=torch.long, pin_memory=True)
        host.copy_(self._first_bad, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._finite_probe = (host, done)

    def raise_if_nonfinite(self) -> None:
        """One sync: stop with a clear sentence if any step so far had a NaN or infinite loss. Called at
        intervals, and before anything is saved (validation, preemption), so no broken checkpoint is ever
        written."""
        if self._first_bad is None or int(self._first_bad[0]) < 0:
            return
        step, recon_bad, kl_bad = (int(v) for v in self._first_bad.tolist())
        which = " and ".join(t for t, b in (("reconstruction term", recon_bad), ("KL term", kl_bad)) if b)
        epoch = step // self.steps_per_epoch if self._trainer is not None else self.current_epoch
        raise NonFiniteLossError(
            f"Training stopped: the loss became NaN or infinite in the {which} at step {step} "
            f"(epoch {epoch}); lower optim.lr or check the data for NaNs. Checkpoints already "
            "saved were not touched."
        )

    # -- epochs, validation, test ------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        loader = self.trainer.train_dataloader
        executions = self.trainer.num_training_batches  # Lightning's count: executions (after limits)
        batches = getattr(loader, "num_batches", None)
        if batches is None:  # a plain loader: one step per batch
            self.steps_per_epoch = max(1, executions)
        else:
            limited = executions < len(loader)
            self.steps_per_epoch = max(1, executions * self.execution_plan.steps if limited else batches)

    def on_validation_start(self) -> None:
        if self.trainer.training or self.trainer.state.fn == "fit":
            self.raise_if_nonfinite()

    def on_train_epoch_end(self) -> None:
        self.raise_if_nonfinite()
        self._log_ready_curves(wait=True)
        self._log_epoch_means("train")
        if self.global_step > 0:
            self.log("train/beta", float(self.beta(self.global_step - 1)))

    def on_train_end(self) -> None:
        self._log_ready_curves(wait=True)

    def validation_step(self, x: Tensor, batch_idx: int) -> None:
        terms = self.model.elbo_terms(x)
        self.epoch_means["val_"].update(terms.recon, terms.kl_layers)
        for metric, means in zip(self.val_active, self.model.posterior_means(x)):
            metric.update(means)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_means("val")
        self._log_active_units("val", self.val_active)

    def test_step(self, batch, batch_idx: int) -> None:
        x, index = batch if isinstance(batch, (tuple, list)) else (batch, None)
        terms = self.model.elbo_terms(x)
        self.epoch_means["test_"].update(terms.recon, terms.kl_layers)
        for metric, means in zip(self.test_active, self.model.posterior_means(x)):
            metric.update(means)
        log_w = importance_log_weights(
            self.model, x, self.hparams.importance_samples, self.hparams.importance_points_per_pass,
            index=index, seed=self.hparams.importance_seed,
        )  # [K, B]
        self.test_nll.update(log_w)

    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")
        nll = self.test_nll.compute()
        self.log_dict({"test/nll": nll, "test/nll_mc_se": self.test_nll.standard_error(),
                       "test/bpd": bits_per_dim(nll, self.num_dims)})
        self.test_nll.reset()
        self._log_active_units("test", self.test_active)

    def _log_active_units(self, stage: str, metrics: nn.ModuleList) -> None:
        counts = [m.compute() for m in metrics]
        values = {f"{stage}/active_units": sum(counts)}
        if len(counts) > 1:
            values.update({f"{stage}/active_units_{i + 1}": c for i, c in enumerate(counts)})
        self.log_dict({k: torch.as_tensor(v, dtype=torch.float32) for k, v in values.items()})
        for m in metrics:
            m.reset()

    # -- the optimiser and the engine ------------------------------------------------------------
    def configure_optimizers(self):
        if self._trainer is None:  # outside a Trainer (a plain check of the optimiser): no engine to set up
            return adam(list(self.parameters()), self.hparams.lr, self.hparams.weight_decay, self.hparams.fused)
        obstacle = self._graph_obstacle()
        graphs = obstacle is None
        if obstacle is not None and self.device.type == "cuda" and self.hparams.cuda_graphs is not False:
            if self.hparams.cuda_graphs is True:
                raise ConfigError(f"cuda_graphs=true, but {obstacle}; use cuda_graphs=auto or remove the obstacle")
            log.info("cuda graphs: off (%s); training runs eagerly", obstacle)
        steps = self.hparams.steps_per_execution
        if steps == "auto":
            steps = AUTO_STEPS["cuda_graph" if graphs else ("cpu" if self.device.type == "cpu" else "cuda")]
        self.execution_plan = ExecutionPlan(steps, self.device if graphs else None)
        self._count_limits_in_executions(steps)
        if steps > 1:  # Lightning compares its batch count, executions here, with log_every_n_steps, in steps
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        strategy = self.trainer.strategy
        self._direct = (self.trainer.world_size == 1 and getattr(strategy.precision_plugin, "scaler", None) is None)
        optimizer = adam(list(self.parameters()), self.hparams.lr, self.hparams.weight_decay, self.hparams.fused,
                         capturable=graphs)
        if graphs:
            batch = self.trainer.datamodule.batch_size
            self.engine = CudaGraphEngine(self, optimizer, (steps, batch), self._graphs_failed)
        else:
            self.engine = EagerEngine(self)
        return optimizer

    def _count_limits_in_executions(self, steps: int) -> None:
        """Lightning counts training batches, which are executions here: translate the trainer's integer
        limits, given in optimiser steps, into executions (once per fit)."""
        trainer = self.trainer
        for name in ("limit_train_batches", "val_check_interval"):
            value = getattr(trainer, name)
            if steps == 1 or isinstance(value, bool) or not isinstance(value, int):
                continue
            if value % steps:
                raise ConfigError(f"trainer.{name}={value} counts optimiser steps and must be a multiple of "
                                  f"trainer.steps_per_execution={steps}")
            setattr(trainer, name, value // steps)

    def _graphs_failed(self, reason: str) -> None:
        log.warning("cuda graphs: %s; training continues eagerly", reason)

    def _graph_obstacle(self) -> str | None:
        """Why the whole step cannot be captured as a CUDA graph here, or None when it can."""
        if self.hparams.cuda_graphs is False:
            return "cuda_graphs=false"
        if self.device.type != "cuda":
            return f"training on {self.device.type}, not CUDA"
        if self.trainer.world_size > 1:
            return "DDP: the gradient all-reduce is not captured"
        if getattr(self.trainer.strategy.precision_plugin, "scaler", None) is not None:
            return f"trainer.precision={self.trainer.precision}: its loss scaler reads the gradients on the host"
        if "elbo_terms" in vars(self.model):
            return "compile=true: torch.compile makes its own graphs"
        dm = getattr(self.trainer, "datamodule", None)
        images = getattr(getattr(dm, "train_set", None), "images", None)
        if images is None or not hasattr(dm, "train_batch"):
            return "the training data does not come from vaelab's ImageDataModule"
        if images.device != self.device:
            return "the training images are in host memory; hold them on the GPU with data.device=cuda"
        return None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:  # lets tools rebuild the model from the checkpoint alone
            checkpoint["vaelab_config"] = self.run_config
        # the generators behind reparameterisation noise: a resumed run draws what an unbroken one would
        checkpoint["torch_rng_state"] = torch.get_rng_state()
        if self.device.type == "cuda":
            checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state(self.device)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        manual = loops.get("epoch_loop.manual_optimization.optim_step_progress")
        automatic = loops.get("epoch_loop.automatic_optimization.optim_progress", {}).get("optimizer", {}).get("step")
        if manual is not None and automatic and manual["total"]["completed"] == 0 < automatic["total"]["completed"]:
            # written before training moved to manual optimisation: its optimiser steps were counted there
            loops["epoch_loop.manual_optimization.optim_step_progress"] = automatic
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])
        if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state(checkpoint["cuda_rng_state"])


def step_stats_rows(terms: ElboTerms) -> Tensor:
    """One step's terms as the engine's row layout (objective left out), [1, L + 1]: for the NaN tracker."""
    return torch.cat([terms.recon.detach().sum(0, keepdim=True), terms.kl_layers.detach().sum(1)])[None]


def adam(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0, fused: bool = True,
         capturable: bool = False) -> torch.optim.Adam:
    """Adam, with the fused kernel when asked for and the parameters' device and dtype have one (torch checks
    this when the optimiser is built); otherwise torch's default implementation. Same algorithm either way.
    capturable: keep the step count on the device, so that the step can be captured in a CUDA graph."""
    if capturable:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused, capturable=True)
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
