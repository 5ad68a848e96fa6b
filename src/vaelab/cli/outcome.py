"""What a vaelab-train run leaves when it ends: results.json (finished, preempted or failed), its summary lines, and
the value sweepers optimise."""

from __future__ import annotations

import logging
import math
import shlex
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from vaelab.cli.rundirs import RunState, save_json
from vaelab.console import plural, say
from vaelab.errors import SaveError, VaelabError
from vaelab.pixels import MEANING
from vaelab.training.callbacks import Preempted
from vaelab.training.loggers import RunLoggers


def results_of(cfg: DictConfig, trainer: L.Trainer, model, metrics: dict, state: RunState, test_time: float,
               out_dir: Path) -> dict:
    """results.json of a finished run: what was trained, for how long, and its final metrics."""
    checkpoints = trainer.checkpoint_callback
    return {
        "status": "finished",
        "model": cfg.model.get("name", cfg.model._target_),
        "prior": cfg.prior.get("name", "standard"),
        "posterior": cfg.posterior.get("name", "gaussian") if cfg.get("posterior") else "gaussian",
        "likelihood": cfg.likelihood.get("name", ""),
        "data": cfg.data.name,
        "binarize": cfg.data.binarize,
        # what the likelihood was given, and so what test/nll and test/bpd are (vaelab/pixels.py)
        "pixels": (pixels := getattr(trainer.datamodule, "pixels", None)),
        "bpd_means": MEANING.get(pixels),
        # what training optimised (training/objective.py): elbo, or iwae with its k samples
        "objective": cfg.loss.get("objective", "elbo"),
        "objective_samples": cfg.loss.get("samples", 1),
        "seed": cfg.seed,
        "tags": list(cfg.get("tags", [])),
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "train_time_s": round(state.train_time_s, 2),
        "test_time_s": round(test_time, 2),
        "preemptions": state.preemptions,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "device": str(trainer.strategy.root_device),
        "torch_threads": torch.get_num_threads(),
        "importance_samples": cfg.eval.importance_samples,
        "kl_estimator": model.kl_estimator,
        "best_checkpoint": checkpoints.best_model_path if checkpoints else None,
        "metrics": metrics,
        "run_dir": str(out_dir),
    }


def write_results(results: dict, trainer: L.Trainer, loggers: RunLoggers, out_dir: Path, checkpoints=None,
                  table: dict | None = None) -> None:
    """A finished run's ending: its W&B run's facts (checkpoints logged as artifacts offline) in results.json, saved
    by the first process, with `table` (its results as one row) logged, the summary lines; the loggers finished."""
    if trainer.is_global_zero:
        wandb, wandb_dir = loggers.results(checkpoints)
        if wandb is not None:
            results["wandb"] = wandb
        if table is not None:
            loggers.log_results(table)
        save_json(out_dir / "results.json", results)
        print_summary(results, out_dir, wandb_dir)
    loggers.finish()


def preempted(stop: Preempted, trainer: L.Trainer, loggers: RunLoggers, state: RunState, out_dir: Path) -> dict:
    """Record a preemption: the run state beside the checkpoint, a 'preempted' results.json, one message; under
    submitit, then requeue the job."""
    state.preemptions += 1
    results = {"status": "preempted", "signal": stop.signal_name, "phase": stop.phase, "epoch": stop.epoch,
               "global_step": stop.step, "checkpoint": str(stop.path), "metrics": {}, "run_dir": str(out_dir)}
    if trainer.is_global_zero:
        state.save(out_dir)
        save_json(out_dir / "results.json", results)
        then = ("submitit requeues the job, which continues from it" if stop.requeue else
                "Run the same command with resume=auto to continue")
        if stop.phase == "test":
            say(f"\nvaelab: stopped by {stop.signal_name} during the test phase; training is complete and saved in "
                f"{stop.path} (step {stop.step}). {then}: it tests again without training.")
        else:
            say(f"\nvaelab: stopped by {stop.signal_name} at epoch {stop.epoch}, step {stop.step}; checkpoint saved "
                f"to {stop.path}. {then}.")
    loggers.preempted()
    if stop.requeue is not None and trainer.is_global_zero:
        stop.requeue()  # submitit's checkpoint-and-requeue: ends this process, to start again from the checkpoint
    return results


def print_summary(results: dict, out_dir: Path, wandb_dir: Path | None) -> None:
    done = (f"tested {results['tested_checkpoint']}" if results.get("trained") is False else
            f"{plural(results['epochs'], 'epoch')}, {results['train_time_s']:.0f} s training")
    lines = [f"\nvaelab: {results['model']} / {results['prior']} prior / {results['likelihood']} on "
             f"{results['data']} ({results['binarize']}), {done}"]
    lines += [f"  {key:<18} {value:.4f}" for key, value in results["metrics"].items() if key.startswith("test/")]
    if results.get("bpd_means"):
        lines.append(f"  pixels             {results['pixels']}: {results['bpd_means']}")
    lines.append(f"  run directory      {out_dir}")
    if any((out_dir / "samples").glob("*.png")):  # none with callbacks=none (no image grids callback)
        lines.append(f"  sample grids       {out_dir / 'samples'}")
    if wandb_dir is not None:
        mode = results.get("wandb", {}).get("mode")
        lines.append(f"  W&B run            {wandb_dir} ({mode})")
        if mode == "offline":
            lines.append(f"  upload it later:   wandb sync {shlex.quote(str(wandb_dir))}")
    say("\n".join(lines))


def objective(results: dict, name: str | None) -> float | None:
    """The value sweepers (Optuna) optimise: a metric of the run, infinity when it is missing or not finite."""
    if not name:
        return None
    value = results["metrics"].get(name)
    return float(value) if value is not None and math.isfinite(value) else float("inf")


def failed_in_sweep(cfg: DictConfig, exc: VaelabError) -> float | None:
    """After a run's one-line error (its W&B run ended: loggers.finished_on_error): in a sweep, record the failure (results.json) and give
    sweepers the worst value, so that one bad configuration does not end the others. A file that cannot be saved
    (a full disk, a read-only directory) is no configuration's fault and would fail every job after it: it ends the
    sweep, with a non-zero exit, as it ends a run alone."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    logging.getLogger("vaelab.console").error("error: %s", exc)  # train.log only: stderr has the line already
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN) or isinstance(exc, SaveError):
        return None
    out = Path(cfg.paths.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "results.json", {"status": "failed", "error": str(exc), "metrics": {}})
    except VaelabError:
        pass  # the run's own error (a full disk, say) was said already
    return float("inf")
