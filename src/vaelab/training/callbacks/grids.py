"""Image grids during training: every few validation epochs and at the end, the grids of
vaelab.evaluation.grids on a fixed validation batch, saved as PNGs and sent to every logger that takes images."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image
from torch import Tensor

from vaelab.checks import check_args, positive
from vaelab.errors import SaveError
from vaelab.evaluation.grids import all_grids, grid_note
from vaelab.training.checkpoints import checkpoint_dir, save_failure


def to_uint8(grid: Tensor) -> np.ndarray:
    """A [C, H, W] grid in [0, 1] as the [H, W, C] uint8 array a PNG holds, rounded as torchvision's save_image
    rounds. W&B and TensorBoard get these very bytes: wandb.Image no longer rescales floats in [0, 1] (since
    wandb 0.20 it clips them to [0, 255], a black image), and TensorBoard truncates where save_image rounds."""
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()


def write_png(trainer: L.Trainer, path: Path, write) -> None:
    """write(path); a failure (a full disk) is the run's one sentence, as for a checkpoint, with no half-written
    PNG left."""
    try:
        write(path)
    except OSError as exc:
        path.unlink(missing_ok=True)
        raise SaveError(save_failure(exc, path, checkpoint_dir(trainer))) from None


def log_image(trainer: L.Trainer, key: str, pixels: np.ndarray, caption: str) -> None:
    """Send one image [H, W, C] uint8 to every logger that takes images."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[pixels[..., 0] if pixels.shape[-1] == 1 else pixels],
                             caption=[caption], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, pixels, trainer.global_step, dataformats="HWC")


class ImageGrids(L.Callback):
    """Every `every_n_epochs` validation epochs (and once when training ends), the grids of
    vaelab.evaluation.grids.all_grids on a fixed validation batch. A fixed seed makes grids from different epochs
    show the same latent draws. Each drawing is logged once: when training ends at a step whose grids were just
    drawn, the `final` PNGs are copies of them."""

    ARGS = {"temperature": positive("callbacks.image_grids.temperature")}

    def __init__(self, save_dir: str, every_n_epochs: int = 1, num_samples: int = 64,
                 num_reconstructions: int = 32, seed: int = 0, temperature: float = 1.0) -> None:
        check_args(self.ARGS, {"temperature": temperature})
        self.temperature = float(temperature)  # the prior samples' (models/base.py sample)
        self.save_dir = Path(save_dir)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.num_samples, self.num_reconstructions, self.seed = num_samples, num_reconstructions, seed
        self._drawn: tuple[int, dict[str, Path]] | None = None  # (global step, PNGs) of the last drawing

    def state_dict(self) -> dict:
        """The last drawing (its step and PNGs), kept in checkpoints: a run resumed after it copies its final grids
        from it as the whole run does, rather than drawing and logging them again."""
        if self._drawn is None:
            return {}
        return {"drawn_step": self._drawn[0], "drawn": {k: str(v) for k, v in self._drawn[1].items()}}

    def load_state_dict(self, state: dict) -> None:
        if "drawn_step" in state and all(Path(p).is_file() for p in state["drawn"].values()):
            self._drawn = (int(state["drawn_step"]), {k: Path(v) for k, v in state["drawn"].items()})

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        self.write(trainer, pl_module, tag=f"epoch_{epoch:03d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:  # the final model, however training stopped (max_steps, early stop)
            return
        if self._drawn is not None and self._drawn[0] == trainer.global_step:  # the same weights: copy, not redraw
            for name, path in self._drawn[1].items():
                write_png(trainer, self.save_dir / f"{name}_final.png", lambda dst, src=path: shutil.copyfile(src, dst))
            return
        self.write(trainer, pl_module, tag="final")

    @torch.no_grad()
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, tag: str) -> dict[str, Path]:
        model = getattr(pl_module, "eval_model", pl_module.model)  # the moving average, with trainer.ema_rate
        was_training = model.training
        model.eval()
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            x = trainer.datamodule.example_batch(self.num_reconstructions).to(pl_module.device)
            grids = all_grids(model, x, self.num_samples, temperature=self.temperature)
        model.train(was_training)
        self.save_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, grid in grids.items():
            pixels = to_uint8(grid)
            paths[name] = self.save_dir / f"{name}_{tag}.png"
            write_png(trainer, paths[name], Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save)
            note = grid_note(name, model, self.num_samples, self.temperature)
            log_image(trainer, f"images/{name}", pixels,
                      f"{name}, {tag}, step {trainer.global_step}" + (f", {note}" if note else ""))
        self._drawn = (trainer.global_step, paths)
        return paths
