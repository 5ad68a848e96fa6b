"""Checkpoints: loaded safely (weights_only: no pickled code runs), their weights checked against a model, the
plain VAE rebuilt from one (load_model) without Hydra or the data set, written atomically, and the ones a resumed
run no longer keeps removed. Why it is long: it is the one owner of checkpoint files, reading, writing and
pruning them; each of those reads what a checkpoint holds by the same helpers (checkpoint_step, readable_checkpoints)."""

from __future__ import annotations

import copy
import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from vaelab.errors import CheckpointError, SaveError
from vaelab.files import atomic_write
from vaelab.models.base import VAEBase
from vaelab.models.build import build_from_spec
from vaelab.models.hvae import renamed_lower_posteriors


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
    """The model a checkpoint holds, as plain data (models/spec.py)."""
    if not ckpt.get("vaelab_model"):
        raise CheckpointError("the checkpoint describes no model that vaelab can rebuild (it has no model spec); "
                              "pass a checkpoint written by vaelab-train or by a Trainer that trained a VAEModule")
    return ckpt["vaelab_model"]


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
    """The VAE's evaluation weights: the moving average's with trainer.ema_rate (under `ema_model.`), else the
    model's own (under `model.`)."""
    state = ckpt["state_dict"]
    prefix = "ema_model." if any(k.startswith("ema_model.") for k in state) else "model."
    return renamed_lower_posteriors({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def load_weights(model: torch.nn.Module, state: dict, path: str | Path) -> None:
    """Load weights, saying plainly when they belong to another model (and loading nothing then)."""
    check_weights(model, state, path)
    model.load_state_dict(state)


_FITS: set[tuple[str, int]] = set()  # (path, mtime) of checkpoints found to fit the configured model


def check_fits(model: torch.nn.Module, path: str | Path) -> None:
    """A checkpoint to continue from must be readable and hold `model`'s weights (CheckpointError otherwise). Read
    once per start: the run guard checks it before anything is written, and train() does not read it again."""
    key = (str(Path(path).resolve()), Path(path).stat().st_mtime_ns if Path(path).exists() else -1)
    if key not in _FITS:
        check_weights(model, model_state(load_checkpoint(path)), path)
        _FITS.add(key)


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


def checkpoint_step(path: str | Path) -> int | None:
    """The optimiser step a checkpoint file holds, or None if it cannot be read (truncated, corrupt, not one).
    Memory-mapped: the weights are not read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(ckpt["global_step"])
    except Exception:  # noqa: BLE001 - any unreadable file is just not a checkpoint to continue from
        return None


def readable_checkpoints(ckpt_dir: Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """([(step, path)] of the readable checkpoints, newest first, last.ckpt first among equals; [unreadable])."""
    good, bad = [], []
    for path in sorted(Path(ckpt_dir).glob("*.ckpt")):
        step = checkpoint_step(path)
        if step is None:
            bad.append(path)
        else:
            good.append((step, path))
    good.sort(key=lambda sp: (sp[0], sp[1].name == "last.ckpt", sp[1].stat().st_mtime), reverse=True)
    return good, bad


def remove_temporaries(ckpt_dir: Path) -> None:
    """Temporary files of saves a killed process left half-written (a SIGKILL can leave one, nothing else)."""
    for tmp in Path(ckpt_dir).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def mount_point(path: Path) -> Path:
    path = Path(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def checkpoint_dir(trainer) -> Path | None:
    """Where a trainer's checkpoints are (what a failed write says is kept), or None."""
    callback = trainer.checkpoint_callback
    return Path(callback.dirpath) if callback is not None and getattr(callback, "dirpath", None) else None


def save_failure(exc: OSError, path: Path, checkpoints: Path | None = None) -> str:
    """One sentence for a save that failed: what, where, what is kept (the checkpoints in `checkpoints`, by
    default path's own folder), and what to do."""
    good, _ = readable_checkpoints(checkpoints or path.parent)
    kept = (f"the checkpoints already there are whole ({', '.join(f'{p.name} at step {s}' for s, p in good)})"
            if good else "no earlier checkpoint was written")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on {mount_point(path.parent)} while saving {path}; {kept}; free space and rerun "
                "with resume=auto")
    return (f"could not save {path} ({exc.strerror or exc}); {kept}; make {path.parent} writable and rerun with "
            "resume=auto")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, written atomically (a temporary file beside the checkpoint, fsynced, then
    os.replace: the previous file stays whole until the new one is), and trusted only once the file in place
    holds the step it claims. A full disk or a read-only directory is one sentence (SaveError), not a traceback
    and a truncated file. Lightning's own IO writes the temporary file under /tmp and moves it, which is a copy,
    not a rename, when the run directory is on another filesystem."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        checkpoint = compact(checkpoint)
        writer = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_write(path, "wb") as file:
                writer = _Writes(file)
                torch.save(checkpoint, writer)
        except OSError as exc:
            raise SaveError(save_failure(exc, path)) from None
        except RuntimeError as exc:  # torch's zip writer reports a failed write as a RuntimeError, without its errno
            error = writer.error if writer is not None else None
            if error is None and f"[Errno {errno.ENOSPC}]" in str(exc):  # a write torch's writer made itself
                error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if error is None:
                raise
            raise SaveError(save_failure(error, path)) from None
        saved, claimed = checkpoint_step(path), checkpoint.get("global_step")
        if saved != claimed:
            raise SaveError(f"{path} holds step {saved} after a save of step {claimed}: something else writes into "
                            f"{path.parent}; give the run a directory of its own and rerun with resume=auto")


def compact(obj):
    """The checkpoint with every tensor that views a larger storage copied out: torch.save writes a view's whole
    storage, and a stacked sweep's member (vaelab/stacking/member.py) trains on views of the whole stack."""
    if isinstance(obj, torch.Tensor):
        return obj.clone() if obj.untyped_storage().nbytes() > obj.numel() * obj.element_size() else obj
    if isinstance(obj, dict):
        out = copy.copy(obj)
        for key, value in obj.items():
            out[key] = compact(value)
        return out
    if isinstance(obj, list):
        return [compact(v) for v in obj]
    if type(obj) is tuple:
        return tuple(compact(v) for v in obj)
    return obj


class _Writes:
    """A file's write and flush, keeping the first OSError (a full disk, say) that torch's writer would hide."""

    def __init__(self, file) -> None:
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as exc:  # a buffered write meets the full disk here (another process filled it meanwhile)
            self.error = self.error or exc
            raise


def saved_entries(path: str | Path, *keys: str) -> dict:
    """Some top-level entries of a checkpoint, read memory-mapped (its weights are not read); {} if unreadable."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - resume_from chose a readable one; a caller asking of any other gets nothing
        return {}
    return {k: ckpt[k] for k in keys if k in ckpt}


def prune_untracked(resumed: str | Path) -> list[Path]:
    """Checkpoints in `resumed`'s folder that the run it resumes no longer keeps: whole files, no newer than it,
    that its ModelCheckpoint's top-k (save_top_k) does not hold. An attempt killed after saving a new best but
    before last.ckpt, or resumed from an older checkpoint, leaves them; without this they pile up past save_top_k.
    Returns the files removed."""
    resumed = Path(resumed)
    states = [s for s in saved_entries(resumed, "callbacks").get("callbacks", {}).values()
              if isinstance(s, dict) and "best_k_models" in s]
    if len(states) != 1:  # no ModelCheckpoint, or several whose files cannot be told apart: nothing is removed
        return []
    state = states[0]
    kept = {Path(str(p)).name for p in [*state["best_k_models"], state.get("best_model_path"),
                                         state.get("last_model_path")] if p}
    step = checkpoint_step(resumed)
    removed = []
    for path in sorted(resumed.parent.glob("*.ckpt")):
        if path.name in kept or path.name in ("last.ckpt", resumed.name):
            continue
        other = checkpoint_step(path)
        if other is not None and step is not None and other <= step:
            path.unlink()
            removed.append(path)
    return removed
