"""A model as plain data: class paths and constructor arguments, which a checkpoint stores beside the weights so
that the model can be rebuilt without Hydra, its config or its data set (build.py, `load_model`). A leaf of
models/: the parts import it, it imports none of them."""

from __future__ import annotations

import functools
import importlib
import inspect

from vaelab.errors import CheckpointError


def qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def constructor_args(init, values: dict, skip: tuple[str, ...] = ()) -> dict:
    """The named arguments of a constructor, read from its locals() (`values`), `skip` and self left out."""
    params = inspect.signature(init).parameters.values()
    named = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return {k: values[k] for k in named if k != "self" and k not in skip and k in values}


def factory_spec(factory) -> dict | None:
    """A prior factory (a class, or functools.partial of one with keyword arguments) as plain data."""
    if isinstance(factory, functools.partial) and isinstance(factory.func, type) and not factory.args:
        return {"_target_": qualified_name(factory.func), **factory.keywords}
    if isinstance(factory, type):
        return {"_target_": qualified_name(factory)}
    return None


def locate(path: str, base: type) -> type:
    """The class a spec names, which must be a subclass of `base`: a checkpoint never names a callable to run."""
    module, _, name = str(path).rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise CheckpointError(f"the checkpoint's model names {path}, which cannot be imported here; install the "
                              "package that defines it") from None
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise CheckpointError(f"the checkpoint's model names {path}, which is not a {base.__name__}; the file is "
                              "not a vaelab checkpoint")
    return obj
