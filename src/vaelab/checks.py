"""Argument checks shared by every layer. Each class declares its arguments' allowed values and ranges once,
as `ARGS` beside its constructor; the constructor checks them, and config validation (cli/config.py) reads the
same declarations, so a wrong value gets the same sentence with or without Hydra."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

from vaelab.errors import ConfigError


@dataclass(frozen=True)
class Arg:
    """One argument's rule. `key` names it in messages (its config key, e.g. "model.latent_dim"); config
    validation names it by where it sits in the config instead."""

    key: str
    kind: str = "number"  # "int" | "number" | "choice"
    low: float | None = None
    strict: bool = False  # low itself is not allowed
    choices: tuple = ()
    auto: bool = False  # "auto" is allowed too
    nullable: bool = False  # None (null) is allowed too
    high: float | None = None  # the largest value allowed (what fits memory, say)

    def check(self, value, key: str | None = None):
        """Return value, or raise ConfigError with one sentence naming the key, the value and what is allowed."""
        key = key or self.key
        if (value is None and self.nullable) or (value == "auto" and self.auto):
            return value
        if self.kind == "choice":
            if value not in self.choices:
                allowed = ", ".join("null" if v is None else str(v) for v in self.choices)
                raise ConfigError(f"{key} must be one of {allowed}, got {value!r}")
            return value
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if is_number and not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if not is_number or (self.kind == "int" and not isinstance(value, numbers.Integral)):
            kind = "an integer" if self.kind == "int" else "a number"
            raise ConfigError(f"{key} must be {'auto or ' if self.auto else ''}{kind}, got {value!r}")
        if self.low is not None and (value < self.low or (self.strict and value == self.low)):
            bound = f"greater than {self.low}" if self.strict else f"at least {self.low}"
            raise ConfigError(f"{key} must be {bound}, got {value!r}")
        if self.high is not None and value > self.high:
            raise ConfigError(f"{key} must be at most {self.high:g}, got {value!r}")
        return value


def positive_int(key: str, **kw) -> Arg:
    return Arg(key, "int", 0, strict=True, **kw)


def non_negative(key: str, **kw) -> Arg:
    return Arg(key, "number", 0, **kw)


def positive(key: str, **kw) -> Arg:
    return Arg(key, "number", 0, strict=True, **kw)


def one_of(key: str, *choices) -> Arg:
    return Arg(key, "choice", choices=tuple(choices))


def check_args(args: Mapping[str, Arg], values: Mapping) -> None:
    """Check every argument in `values` (e.g. a constructor's locals()) that `args` has a rule for."""
    for name, arg in args.items():
        if name in values:
            arg.check(values[name])
