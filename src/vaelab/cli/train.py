"""vaelab-train: the Hydra app. Composes conf/, builds data, model, recipe and module (config.py), loggers and
Trainer (builders.py), trains, tests on the best checkpoint, and writes what the run leaves (outcome.py:
results.json, its summary, the metric sweepers optimise)."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from vaelab.cli.builders import build_loggers, build_trainer, run_facts, say_start
from vaelab.cli.config import (
    CONF_DIR,
    build,
    build_model,
    build_recipe,
    check_consistency,
    print_config,
    validate,
)
from vaelab.cli.guard import discard_if_stub
from vaelab.cli.help import help_text  # noqa: F401 - registers ${vaelab_help:}, the text of --help
from vaelab.cli.outcome import failed_in_sweep, objective, preempted, results_of, write_results
from vaelab.cli.rundirs import RunState, finished, resume_from
from vaelab.cli.sweep_end import job_label
from vaelab.cli.sweeps import use_job_share
from vaelab.console import say
from vaelab.devices import matmul_precision
from vaelab.errors import ConfigError, VaelabError, run_or_explain
from vaelab.training.callbacks import Preempted, Preemption
from vaelab.training.checkpoints import (
    check_fits,
    load_checkpoint,
    prune_untracked,
    readable_checkpoints,
    remove_temporaries,
    saved_entries,
)
from vaelab.training.fit import fit
from vaelab.training.log_rows import EMPTY_HISTORIES
from vaelab.training.loggers import finished_on_error
from vaelab.training.module import VAEModule
from vaelab.training.runner import Solo
from vaelab.training.stops import EarlyStops

log = logging.getLogger("vaelab")
# vaelab's run guard decides who writes into a run directory (a new run gets a new one, resume=auto continues its
# own), so ModelCheckpoint's warning that checkpoints/ is not empty only repeats that a run is being resumed
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


def train(cfg: DictConfig, runner: Solo | None = None) -> dict[str, Any]:
    """Train and test one configuration; return its results (also written to results.json). runner: how the run
    trains (training/runner.py; a stacked sweep's launcher hands each member its own), alone by default. A stop
    signal during set-up is recorded (stops.py EarlyStops): the run stops, saved, once it trains."""
    early = any(str((n or {}).get("_target_", "")).endswith(".Preemption") for n in (cfg.get("callbacks") or {}).values())
    EarlyStops.watch(enabled=early)
    try:
        return _train(cfg, runner)
    finally:
        EarlyStops.restore()


def _train(cfg: DictConfig, runner: Solo | None = None) -> dict[str, Any]:
    validate(cfg)
    if cfg.get("extras", {}).get("print_config") and rank_zero_only.rank == 0:
        print_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    if not cfg.get("train", True):
        return test_only(cfg, out_dir, runner)
    if cfg.get("resume") == "auto" and finished(out_dir):  # a resumed sweep: this job is done already
        say(f"vaelab: {out_dir} has finished already; not trained again.")
        return json.loads((out_dir / "results.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        state, ckpt_path, datamodule, model, module, loggers, trainer = set_up(cfg, out_dir, runner)
    except VaelabError:
        discard_if_stub(out_dir)  # a refused start (missing data, a foreign checkpoint) leaves no stub directory
        raise
    with finished_on_error(loggers):
        return train_and_test(cfg, out_dir, state, ckpt_path, datamodule, model, module, loggers, trainer)


def train_and_test(cfg: DictConfig, out_dir: Path, state: RunState, ckpt_path, datamodule, model, module, loggers,
                   trainer: L.Trainer) -> dict[str, Any]:
    """A set-up run's training, its test on the best checkpoint and its results."""
    stop = fit(trainer, module, datamodule, ckpt_path) or finish_training(trainer, module)
    state.train_time_s = module.train_time.seconds()  # from its checkpoint's, if resumed (a kill loses no more)
    if stop is not None:
        return preempted(stop, trainer, loggers, state, out_dir)
    last = out_dir / "checkpoints" / "last.ckpt"
    if trainer.is_global_zero and last.is_file():  # Lightning never removes the checkpoint a fit resumed from
        prune_untracked(last)

    try:
        metrics, test_time = test_best(cfg, trainer, module, datamodule)
    except Preempted as stop:  # a stop signal in the test phase: training is saved; resume=auto tests again
        return preempted(stop, trainer, loggers, state, out_dir)
    results = results_of(cfg, trainer, model, metrics, state, test_time, out_dir)
    table = {**{k: results[k] for k in ("model", "prior", "posterior", "likelihood", "data", "seed")},
             **{k: v for k, v in metrics.items() if k.startswith("test/")}}
    write_results(results, trainer, loggers, out_dir, trainer.checkpoint_callback, table)
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


def test_only(cfg: DictConfig, out_dir: Path, runner: Solo | None = None) -> dict[str, Any]:
    """train=false: test ckpt_path's weights as the run's own test phase would, and write results.json."""
    if not cfg.get("ckpt_path"):
        raise ConfigError("train=false tests a checkpoint and trains nothing: give it ckpt_path=<a checkpoint>")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open_dict(cfg):  # the model is the checkpoint's, as vaelab-eval reads it: not this command's flags
            for group, node in trained_model_groups(cfg.ckpt_path).items():
                cfg[group] = node
        state, ckpt_path, datamodule, model, module, loggers, trainer = set_up(cfg, out_dir, runner)
    except VaelabError:
        discard_if_stub(out_dir)
        raise
    t0 = time.perf_counter()
    with finished_on_error(loggers):
        try:
            trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True, verbose=False)
        except Preempted as stop:
            return preempted(stop, trainer, loggers, state, out_dir)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        results = results_of(cfg, trainer, model, metrics, state, time.perf_counter() - t0, out_dir)
        results.update(trained=False, tested_checkpoint=str(ckpt_path), best_checkpoint=None)
        write_results(results, trainer, loggers, out_dir)
    return results


def trained_model_groups(ckpt_path: str) -> dict:
    """The model, prior, posterior and likelihood config groups that trained a checkpoint of vaelab-train (one
    clear sentence if it cannot be read); {} for a plain Trainer's checkpoint, whose model the config must name."""
    trained = load_checkpoint(ckpt_path).get("vaelab_config") or {}
    return {g: trained[g] for g in ("model", "prior", "posterior", "likelihood") if g in trained}


def set_up(cfg: DictConfig, out_dir: Path, runner: Solo | None = None):
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
    # a start killed before its first checkpoint left only histories: this start begins them again, in its W&B run
    # (not a finished run's: a new run written into its directory keeps its W&B run and rows apart, as before)
    restart = (not ckpt_path and cfg.get("train", True) and not finished(out_dir)
               and not readable_checkpoints(out_dir / "checkpoints")[0])
    state = RunState.load(out_dir) if ckpt_path or restart else RunState()
    datamodule, model = build_data_and_model(cfg, ckpt_path)
    run_config = OmegaConf.to_container(cfg, resolve=True)
    runner = runner or Solo()
    module = VAEModule(model, build_recipe(cfg, run_config), runner)
    if cfg.get("compile"):  # opt-in: compile the training objective's graph (weights stay those of `model`)
        model.elbo_terms = torch.compile(model.elbo_terms)
    loggers = build_loggers(cfg, state.wandb_run_id, runner.shares_process)
    own_checkpoint = ckpt_path is not None and Path(ckpt_path).parent.resolve() == (out_dir / "checkpoints").resolve()
    if own_checkpoint and rank_zero_only.rank == 0 and cfg.get("train", True):
        # this run, resumed: its histories go back to where the checkpoint left them, and the checkpoints its
        # ModelCheckpoint no longer keeps (left by a start killed between two saves) go
        loggers.rewind(saved_entries(ckpt_path, "vaelab_logs").get("vaelab_logs", {}), state.wandb_run_id)
        prune_untracked(ckpt_path)
    elif restart and rank_zero_only.rank == 0:
        loggers.rewind(EMPTY_HISTORIES, state.wandb_run_id, any_run=True)
    trainer = build_trainer(cfg, loggers)
    say_start(cfg, model, trainer, out_dir, ckpt_path)
    state.wandb_run_id = loggers.start(run_config, **run_facts(model, trainer)) or state.wandb_run_id
    if rank_zero_only.rank == 0 and cfg.get("train", True):
        with finished_on_error(loggers):
            state.save(out_dir)  # the W&B run id known from the start: a run killed outright continues the same W&B run
    return state, ckpt_path, datamodule, model, module, loggers, trainer


def build_data_and_model(cfg: DictConfig, ckpt_path: str | None):
    """The data module, set up for fitting, and the model, checked against the checkpoint to continue from."""
    datamodule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    datamodule.use_pixels(check_consistency(cfg, datamodule.is_binary, datamodule.image_shape[0]))
    model = build_model(cfg, datamodule.image_shape)
    if cfg.prior.get("init") == "data" and hasattr(model.prior, "init_from_data") and not ckpt_path:
        model.prior.init_from_data(datamodule.train_images())
    if ckpt_path:  # refuse a broken or foreign checkpoint before anything starts
        check_fits(model, ckpt_path)
    return datamodule, model


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


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig, runner: Solo | None = None) -> float | None:
    """vaelab-train's task. runner: a stacked sweep's member's (the stacked launcher hands it in); alone otherwise."""
    # a log record that cannot be written (train.log on a full disk) is dropped, not printed as a traceback:
    # the error that matters is said in one line on stderr
    logging.raiseExceptions = False
    results = run_or_explain(lambda c: train(c, runner), cfg, on_error=lambda exc: failed_in_sweep(cfg, exc), label=job_label())
    if isinstance(results, float):  # a failed run in a sweep
        return results
    if results["status"] == "preempted":
        sys.exit(0)
    return objective(results, cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
