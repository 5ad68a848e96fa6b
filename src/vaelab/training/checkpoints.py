"""Checkpoints: loaded safely (weights_only: no pickled code runs), and their weights checked against a model."""

from __future__ import annotations

from pathlib import Path

import torch

from vaelab.errors import CheckpointError


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
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "vaelab_config" not in ckpt:
        raise CheckpointError(f"{p} was not written by vaelab-train (it holds no saved config); pass a checkpoint "
                              "from a vaelab run directory.")
    return ckpt


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
