"""What a vaelab checkpoint holds beyond Lightning's own state, written and read back by VAEModule's checkpoint hooks:
the run's config (vaelab_config: vaelab-eval and -sample rebuild its data), the model as plain data (vaelab_model:
load_model rebuilds it), the metrics logged so far, whether training had ended and under which limits, where each
logger's history stood (log_rows.py: a resumed run logs every row once), the training time so far, and the
generators behind the reparameterisation noise (a resumed run draws what an unbroken one would)."""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from torch import Tensor

from vaelab.training.log_rows import mark


class TrainTime:
    """Seconds spent training: this start's since its fit began, and every earlier start's up to the checkpoint it
    resumed from. A run killed outright loses only the time since its last checkpoint, whose work it repeats."""

    def __init__(self) -> None:
        self.before, self._since = 0.0, None

    def start(self) -> None:
        self._since = time.perf_counter()

    def stop(self) -> None:
        self.before, self._since = self.seconds(), None

    def seconds(self) -> float:
        return self.before + (time.perf_counter() - self._since if self._since is not None else 0.0)


def save_run_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    config = module.recipe.config
    if config is not None:  # the run's whole config: vaelab-eval and -sample rebuild its data too
        checkpoint["vaelab_config"] = config
    spec = module.model.spec()
    if spec is not None:  # the model as plain data: load_model and load_from_checkpoint rebuild it
        checkpoint["vaelab_model"] = spec
    if module.attached:  # what was logged so far: a resumed run reports it for epochs it did not redo
        trainer = module.trainer
        checkpoint["vaelab_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                        if isinstance(v, (int, float, Tensor)) and torch.as_tensor(v).numel() == 1}
        if module.training_finished:  # training ended (max_epochs, max_steps or early stopping) at these limits
            checkpoint["vaelab_training_finished"] = {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps}
        if trainer.is_global_zero:  # every row logged so far made durable, and where each history stands
            module.curves.flush(trainer.loggers, wait=True)
            checkpoint["vaelab_logs"] = mark(trainer.loggers)
    checkpoint["vaelab_train_time_s"] = module.train_time.seconds()
    checkpoint["torch_rng_state"] = torch.get_rng_state()
    if module.device.type == "cuda":
        checkpoint["cuda_rng_state"] = torch.cuda.get_rng_state(module.device)


def restore_run_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """A fit resumed from `checkpoint`: the metrics logged before it, whether training is done, the generators."""
    trainer = module.trainer
    module.restored_metrics = dict(checkpoint.get("vaelab_metrics", {}))
    module.train_time.before = float(checkpoint.get("vaelab_train_time_s", module.train_time.before))
    limits = checkpoint.get("vaelab_training_finished")
    if limits == {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps}:
        # training had ended under these limits (early stopping too, whose stop flag no checkpoint keeps): the
        # resumed fit trains nothing and the run goes on to its test phase
        trainer.should_stop = True
    if "torch_rng_state" in checkpoint:
        torch.set_rng_state(checkpoint["torch_rng_state"])
    if "cuda_rng_state" in checkpoint and torch.cuda.is_available():
        torch.cuda.set_rng_state(checkpoint["cuda_rng_state"])
