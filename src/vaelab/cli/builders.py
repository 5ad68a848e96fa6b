"""The parts of a vaelab-train run that come from its config besides data, model and recipe (config.py): its
loggers (W&B continuing the run's W&B run on a resume, in its sweep's group), its Trainer with the configured
callbacks, and the one line that says what trains where."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig

from vaelab.cli.config import build, trainer_config
from vaelab.cli.rundirs import sweep_id
from vaelab.console import say
from vaelab.errors import ConfigError
from vaelab.training.checkpoints import AtomicCheckpointIO
from vaelab.training.loggers import RunLoggers


def build_loggers(cfg: DictConfig, wandb_run_id: str | None, shares_process: bool = False) -> RunLoggers:
    """The configured loggers; W&B continues the run's W&B run on a resume and takes the top-level `tags` too.
    shares_process: the run is a stacked sweep's member, a thread among others (runner.Solo.shares_process)."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        extra = {}
        if name == "wandb":
            extra = {"tags": [*(node.get("tags") or []), *cfg.get("tags", [])]}
            if node.get("group") is None and (group := sweep_group()) is not None:
                extra["group"] = group  # a sweep's runs are one W&B group, whichever launcher ran them
            if wandb_run_id:
                extra["run_id"] = wandb_run_id  # continue the same W&B run
            if shares_process:  # a stacked member, a thread: W&B would capture the whole sweep's output
                extra["console"] = "off"
        logger = build(node, **extra)
        if name == "wandb" and shares_process:
            logger.vaelab_console_log = Path(cfg.paths.output_dir) / "train.log"  # the member's own lines, at its end
        loggers.append(logger)
    return RunLoggers(loggers)


def sweep_group() -> str | None:
    """The W&B group of a multirun's jobs when run_group does not name one: sweep-<the sweep directory's name>-<a
    hash of its path> (rundirs.sweep_id)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return f"sweep-{sweep_id(HydraConfig.get().sweep.dir)}"


def run_facts(model, trainer: L.Trainer) -> dict:
    """What vaelab adds to the W&B config under its own key: facts of the run that no config value states."""
    from vaelab import __version__

    return {"num_parameters": sum(p.numel() for p in model.parameters()), "kl_estimator": model.kl_estimator,
            "device": str(trainer.strategy.root_device), "world_size": trainer.world_size, "version": __version__}


def say_start(cfg: DictConfig, model, trainer: L.Trainer, out_dir: Path, ckpt_path: str | None) -> None:
    """What trains where, in one line, in place of Lightning's device lines and model summary table."""
    if not trainer.is_global_zero:
        return
    params = sum(p.numel() for p in model.parameters())
    start = (f"testing the checkpoint {ckpt_path}" if not cfg.get("train", True) else
             f"resuming from {ckpt_path}" if ckpt_path else f"seed {cfg.seed}")
    say(f"vaelab: {cfg.model.get('name')} / {cfg.prior.get('name')} prior / {cfg.likelihood.get('name')} on "
        f"{cfg.data.name}, {params:,} parameters, on {trainer.strategy.root_device} x{trainer.world_size}, {start}; "
        f"run directory {out_dir}")


def build_trainer(cfg: DictConfig, loggers: RunLoggers) -> L.Trainer:
    """The Trainer with the configured callbacks; Lightning's rejection of a trainer setting is one sentence."""
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not cfg.trainer.get("enable_progress_bar", True):  # the bar is configured in callbacks/, switched off here
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    trainer_cfg = trainer_config(cfg)
    try:
        # checkpoints are written atomically beside their destination, and checked (AtomicCheckpointIO)
        return build(trainer_cfg, callbacks=callbacks, logger=loggers.loggers, plugins=[AtomicCheckpointIO()])
    except InstantiationException as exc:
        if not isinstance(exc.__cause__, (MisconfigurationException, ValueError, TypeError)):
            raise
        loggers.finish()
        reason = str(exc.__cause__).splitlines()[0]
        raise ConfigError(f"Lightning rejected the trainer config (conf/trainer/): {reason}") from None
