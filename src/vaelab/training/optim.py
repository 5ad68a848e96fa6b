"""Optimisers and learning-rate schedules as factories: what conf/optim/ and conf/scheduler/ instantiate (torch's
classes, or vaelab's AdamNormGrad, as `_partial_` targets), a plain-data spec of one (checkpoints), or a name.
Every optimiser takes the fused kernel where the device has one, and can keep its state on the device for CUDA
graphs (capturable)."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from vaelab.checks import Arg, non_negative, one_of, positive
from vaelab.errors import ConfigError


class AdamNormGrad(torch.optim.Adam):
    """Adam on gradients scaled to unit L2 norm per parameter tensor, as in the VampPrior paper's own code
    (jmtomczak/vae_vampprior, utils/optimizer.py)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(torch.linalg.vector_norm(p.grad) + 1e-7)
        super().step()
        return loss


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adam_normgrad": AdamNormGrad}
OPTIMIZER: Arg = one_of("optim.name", *OPTIMIZERS)
OPTIM_ARGS: dict[str, Arg] = {  # conf/optim/'s keys that every vaelab optimiser takes
    "lr": positive("optim.lr"), "weight_decay": non_negative("optim.weight_decay"),
    "fused": one_of("optim.fused", True, False),
}
SCHEDULERS = {"cosine": torch.optim.lr_scheduler.CosineAnnealingLR, "exponential": torch.optim.lr_scheduler.ExponentialLR,
              "plateau": torch.optim.lr_scheduler.ReduceLROnPlateau}
SCHEDULER: Arg = one_of("scheduler.name", "none", *SCHEDULERS)
SCHEDULER_OPTIONS: dict[str, Arg] = {  # conf/scheduler/<name>.yaml's keys
    "eta_min": non_negative("scheduler.eta_min"), "gamma": positive("scheduler.gamma"),
    "factor": positive("scheduler.factor"), "patience": Arg("scheduler.patience", "int", 0),
    "min_lr": non_negative("scheduler.min_lr"), "T_max": Arg("scheduler.T_max", "int", 1),
}

Factory = Callable[..., Any]  # a class, or functools.partial of one, called with the parameters (or optimiser)


def as_spec(factory: Factory | None) -> dict | None:
    """A factory as plain data for a checkpoint ({"_target_": class path, **keywords}), None for none."""
    if factory is None:
        return None
    if isinstance(factory, functools.partial) and isinstance(factory.func, type) and not factory.args:
        return {"_target_": f"{factory.func.__module__}.{factory.func.__qualname__}", **factory.keywords}
    if isinstance(factory, type):
        return {"_target_": f"{factory.__module__}.{factory.__qualname__}"}
    raise ConfigError(f"{factory!r} is not a class or a functools.partial of one; pass an optimiser or scheduler "
                      "class, or conf/optim/'s _target_ with _partial_: true")


def from_spec(spec: dict, base: type | tuple[type, ...]) -> Factory:
    """The factory a plain-data spec names: only a subclass of `base` (an optimiser, a scheduler) is accepted."""
    module, _, name = str(spec["_target_"]).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"{spec['_target_']} cannot be imported; install the package that defines it") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ConfigError(f"{spec['_target_']} is not an optimiser or learning-rate scheduler class")
    return functools.partial(cls, **{k: v for k, v in spec.items() if k != "_target_"})


def optimizer_factory(optimizer: str | dict | Factory, lr: float, weight_decay: float, fused: bool) -> Factory:
    """What builds the optimiser from the parameters: a factory as given (conf/optim/ instantiates one, e.g.
    torch.optim.SGD with momentum), one from a checkpoint's spec, or by name (adam | adamw | adam_normgrad) with
    lr, weight_decay and fused."""
    if isinstance(optimizer, str):
        return functools.partial(OPTIMIZERS[OPTIMIZER.check(optimizer)], lr=lr, weight_decay=weight_decay, fused=fused)
    if isinstance(optimizer, dict):
        return from_spec(optimizer, torch.optim.Optimizer)
    return optimizer


def scheduler_factory(scheduler: str | dict | Factory | None, options: dict | None = None,
                      max_epochs: int | None = None) -> Factory | None:
    """What builds the learning-rate schedule from the optimiser (None: a constant rate): a factory as given, one
    from a checkpoint's spec, or by name (none | cosine | plateau | exponential) with its options. Stepped once per
    epoch (plateau: on val/loss). cosine: from lr to eta_min over max_epochs; exponential: lr * gamma^epoch;
    plateau: lr * factor after `patience` epochs without a better val/loss."""
    if scheduler is None or scheduler == "none":
        return None
    if isinstance(scheduler, dict):
        return from_spec(scheduler, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau))
    if not isinstance(scheduler, str):
        return scheduler
    options = dict(options or {})
    for key, value in options.items():
        if key in SCHEDULER_OPTIONS:
            SCHEDULER_OPTIONS[key].check(value)
    if scheduler == "cosine":
        return functools.partial(SCHEDULERS["cosine"], T_max=max(1, max_epochs or 1), eta_min=options.get("eta_min", 0.0))
    if scheduler == "exponential":
        return functools.partial(SCHEDULERS["exponential"], gamma=options.get("gamma", 0.98))
    SCHEDULER.check(scheduler)
    return functools.partial(SCHEDULERS["plateau"], mode="min", factor=options.get("factor", 0.5),
                             patience=options.get("patience", 5), min_lr=options.get("min_lr", 0.0))


def build_optimizer(factory: Factory, params: list[nn.Parameter], capturable: bool = False) -> torch.optim.Optimizer:
    """The optimiser over `params`. With fused=True and no fused kernel for the parameters' device or dtype (torch
    checks this when the optimiser is built), torch's default implementation of the same algorithm. capturable:
    keep the step count on the device, so that the step can be captured in a CUDA graph (for optimisers that have
    that option)."""
    extra = {"capturable": True} if capturable and "capturable" in inspect.signature(factory).parameters else {}
    try:
        return factory(params, **extra)
    except RuntimeError:  # no fused kernel for this device or dtype
        if not (isinstance(factory, functools.partial) and factory.keywords.get("fused")):
            raise
        return factory(params, **extra, fused=False)


def adam(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0, fused: bool = True,
         capturable: bool = False) -> torch.optim.Adam:
    return build_optimizer(optimizer_factory("adam", lr, weight_decay, fused), params, capturable)
