"""vaelab-train: the Hydra app. Composes conf/, builds data, model, module, callbacks, loggers and Trainer,
trains, tests on the best checkpoint, writes results.json and returns the metric sweepers optimise."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab.callbacks import Preempted
from vaelab.checkpoints import check_weights, load_checkpoint, model_state
from vaelab.engine import matmul_precision
from vaelab.errors import ConfigError, DistributedError, VaelabError
from vaelab.loggers import log_checkpoints_offline, wandb_run_dir
from vaelab.module import KL_DESCRIPTION, VAEModule
from vaelab.runs import build, build_model
from vaelab.validation import validate

log = logging.getLogger("vaelab")
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
# ${basename:${hydra:sweep.dir}} names a sweep's W&B group after its directory
OmegaConf.register_new_resolver("basename", lambda p: Path(str(p)).name, replace=True)
# a run's default directory: its start time and a short random id, so two runs started in the same second
# (another seed, another user on the same file system) never share one
_STARTED = f"{datetime.now().strftime('%Y-%m-%d_%H-%M-%S')}_{secrets.token_hex(3)}"


def _comparable(overrides) -> list[str]:
    return sorted(str(o) for o in overrides if not str(o).startswith(("resume=", "hydra.")))


def _finished(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def run_dir(base: str, resume, overrides) -> str:
    """The run directory: a new timestamped one, or with resume=auto the newest unfinished run of the same
    command (same overrides, resume= aside) that has a checkpoints/last.ckpt to continue from."""
    fresh = f"{base}/{_STARTED}"
    if str(resume) != "auto":
        return fresh
    want, found = _comparable(overrides), []
    for d in Path(base).glob("*"):
        overrides_file, last = d / ".hydra" / "overrides.yaml", d / "checkpoints" / "last.ckpt"
        if overrides_file.is_file() and last.is_file() and not _finished(d):
            if _comparable(OmegaConf.load(overrides_file)) == want:
                found.append((last.stat().st_mtime, str(d)))
    return max(found)[1] if found else fresh


def sweep_dir(base: str, resume, overrides) -> str:
    """A sweep's directory: a new one, or with resume=auto the newest sweep of the same command (the same
    overrides, resume= aside, as its multirun.yaml records them), whose unfinished jobs then continue and whose
    finished jobs are not trained again. Resolved once per process: Hydra resolves it again for each job, whose
    own overrides are one point of the sweep's."""
    if base in _SWEEP_DIRS:
        return _SWEEP_DIRS[base]
    _SWEEP_DIRS[base] = _find_sweep_dir(base, resume, overrides)
    return _SWEEP_DIRS[base]


_SWEEP_DIRS: dict[str, str] = {}


def _find_sweep_dir(base: str, resume, overrides) -> str:
    fresh = f"{base}/{_STARTED}"
    if str(resume) != "auto":
        return fresh
    want, found = _comparable(overrides), []
    for d in Path(base).glob("*"):
        saved = d / "multirun.yaml"
        if saved.is_file():
            task = OmegaConf.select(OmegaConf.load(saved), "hydra.overrides.task", default=None)
            if task is not None and _comparable(task) == want:
                found.append((saved.stat().st_mtime, str(d)))
    return max(found)[1] if found else fresh


OmegaConf.register_new_resolver("vaelab_run_dir", run_dir, replace=True)
OmegaConf.register_new_resolver("vaelab_sweep_dir", sweep_dir, replace=True)


def check_consistency(cfg: DictConfig, datamodule) -> None:
    """Checks across config groups, before anything trains."""
    lik = cfg.likelihood.get("name", "")
    if lik == "gaussian" and datamodule.is_binary:
        raise ConfigError(
            f"likelihood=gaussian does not fit binarised data (data.binarize={datamodule.binarize}); "
            "use likelihood=bernoulli, or data.binarize=none for grey-scale images"
        )
    if lik == "bernoulli" and not datamodule.is_binary and datamodule.name == "cifar10":
        raise ConfigError("likelihood=bernoulli does not fit colour images (data=cifar10); use likelihood=gaussian")


def resume_from(cfg: DictConfig, out_dir: Path) -> str | None:
    """The checkpoint to continue from: ckpt_path if given, else with resume=auto the run's last.ckpt."""
    resume = cfg.get("resume")
    if resume not in (None, "auto"):
        raise ConfigError(f"resume must be auto or null, got {resume!r}; to start from a file use ckpt_path=...")
    if cfg.get("ckpt_path"):
        return str(cfg.ckpt_path)
    last = out_dir / "checkpoints" / "last.ckpt"
    requeued = bool(os.environ.get("SUBMITIT_EXECUTOR")) and (out_dir / "run_state.json").is_file()
    return str(last) if (resume == "auto" or requeued) and last.is_file() else None


def _run_state(out_dir: Path) -> dict:
    """What survives a preemption besides the checkpoint: W&B run id, training time, preemption count."""
    try:
        return json.loads((out_dir / "run_state.json").read_text())
    except (OSError, ValueError):
        return {"train_time_s": 0.0, "preemptions": 0, "wandb_run_id": None}


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; return its results (also written to results.json)."""
    validate(cfg)
    out_dir = Path(cfg.paths.output_dir)
    if cfg.get("resume") == "auto" and _finished(out_dir):  # a resumed sweep: this job is done already
        print(f"vaelab: {out_dir} has finished already; not trained again.", flush=True)
        return json.loads((out_dir / "results.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(matmul_precision(cfg.get("matmul_precision", "auto"),
                                                        str(cfg.trainer.get("accelerator", "auto"))))
    ckpt_path = resume_from(cfg, out_dir)
    state = _run_state(out_dir) if ckpt_path else {"train_time_s": 0.0, "preemptions": 0, "wandb_run_id": None}

    datamodule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_consistency(cfg, datamodule)
    model = build_model(cfg, datamodule.image_shape)
    if cfg.prior.get("init") == "data" and hasattr(model.prior, "init_from_data") and not ckpt_path:
        model.prior.init_from_data(datamodule.train_images())
    if ckpt_path:  # refuse a broken or foreign checkpoint before anything starts
        check_weights(model, model_state(load_checkpoint(ckpt_path)), ckpt_path)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    trainer_cfg = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                                    if k != "steps_per_execution"})  # vaelab's key, not a Trainer argument
    module = VAEModule(model, run_config=run_config, steps_per_execution=cfg.trainer.get("steps_per_execution", 1),
                       cuda_graphs=cfg.get("cuda_graphs", "auto"), **cfg.loss, **cfg.optim, **cfg.eval)
    if cfg.get("compile"):  # opt-in: compile the training objective's graph (weights stay those of `model`)
        model.elbo_terms = torch.compile(model.elbo_terms)

    if state.get("wandb_run_id") and cfg.get("logger") and "wandb" in cfg.logger:
        with open_dict(cfg):
            cfg.logger.wandb.run_id = state["wandb_run_id"]  # continue the same W&B run
    callbacks = [build(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]
    if not cfg.trainer.get("enable_progress_bar", True):  # the bar is configured in callbacks/, switched off here
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [build(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    for lg in loggers:
        if isinstance(lg, WandbLogger) and rank_zero_only.rank == 0:  # other DDP ranks hold no W&B run
            lg.log_hyperparams(run_config)
            lg.experiment.config.update(
                {"kl_estimator": KL_DESCRIPTION[model.prior.analytic_kl]}, allow_val_change=True)
            state["wandb_run_id"] = lg.experiment.id
    try:
        trainer: L.Trainer = build(trainer_cfg, callbacks=callbacks, logger=loggers)
    except InstantiationException as exc:
        if not isinstance(exc.__cause__, (MisconfigurationException, ValueError, TypeError)):
            raise
        _finish_wandb(loggers)
        reason = str(exc.__cause__).splitlines()[0]
        raise ConfigError(f"Lightning rejected the trainer config (conf/trainer/): {reason}") from None

    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except Preempted as stop:
        return _preempted(stop, trainer, loggers, state, out_dir, time.perf_counter() - t0)
    except RuntimeError as exc:
        if trainer.world_size > 1 and _collective_failed(exc):
            _finish_wandb(loggers)
            raise _lost_process(trainer) from None
        raise
    train_time = state["train_time_s"] + time.perf_counter() - t0

    # the last epoch's train/ and val/ figures; test/ ones follow from the best checkpoint
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/", "perf/"))}
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    if best is not None:
        metrics["val/best_loss"] = float(best)
    test_time = 0.0
    if cfg.get("test", True):
        ckpt = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        t1 = time.perf_counter()
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt or None, weights_only=True)
        test_time = time.perf_counter() - t1
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    results = {
        "status": "finished",
        "model": cfg.model.get("name", cfg.model._target_),
        "prior": cfg.prior.get("name", "standard"),
        "likelihood": cfg.likelihood.get("name", ""),
        "data": cfg.data.name,
        "binarize": cfg.data.binarize,
        "seed": cfg.seed,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "train_time_s": round(train_time, 2),
        "test_time_s": round(test_time, 2),
        "preemptions": state["preemptions"],
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "importance_samples": cfg.eval.importance_samples,
        "kl_estimator": KL_DESCRIPTION[model.prior.analytic_kl],
        "best_checkpoint": trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None,
        "metrics": metrics,
        "run_dir": str(out_dir),
    }
    wandb_dir = None
    for lg in loggers:
        if isinstance(lg, WandbLogger) and trainer.is_global_zero:
            log_checkpoints_offline(lg, trainer.checkpoint_callback)
            wandb_dir = wandb_run_dir(lg)
            results["wandb"] = {"id": lg.experiment.id, "mode": lg.experiment.settings.mode,
                                "dir": str(wandb_dir) if wandb_dir else None}
    if trainer.is_global_zero:
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        _print_summary(results, out_dir, wandb_dir)
    _finish_wandb(loggers)
    return results


def _collective_failed(exc: BaseException) -> bool:
    """A DDP collective that timed out or lost its peer (torch's DistError, or gloo's and NCCL's messages)."""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "NCCL"))


def _lost_process(trainer: L.Trainer) -> DistributedError:
    """One sentence for a DDP run whose other processes stopped answering; the processes this one started are
    stopped too, so that none is left behind, frozen or waiting."""
    import signal

    from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

    launcher = getattr(trainer.strategy, "launcher", None)
    if isinstance(launcher, _SubprocessScriptLauncher):
        launcher.kill(signal.SIGKILL)
    timeout = getattr(trainer.strategy, "_timeout", None)
    seconds = f"{timeout.total_seconds():.0f} s" if timeout is not None else "the collective timeout"
    return DistributedError(
        f"rank {trainer.global_rank}: another process of this DDP run stopped answering for {seconds} (frozen, "
        "killed or its node lost); checkpoints saved so far are intact: continue with resume=auto, and if the "
        "processes were only slow, raise trainer.strategy.timeout.seconds")


def _preempted(stop: Preempted, trainer, loggers, state: dict, out_dir: Path, elapsed: float) -> dict:
    """Record a preemption: the run state beside the checkpoint, a 'preempted' results.json, one message."""
    state["preemptions"] += 1
    state["train_time_s"] += elapsed
    results = {"status": "preempted", "signal": stop.signal_name, "epoch": stop.epoch, "global_step": stop.step,
               "checkpoint": str(stop.path), "metrics": {}, "run_dir": str(out_dir)}
    if trainer.is_global_zero:
        (out_dir / "run_state.json").write_text(json.dumps(state))
        (out_dir / "results.json").write_text(json.dumps(results, indent=2))
        then = ("submitit requeues the job, which continues from it" if stop.requeue else
                "Run the same command with resume=auto to continue")
        print(f"\nvaelab: stopped by {stop.signal_name} at epoch {stop.epoch}, step {stop.step}; checkpoint saved "
              f"to {stop.path}. {then}.", flush=True)
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        if wandb.run is not None:
            wandb.run.mark_preempting()
        wandb.finish(exit_code=0)
    if stop.requeue is not None and trainer.is_global_zero:
        stop.requeue()  # submitit's checkpoint-and-requeue: ends this process, to start again from the checkpoint
    return results


def _finish_wandb(loggers) -> None:
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()  # each run ends cleanly before the next (multirun) starts


def _print_summary(results: dict, out_dir: Path, wandb_dir: Path | None) -> None:
    m = results["metrics"]
    lines = [f"\nvaelab: {results['model']} / {results['prior']} prior / {results['likelihood']} on "
             f"{results['data']} ({results['binarize']}), {results['epochs']} epochs, "
             f"{results['train_time_s']:.0f} s training"]
    for key in ("test/nll", "test/elbo", "test/recon", "test/kl", "test/bpd", "test/active_units"):
        if key in m:
            lines.append(f"  {key:<18} {m[key]:.4f}")
    lines.append(f"  run directory      {out_dir}")
    lines.append(f"  sample grids       {out_dir / 'samples'}")
    if wandb_dir is not None:
        mode = results.get("wandb", {}).get("mode")
        lines.append(f"  W&B run            {wandb_dir} ({mode})")
        if mode == "offline":
            lines.append(f"  upload it later:   wandb sync {wandb_dir}")
    print("\n".join(lines), flush=True)


def objective(results: dict, name: str | None) -> float | None:
    if not name:
        return None
    value = results["metrics"].get(name)
    return float(value) if value is not None and math.isfinite(value) else float("inf")


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        results = train(cfg)
        if results["status"] == "preempted":
            sys.exit(0)
    except VaelabError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr, flush=True)
        _finish_wandb_if_running()
        if not _in_sweep():
            sys.exit(1)
        # In a sweep one bad configuration must not end the others: record it, give sweepers the worst value.
        out = Path(cfg.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"status": "failed", "error": str(exc), "metrics": {}}))
        return float("inf")
    return objective(results, cfg.get("optimized_metric"))


def _finish_wandb_if_running() -> None:
    if "wandb" in sys.modules and sys.modules["wandb"].run is not None:
        sys.modules["wandb"].finish(exit_code=1)


if __name__ == "__main__":
    main()
