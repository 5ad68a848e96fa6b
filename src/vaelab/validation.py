"""Config values checked before anything is built: each wrong value gets one sentence naming the key, what
it got and what is allowed. (The constructors check their own arguments too, for use without Hydra.)"""

from __future__ import annotations

import math
import numbers

from omegaconf import DictConfig, OmegaConf

from vaelab.errors import ConfigError

_INT, _NUM, _INT_OR_AUTO = "an integer", "a number", "auto or an integer"
# key: (kind, minimum, strictly greater?, or a tuple of allowed values); a key absent from the config is skipped
RULES: dict[str, tuple] = {
    "seed": (_INT, 0, False),
    "optim.lr": (_NUM, 0, True),
    "optim.weight_decay": (_NUM, 0, False),
    "optim.fused": (True, False),
    "loss.beta": (_NUM, 0, False),
    "loss.warmup_epochs": (_NUM, 0, False),
    "loss.free_bits": (_NUM, 0, False),
    "eval.importance_samples": (_INT, 0, True),
    "eval.importance_points_per_pass": (_INT_OR_AUTO, 0, True),
    "eval.check_finite_every_n_steps": (_INT, 1, False),
    "data.batch_size": (_INT, 0, True),
    "data.eval_batch_size": (_INT, 0, True),
    "data.val_size": (_INT, 0, True),
    "data.subset": (_INT, 0, True),
    "data.binarize": ("none", "static", "dynamic"),
    "data.name": ("fashion_mnist", "mnist", "cifar10", "synthetic"),
    "model.latent_dim": (_INT, 0, True),
    "model.hidden_dim": (_INT, 0, True),
    "model.num_hidden": (_INT, 0, True),
    "model.num_layers": (_INT, 0, True),
    "model.network": ("mlp", "conv"),
    "prior.num_components": (_INT, 0, True),
    "prior.init": ("random", "data"),
    "likelihood.variance": ("fixed", "learned", "per_pixel"),
    "likelihood.sigma": (_NUM, 0, True),
    "likelihood.mean_activation": ("sigmoid", "identity"),
    "logger.wandb.mode": ("auto", "online", "offline", "disabled"),
    "trainer.max_epochs": (_INT, 1, False),
    "trainer.steps_per_execution": (_INT_OR_AUTO, 1, False),
    "cuda_graphs": ("auto", True, False),
    "matmul_precision": ("auto", "highest", "high", "medium"),
    "resume": (None, "auto"),
}
NULLABLE = {"data.subset", "trainer.max_epochs", "eval.check_finite_every_n_steps"}


def _check(key: str, value, rule: tuple) -> None:
    if value is None and key in NULLABLE:
        return
    if rule and rule[0] == _INT_OR_AUTO and value == "auto":
        return
    if rule and rule[0] not in (_INT, _NUM, _INT_OR_AUTO):
        if value not in rule:
            allowed = ", ".join("null" if v is None else str(v) for v in rule)
            raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
        return
    kind, low, strict = rule
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if is_number and not math.isfinite(value):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    if not is_number or (kind != _NUM and not float(value).is_integer()):
        raise ConfigError(f"{key} must be {kind}, got {value!r}")
    if value < low or (strict and value == low):
        bound = f"greater than {low}" if strict else f"at least {low}"
        raise ConfigError(f"{key} must be {bound}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    for key, rule in RULES.items():
        node = OmegaConf.select(cfg, key, default="__absent__", throw_on_missing=False)
        if node != "__absent__":
            _check(key, node, rule)
