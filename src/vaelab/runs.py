"""Rebuild what a run trained from its checkpoint alone: the data module and the model, with weights."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab.checkpoints import checkpoint_config, load_checkpoint, load_weights, model_state
from vaelab.errors import VaelabError


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, with our own errors unwrapped so people see the sentence, not the wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, VaelabError):
            raise exc.__cause__ from None
        raise


def spec(node: DictConfig) -> DictConfig:
    """A model-part config without its `name`, which labels runs and is no constructor argument."""
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"})


def build_model(cfg: DictConfig, image_shape) -> torch.nn.Module:
    likelihood = build(spec(cfg.likelihood))
    prior = build(spec(cfg.prior))  # a partial: the model builds it with its own latent size and encoder
    return build(spec(cfg.model), image_shape=image_shape, likelihood=likelihood, prior=prior)


def restore(ckpt_path: str | Path, data_overrides: dict | None = None):
    """(config, data module set up, model with the checkpoint's weights, in eval mode)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = checkpoint_config(ckpt)
    data_cfg = OmegaConf.merge(cfg.data, {k: v for k, v in (data_overrides or {}).items() if v is not None})
    datamodule = build(data_cfg)
    datamodule.setup("test")
    model = build_model(cfg, datamodule.image_shape)
    load_weights(model, model_state(ckpt), ckpt_path)
    return cfg, datamodule, model.eval()
