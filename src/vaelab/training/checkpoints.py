"""Checkpoints: loaded safely (weights_only: no pickled code runs), their weights checked against a model, and
the plain VAE rebuilt from one (load_model) without Hydra or the data set."""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.data.sources import SOURCES
from vaelab.errors import CheckpointError
from vaelab.models.base import VAEBase
from vaelab.models.spec import build_from_spec


def load_checkpoint(path: str | Path) -> dict:
    """Read a vaelab checkpoint with torch.load(weights_only=True); every failure is one clear sentence."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"No checkpoint at {p}; pass ckpt_path=<run dir>/checkpoints/last.ckpt (or another .ckpt there).")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle with code, not a checkpoint at all
        raise CheckpointError(
            f"{p} is not a readable checkpoint ({type(exc).__name__}: the file is truncated, corrupt or not a "
            "safe weights-only checkpoint); use another file from its checkpoints/ folder or retrain."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or not {"vaelab_model", "vaelab_config"} & set(ckpt):
        raise CheckpointError(f"{p} was not written by vaelab (it describes no VAE); pass a checkpoint from a "
                              "vaelab run directory or from a Trainer that trained a VAEModule.")
    return ckpt


def model_spec(ckpt: dict) -> dict:
    """The model a checkpoint holds, as plain data (models/spec.py). Checkpoints of vaelab 0.1 hold only the run's
    config, from which the spec is read (the image shape from the data set's registry entry)."""
    if ckpt.get("vaelab_model"):
        return ckpt["vaelab_model"]
    cfg = ckpt.get("vaelab_config") or {}
    source = SOURCES.get(cfg.get("data", {}).get("name"))
    if source is None or not all(k in cfg for k in ("model", "prior", "likelihood")):
        raise CheckpointError("the checkpoint describes no model that vaelab can rebuild (no model spec, and no "
                              "model, prior, likelihood and data in its config)")

    def part(node: dict) -> dict:
        return {k: v for k, v in node.items() if k not in ("name", "_partial_")}

    spec = {"model": {**part(cfg["model"]), "image_shape": source.image_shape}, "prior": part(cfg["prior"]),
            "likelihood": part(cfg["likelihood"])}
    if cfg.get("posterior"):
        spec["posterior"] = part(cfg["posterior"])
    return spec


def load_model(path: str | Path, weights: bool = True) -> VAEBase:
    """The plain VAE of a checkpoint (written by vaelab-train or by any Trainer that trained a VAEModule), with its
    weights and in eval mode; no data set is read. weights=False: the same model, untrained."""
    return model_of(load_checkpoint(path), path, weights)


def model_of(ckpt: dict, path: str | Path, weights: bool = True) -> VAEBase:
    """The VAE an already loaded checkpoint describes, with its weights (unless weights=False), in eval mode."""
    model = build_from_spec(model_spec(ckpt))
    if weights:
        load_weights(model, model_state(ckpt), path)
    return model.eval()


def model_state(ckpt: dict) -> dict:
    """The VAE's own weights (the LightningModule stores them under `model.`)."""
    return {k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


def load_weights(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """Load weights, saying plainly when they belong to another model (and loading nothing then)."""
    check_weights(model, state, path)
    model.load_state_dict(state)


def check_weights(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """Raise CheckpointError unless `state` has exactly the model's weights, with the model's shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        detail = (f"{len(missing)} missing, {len(unexpected)} unexpected and {len(shapes)} differently shaped "
                  f"weights, e.g. {(missing + unexpected + shapes)[0]}")
        raise CheckpointError(f"{path} is from another model than the one configured ({detail}); use the config "
                              "it was trained with, or a checkpoint of this model.")
