"""vaelab-train: the Hydra app. Composes conf/, builds data, model, module, callbacks, loggers and Trainer,
trains, tests on the best checkpoint, writes results.json and returns the metric sweepers optimise."""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.callbacks.progress import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab.cli.config import CONF_DIR, build, build_model, check_consistency, print_config, spec, validate
from vaelab.cli.guard import discard_if_stub
from vaelab.cli.help import help_text  # noqa: F401 - registers ${vaelab_help:}, the text of --help
from vaelab.cli.rundirs import RunState, finished, resume_from, save_json
from vaelab.cli.sweeps import use_job_share
from vaelab.console import say
from vaelab.devices import matmul_precision
from vaelab.errors import ConfigError, SaveError, VaelabError, run_or_explain
from vaelab.training.callbacks import Preempted, Preemption
from vaelab.training.checkpoints import AtomicCheckpointIO, check_fits, load_checkpoint, remove_temporaries
from vaelab.training.fit import fit
from vaelab.training.loggers import RunLoggers, finish_any_wandb_run
from vaelab.training.module import VAEModule

log = logging.getLogger("vaelab")
# vaelab's run guard decides who writes into a run directory (a new run gets a new one, resume=auto continues its
# own), so ModelCheckpoint's warning that checkpoints/ is not empty only repeats that a run is being resumed
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
# conf/trainer keys that VAEModule takes, not the Trainer (manual optimisation: vaelab runs and clips the steps)
VAELAB_TRAINER_KEYS = ("steps_per_execution", "gradient_clip_val")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train and test one configuration; return its results (also written to results.json)."""
    validate(cfg)
    if cfg.get("extras", {}).get("print_config") and rank_zero_only.rank == 0:
        print_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    if not cfg.get("train", True):
        return test_only(cfg, out_dir)
    if cfg.get("resume") == "auto" and finished(out_dir):  # a resumed sweep: this job is done already
        say(f"vaelab: {out_dir} has finished already; not trained again.")
        return json.loads((out_dir / "results.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        state, ckpt_path, datamodule, model, module, loggers, trainer = set_up(cfg, out_dir)
    except VaelabError:
        discard_if_stub(out_dir)  # a refused start (missing data, a foreign checkpoint) leaves no stub directory
        raise

    t0 = time.perf_counter()
    stop = fit(trainer, module, datamodule, ckpt_path) or finish_training(trainer, module)
    state.train_time_s += time.perf_counter() - t0
    if stop is not None:
        return preempted(stop, trainer, loggers, state, out_dir)

    try:
        metrics, test_time = test_best(cfg, trainer, module, datamodule)
    except Preempted as stop:  # a stop signal in the test phase: training is saved; resume=auto tests again
        return preempted(stop, trainer, loggers, state, out_dir)
    results = results_of(cfg, trainer, model, metrics, state, test_time, out_dir)
    if trainer.is_global_zero:
        results["wandb"], wandb_dir = loggers.results(trainer.checkpoint_callback)
        if results["wandb"] is None:
            del results["wandb"]
        save_json(out_dir / "results.json", results)
        loggers.log_results({**{k: results[k] for k in ("model", "prior", "posterior", "likelihood", "data", "seed")},
                             **{k: v for k, v in metrics.items() if k.startswith("test/")}})
        print_summary(results, out_dir, wandb_dir)
    loggers.finish()
    return results


def finish_training(trainer: L.Trainer, module) -> Preempted | None:
    """Once training has ended: save it whole (last.ckpt with its loops complete), so that a stop from here on
    resumes to the test phase; a stop signal that came since the last step is that stop (phase "test")."""
    preemption = next((c for c in trainer.callbacks if isinstance(c, Preemption)), None)
    if preemption is None:
        return None
    preemption.watch()  # Lightning's fit restored its own handlers: signals from here on still only raise the flag
    preemption.save_finished(trainer, module)
    if not preemption.agreed(trainer, module):
        return None
    return Preempted(preemption.signal_name or "SIGTERM", trainer.current_epoch, trainer.global_step, preemption.path,
                     preemption.requeue_handler(), phase="test")


def test_only(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """train=false: test ckpt_path's weights as the run's own test phase would, and write results.json."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("train=false tests a checkpoint and trains nothing: give it ckpt_path=<a checkpoint>")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open_dict(cfg):  # the model is the checkpoint's, as vaelab-eval reads it: not this command's flags
            for group, node in trained_model_groups(cfg.ckpt_path).items():
                cfg[group] = node
        state, ckpt_path, datamodule, model, module, loggers, trainer = set_up(cfg, out_dir)
    except VaelabError:
        discard_if_stub(out_dir)
        raise
    t0 = time.perf_counter()
    try:
        trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True, verbose=False)
    except Preempted as stop:
        return preempted(stop, trainer, loggers, state, out_dir)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    results = results_of(cfg, trainer, model, metrics, state, time.perf_counter() - t0, out_dir)
    results.update(trained=False, tested_checkpoint=str(ckpt_path), best_checkpoint=None)
    if trainer.is_global_zero:
        results["wandb"], wandb_dir = loggers.results(None)
        if results["wandb"] is None:
            del results["wandb"]
        save_json(out_dir / "results.json", results)
        print_summary(results, out_dir, wandb_dir)
    loggers.finish()
    return results


def trained_model_groups(ckpt_path: str) -> dict:
    """The model, prior, posterior and likelihood config groups that trained a checkpoint of vaelab-train (one
    clear sentence if it cannot be read); {} for a plain Trainer's checkpoint, whose model the config must name."""
    trained = load_checkpoint(ckpt_path).get("vaelab_config") or {}
    return {g: trained[g] for g in ("model", "prior", "posterior", "likelihood") if g in trained}


def set_up(cfg: DictConfig, out_dir: Path):
    """Everything before training: seeds, the checkpoint to continue from, data, model, module, loggers, trainer."""
    L.seed_everything(cfg.seed, workers=True)
    use_job_share(cfg)  # under hydra/launcher=joblib: this job's GPU (i mod G) and its share of the cores
    torch.set_float32_matmul_precision(matmul_precision(cfg.get("matmul_precision", "auto"),
                                                        str(cfg.trainer.get("accelerator", "auto"))))
    if rank_zero_only.rank == 0:
        remove_temporaries(out_dir / "checkpoints")
    ckpt_path, skipped = resume_from(cfg, out_dir)
    if skipped and rank_zero_only.rank == 0:
        say(skipped)
    state = RunState.load(out_dir) if ckpt_path else RunState()
    datamodule, model = build_data_and_model(cfg, ckpt_path)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    module = build_module(cfg, model, run_config)
    if cfg.get("compile"):  # opt-in: compile the training objective's graph (weights stay those of `model`)
        model.elbo_terms = torch.compile(model.elbo_terms)
    loggers = build_loggers(cfg, state.wandb_run_id)
    trainer = build_trainer(cfg, loggers)
    say_start(cfg, model, trainer, out_dir, ckpt_path)
    state.wandb_run_id = loggers.start(run_config, **run_facts(model, trainer)) or state.wandb_run_id
    return state, ckpt_path, datamodule, model, module, loggers, trainer


def build_data_and_model(cfg: DictConfig, ckpt_path: str | None):
    """The data module, set up for fitting, and the model, checked against the checkpoint to continue from."""
    datamodule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    check_consistency(cfg, datamodule.is_binary, datamodule.image_shape[0])
    model = build_model(cfg, datamodule.image_shape)
    if cfg.prior.get("init") == "data" and hasattr(model.prior, "init_from_data") and not ckpt_path:
        model.prior.init_from_data(datamodule.train_images())
    if ckpt_path:  # refuse a broken or foreign checkpoint before anything starts
        check_fits(model, ckpt_path)
    return datamodule, model


def build_module(cfg: DictConfig, model, run_config: dict) -> VAEModule:
    """VAEModule with what loss/, optim/ and scheduler/ instantiate (the objective; the optimiser and schedule as
    partials it calls with the parameters and the optimiser), the eval keys and vaelab's trainer keys."""
    scheduler = cfg.get("scheduler")
    return VAEModule(model, run_config=run_config, steps_per_execution=cfg.trainer.get("steps_per_execution", 1),
                     cuda_graphs=cfg.get("cuda_graphs", "auto"), gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
                     optimizer=build(spec(cfg.optim)), loss=build(cfg.loss),
                     scheduler=build(spec(scheduler)) if scheduler and scheduler.get("_target_") else None, **cfg.eval)


def build_loggers(cfg: DictConfig, wandb_run_id: str | None) -> RunLoggers:
    """The configured loggers; W&B continues the run's W&B run on a resume and takes the top-level `tags` too."""
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
        loggers.append(build(node, **extra))
    return RunLoggers(loggers)


def sweep_group() -> str | None:
    """The W&B group of a multirun's jobs when run_group does not name one: sweep-<the sweep directory's name>."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return f"sweep-{Path(HydraConfig.get().sweep.dir).name}"


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
    trainer_cfg = OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                                    if k not in VAELAB_TRAINER_KEYS})
    try:
        # checkpoints are written atomically beside their destination, and checked (AtomicCheckpointIO)
        return build(trainer_cfg, callbacks=callbacks, logger=loggers.loggers, plugins=[AtomicCheckpointIO()])
    except InstantiationException as exc:
        if not isinstance(exc.__cause__, (MisconfigurationException, ValueError, TypeError)):
            raise
        loggers.finish()
        reason = str(exc.__cause__).splitlines()[0]
        raise ConfigError(f"Lightning rejected the trainer config (conf/trainer/): {reason}") from None


def test_best(cfg: DictConfig, trainer: L.Trainer, module, datamodule) -> tuple[dict[str, float], float]:
    """The last epoch's train/, val/ and perf/ figures, and the test/ ones of the best checkpoint (by val/loss);
    and the seconds testing took."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/", "perf/"))}
    checkpoints = trainer.checkpoint_callback
    if checkpoints is not None and checkpoints.best_model_score is not None:
        metrics["val/best_loss"] = float(checkpoints.best_model_score)
    if not cfg.get("test", True):
        return metrics, 0.0
    t0 = time.perf_counter()
    best = checkpoints.best_model_path if checkpoints is not None else ""
    # verbose=False: Lightning's table of test metrics repeats what print_summary prints
    trainer.test(module, datamodule=datamodule, ckpt_path=best or None, weights_only=True, verbose=False)
    metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
    return metrics, time.perf_counter() - t0


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
    lines.append(f"  run directory      {out_dir}")
    if any((out_dir / "samples").glob("*.png")):  # none with callbacks=none (no image grids callback)
        lines.append(f"  sample grids       {out_dir / 'samples'}")
    if wandb_dir is not None:
        mode = results.get("wandb", {}).get("mode")
        lines.append(f"  W&B run            {wandb_dir} ({mode})")
        if mode == "offline":
            lines.append(f"  upload it later:   wandb sync {shlex.quote(str(wandb_dir))}")
    say("\n".join(lines))


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def objective(results: dict, name: str | None) -> float | None:
    """The value sweepers (Optuna) optimise: a metric of the run, infinity when it is missing or not finite."""
    if not name:
        return None
    value = results["metrics"].get(name)
    return float(value) if value is not None and math.isfinite(value) else float("inf")


def failed_in_sweep(cfg: DictConfig, exc: VaelabError) -> float | None:
    """After a run's one-line error: end its W&B run; in a sweep, record the failure (results.json) and give
    sweepers the worst value, so that one bad configuration does not end the others. A file that cannot be saved
    (a full disk, a read-only directory) is no configuration's fault and would fail every job after it: it ends the
    sweep, with a non-zero exit, as it ends a run alone."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    logging.getLogger("vaelab.console").error("error: %s", exc)  # train.log only: stderr has the line already
    finish_any_wandb_run(exit_code=1)
    if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN) or isinstance(exc, SaveError):
        return None
    out = Path(cfg.paths.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "results.json", {"status": "failed", "error": str(exc), "metrics": {}})
    except VaelabError:
        pass  # the run's own error (a full disk, say) was said already
    return float("inf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    # a log record that cannot be written (train.log on a full disk) is dropped, not printed as a traceback:
    # the error that matters is said in one line on stderr
    logging.raiseExceptions = False
    results = run_or_explain(train, cfg, on_error=lambda exc: failed_in_sweep(cfg, exc))
    if isinstance(results, float):  # a failed run in a sweep
        return results
    if results["status"] == "preempted":
        sys.exit(0)
    return objective(results, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
