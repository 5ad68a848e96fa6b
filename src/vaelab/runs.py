"""Rebuild what a run trained from its checkpoint alone: the data module and the model, with weights."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab.checkpoints import checkpoint_config, load_checkpoint, load_weights, model_state
from vaelab.errors import ConfigError, VaelabError


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
    try:
        return build(spec(cfg.model), image_shape=image_shape, likelihood=likelihood, prior=prior)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, MemoryError) or (isinstance(cause, RuntimeError) and "alloc" in str(cause).lower()):
            sizes = ", ".join(f"model.{k}={cfg.model[k]}" for k in ("hidden_dim", "latent_dim", "num_layers")
                              if k in cfg.model)
            raise ConfigError(f"the model is too large for this machine's memory ({sizes}); lower "
                              "model.hidden_dim or model.latent_dim") from None
        raise


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


def refuse_unknown_keys(cfg: DictConfig, app: str, config_file: Path) -> None:
    """vaelab-eval and vaelab-sample rebuild the model, prior, likelihood and data from the checkpoint: an
    override such as +model=vanilla would be silently ignored, so it is refused instead."""
    own = set(OmegaConf.load(config_file).keys()) | {"hydra", "defaults"}
    unknown = sorted(set(cfg.keys()) - own)
    if unknown:
        raise ConfigError(f"{app} rebuilds the model, prior, likelihood and data from the checkpoint's own config, "
                          f"so {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not among its options; "
                          f"remove {'it' if len(unknown) == 1 else 'them'} (its options: conf/{config_file.name})")
