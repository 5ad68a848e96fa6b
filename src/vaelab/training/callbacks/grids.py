"""Image grids during training: every few validation epochs and at the end, the grids of
vaelab.evaluation.grids on a fixed validation batch, saved as PNGs and sent to every logger that takes images."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import save_image

from vaelab.evaluation.grids import all_grids


def log_image(trainer: L.Trainer, key: str, grid: Tensor, caption: str) -> None:
    """Send one image grid [C, H, W] to every logger that takes images."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[grid], caption=[caption], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, grid, trainer.global_step)


class ImageGrids(L.Callback):
    """Every `every_n_epochs` validation epochs (and once when training ends), the grids of
    vaelab.evaluation.grids.all_grids on a fixed validation batch. A fixed seed makes grids from different epochs
    show the same latent draws."""

    def __init__(self, save_dir: str, every_n_epochs: int = 1, num_samples: int = 64,
                 num_reconstructions: int = 32, seed: int = 0) -> None:
        self.save_dir = Path(save_dir)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.num_samples, self.num_reconstructions, self.seed = num_samples, num_reconstructions, seed

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        self.write(trainer, pl_module, tag=f"epoch_{epoch:03d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:  # the final model, however training stopped (max_steps, early stop)
            self.write(trainer, pl_module, tag="final")

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> dict[str, Path]:
        model = pl_module.model
        was_training = model.training
        model.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            x = trainer.datamodule.example_batch(self.num_reconstructions).to(pl_module.device)
            grids = all_grids(model, x, self.num_samples)
        model.train(was_training)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, grid in grids.items():
            paths[name] = self.save_dir / f"{name}_{tag}.png"
            save_image(grid, paths[name])
            log_image(trainer, f"images/{name}", grid, f"{name}, {tag}, step {trainer.global_step}")
        return paths
