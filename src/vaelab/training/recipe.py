"""TrainingRecipe: everything VAEModule needs besides the model, as one value. vaelab-train makes it from the config
(cli/config.py's build_recipe: loss/, optim/ and scheduler/ instantiated, eval/, cuda_graphs and the trainer keys
that are vaelab's); in Python it is made by hand from the same objects. A checkpoint keeps it as plain data (spec),
so VAEModule.load_from_checkpoint rebuilds it without unpickling anything."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import torch

from vaelab.checks import Arg, check_args, one_of, positive
from vaelab.errors import ConfigError
from vaelab.evaluation.metrics import IMPORTANCE_ARGS
from vaelab.training.objective import Loss
from vaelab.training.optim import Factory, as_spec, from_spec, optimizer_factory, scheduler_factory

SCHEDULER_BASES = (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)


def default_optimizer() -> Factory:
    """conf/optim/adam.yaml's optimiser: Adam, lr 5e-4, the fused kernel where the device has one."""
    return functools.partial(torch.optim.Adam, lr=5e-4, weight_decay=0.0, fused=True)


@dataclass(frozen=True)
class TrainingRecipe:
    """How a VAE is trained and tested.

    loss: the objective (objective.Loss: beta, KL warm-up, free bits).
    optimizer: called with the parameters (a torch.optim class or a functools.partial of one, as conf/optim/
        instantiates it); fused=True falls back to torch's default kernel where the device has no fused one.
    scheduler: called with the optimiser (conf/scheduler/), or None for a constant rate; stepped once per epoch
        (ReduceLROnPlateau on val/loss), the rate logged as train/lr.
    gradient_clip_val: clip the gradients' global L2 norm to this before each optimiser step (None: off). Under
        manual optimisation Lightning's Trainer(gradient_clip_val) is not allowed; vaelab clips itself.
    gradient_skip_threshold: skip an update whose gradient norm (before clipping) is above this, as VDVAE does, and
        count it (train/skipped_steps); None: never (stabilisers.py).
    ema_rate: keep an exponential moving average of the weights with this rate (VDVAE: 0.9999), used for validation,
        test, sample grids and the checkpoint's evaluation copy; 0: none (stabilisers.py).
    steps_per_execution: optimiser steps per Lightning step (each on its own batch), or "auto" (engine.AUTO_STEPS).
    cuda_graphs: "auto" (capture the whole step as a CUDA graph when training on one CUDA device and it can be
        captured; else eager, saying why), True (the same, but refuse to start when it cannot), False.
    check_finite_every_n_steps: steps between NaN/inf checks (one host-device sync each); None: the engine's
        default for the device (engine.CHECK_EVERY).
    importance_samples, importance_points_per_pass, importance_seed: test/nll's K, memory budget and seed
        (evaluation/metrics.py).
    config: the run's whole config as plain data (vaelab-train's); saved in every checkpoint, so that vaelab-eval
        and -sample rebuild the run's data too. With one, the app logs the config itself and Lightning's copy of
        the hyper-parameters goes to no logger.
    """

    loss: Loss = field(default_factory=Loss)
    optimizer: Factory = field(default_factory=default_optimizer)
    scheduler: Factory | None = None
    gradient_clip_val: float | None = None
    gradient_skip_threshold: float | None = None
    ema_rate: float = 0.0
    steps_per_execution: int | str = 1
    cuda_graphs: bool | str = "auto"
    check_finite_every_n_steps: int | None = None
    importance_samples: int = 1000
    importance_points_per_pass: int | str = "auto"
    importance_seed: int = 0
    config: dict | None = None

    ARGS: ClassVar[dict[str, Arg]] = {  # named by their config keys: conf/train.yaml's eval, cuda_graphs; conf/trainer
        "importance_samples": IMPORTANCE_ARGS["importance_samples"],
        "importance_points_per_pass": IMPORTANCE_ARGS["points_per_pass"],
        "check_finite_every_n_steps": Arg("eval.check_finite_every_n_steps", "int", 1, nullable=True),
        "importance_seed": Arg("eval.importance_seed", "int", 0),
        "steps_per_execution": Arg("trainer.steps_per_execution", "int", 1, auto=True),
        "cuda_graphs": one_of("cuda_graphs", "auto", True, False),
        "gradient_clip_val": positive("trainer.gradient_clip_val", nullable=True),
        "gradient_skip_threshold": positive("trainer.gradient_skip_threshold", nullable=True),
        "ema_rate": Arg("trainer.ema_rate", "number", 0.0),
    }

    def __post_init__(self) -> None:
        check_args(self.ARGS, {f.name: getattr(self, f.name) for f in fields(self)})
        if not 0 <= self.ema_rate < 1:
            raise ConfigError(f"trainer.ema_rate={self.ema_rate} must be in [0, 1): the weight the average keeps at each "
                              "step (0.999 or 0.9999 are usual; 0: no average)")
        if not isinstance(self.loss, Loss):
            raise TypeError(f"loss must be a vaelab.training.objective.Loss, got {type(self.loss).__name__}")
        as_spec(self.optimizer), as_spec(self.scheduler)  # a class or a partial of one: one sentence otherwise

    def spec(self) -> dict[str, Any]:
        """The recipe as plain data (a checkpoint's hyper-parameters); `config` is kept beside it (vaelab_config)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("loss", "optimizer",
                                                                                         "scheduler", "config")}
        return {"loss": asdict(self.loss), "optimizer": as_spec(self.optimizer), "scheduler": as_spec(self.scheduler),
                **plain}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TrainingRecipe:
        """The recipe a checkpoint's spec describes; only optimiser and scheduler classes can be named there."""
        spec = dict(spec)
        scheduler = spec.pop("scheduler", None)
        return cls(loss=Loss(**spec.pop("loss", {})),
                   optimizer=from_spec(spec.pop("optimizer"), torch.optim.Optimizer),
                   scheduler=None if scheduler is None else from_spec(scheduler, SCHEDULER_BASES), **spec)

    @classmethod
    def from_flat(cls, hparams: dict[str, Any]) -> TrainingRecipe:
        """The recipe of a checkpoint saved before there was one, by VAEModule's former flat arguments (lr, beta,
        optimizer by name or spec, ...): VAEModule.load_from_checkpoint still reads those."""
        hp = dict(hparams)
        loss = hp.get("loss") or {k: hp[k] for k in ("beta", "warmup_epochs", "free_bits") if k in hp}
        optimizer = optimizer_factory(hp.get("optimizer", "adam"), hp.get("lr", 5e-4), hp.get("weight_decay", 0.0),
                                      hp.get("fused", True))
        scheduler = scheduler_factory(hp.get("scheduler"), hp.get("scheduler_options"))
        kept = {f.name: hp[f.name] for f in fields(cls) if f.name in hp and f.name not in ("loss", "optimizer",
                                                                                             "scheduler", "config")}
        return cls(loss=Loss(**loss), optimizer=optimizer, scheduler=scheduler, **kept)


RECIPE_KEYS = frozenset(f.name for f in fields(TrainingRecipe))  # conf/trainer's keys that are the recipe's, not the Trainer's
