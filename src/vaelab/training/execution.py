"""How training steps run on this trainer: whether the whole step can be one CUDA graph, how many optimiser
steps an execution holds, the trainer's integer limits translated from optimiser steps into executions
(Lightning counts training batches, which are executions here), how many optimiser steps an epoch holds, and
Lightning's counters advanced by the optimiser steps an execution ran."""

from __future__ import annotations

import logging
import warnings

import lightning as L

from vaelab.data.batches import ExecutionPlan
from vaelab.errors import ConfigError
from vaelab.training.engine import AUTO_STEPS

log = logging.getLogger("vaelab")


def plan_execution(module: L.LightningModule, cuda_graphs: bool | str, steps: int | str) -> ExecutionPlan:
    """The execution plan for `module` on its trainer: graphs where they can be used (cuda_graphs=auto, saying
    why not in one log line), or refused in one sentence (cuda_graphs=true); "auto" steps by device and engine."""
    obstacle = graph_obstacle(module, cuda_graphs)
    graphs = obstacle is None
    if obstacle is not None and module.device.type == "cuda" and cuda_graphs is not False:
        if cuda_graphs is True:
            raise ConfigError(f"cuda_graphs=true, but {obstacle}; use cuda_graphs=auto or remove the obstacle")
        log.info("cuda graphs: off (%s); training runs eagerly", obstacle)
    if steps == "auto":
        steps = AUTO_STEPS["cuda_graph" if graphs else ("cpu" if module.device.type == "cpu" else "cuda")]
    count_limits_in_executions(module.trainer, steps)
    if steps > 1:  # Lightning compares its batch count, executions here, with log_every_n_steps, in steps
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    return ExecutionPlan(steps, module.device if graphs else None)


def graph_obstacle(module: L.LightningModule, cuda_graphs: bool | str) -> str | None:
    """Why the whole step cannot be captured as a CUDA graph here, or None when it can."""
    trainer = module.trainer
    if cuda_graphs is False:
        return "cuda_graphs=false"
    if module.device.type != "cuda":
        return f"training on {module.device.type}, not CUDA"
    if trainer.world_size > 1:
        return "DDP: the gradient all-reduce is not captured"
    if getattr(trainer.strategy.precision_plugin, "scaler", None) is not None:
        return f"trainer.precision={trainer.precision}: its loss scaler reads the gradients on the host"
    if getattr(getattr(module, "recipe", None), "scheduler", None) is not None:
        return "a learning-rate scheduler is configured: a captured step would keep the rate it was captured with"
    if "elbo_terms" in vars(module.model):
        return "compile=true: torch.compile makes its own graphs"
    dm = getattr(trainer, "datamodule", None)
    images = getattr(getattr(dm, "train_set", None), "images", None)
    if images is None or not hasattr(dm, "train_batch"):
        return "the training data does not come from vaelab's ImageDataModule"
    if images.device != module.device:
        return "the training images are in host memory; hold them on the GPU with data.device=cuda"
    return None


def count_limits_in_executions(trainer: L.Trainer, steps: int) -> None:
    """Translate the trainer's integer limits, given in optimiser steps, into executions (once per fit).
    fast_dev_run and overfit_batches set them in batches, which are executions here: those stay as they are."""
    if trainer.fast_dev_run or trainer.overfit_batches > 0:
        return
    for name in ("limit_train_batches", "val_check_interval"):
        value = getattr(trainer, name)
        if steps == 1 or isinstance(value, bool) or not isinstance(value, int):
            continue
        if value % steps:
            raise ConfigError(f"trainer.{name}={value} counts optimiser steps and must be a multiple of "
                              f"trainer.steps_per_execution={steps}")
        setattr(trainer, name, value // steps)


def steps_per_epoch(trainer: L.Trainer, plan: ExecutionPlan | None) -> int:
    """Optimiser steps in a training epoch, after the trainer's limits (what the engine is told each epoch)."""
    loader = trainer.train_dataloader
    executions = trainer.num_training_batches  # Lightning's count: executions (after limits)
    batches = getattr(loader, "num_batches", None)
    if batches is None or plan is None:  # a plain loader: one step per batch
        return max(1, executions)
    limited = executions < len(loader)
    return max(1, executions * plan.steps if limited else batches)


def count_optimizer_steps(trainer: L.Trainer, uncounted: int, steps: int) -> None:
    """Make Lightning count the `steps` optimiser steps that one training_step ran, `uncounted` of them outside its
    optimizer.step (a replayed graph, direct steps): global_step, max_steps, checkpoints and resume count optimiser
    steps, and the loggers' x-axis too.

    The x-axis is Lightning's private fit_loop.epoch_loop._batches_that_stepped, which it advances by one per
    training_step and uses as the step of every epoch metric (LoggerConnector.log_metrics). No public way sets it:
    the public alternative, a logged metric named "step", also becomes ModelCheckpoint's {step} and a callback metric
    saved in every checkpoint. So vaelab advances it by the steps beyond one, here alone.
    tests/test_steps_per_execution.py pins the result: every epoch metric lands at the same optimiser step whatever
    the steps per execution."""
    progress = trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
    for _ in range(uncounted):
        progress.increment_ready()
        progress.increment_completed()
    trainer.fit_loop.epoch_loop._batches_that_stepped += steps - 1
