"""The config side of the apps: where conf/ is, validation of a composed config against the rules each class
declares (its ARGS), checks across config groups, and building objects (and whole trained models) from
configs with Hydra's instantiate."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from vaelab.checks import Arg, one_of
from vaelab.cli.rundirs import RESUME
from vaelab.data import SOURCES
from vaelab.devices import MATMUL_PRECISION
from vaelab.errors import CheckpointError, ConfigError, VaelabError
from vaelab.pixels import pixel_values
from vaelab.training.checkpoints import load_checkpoint, model_of, model_spec
from vaelab.training.objective import Loss
from vaelab.training.optim import OPTIM_ARGS, SCHEDULER_OPTIONS
from vaelab.training.recipe import RECIPE_KEYS, TrainingRecipe

# the config directory inside the package: in a checkout src/vaelab/conf links to the top-level conf/ (the
# source); a built wheel carries a copy, so an installed vaelab finds it wherever it runs
CONF_DIR = str(Path(__file__).parent.parent / "conf")
_ABSENT = "__absent__"

# vaelab-train's own keys; the others belong to the objects the config builds, which declare them as ARGS
TRAIN_ARGS = [Arg("seed", "int", 0), Arg("trainer.max_epochs", "int", 1, nullable=True), MATMUL_PRECISION, RESUME,
              one_of("train", True, False), one_of("test", True, False)]


def target_args(node) -> dict[str, Arg]:
    """The ARGS of the class or function a config node instantiates (none if it names none, or none that
    imports: instantiate then says what is wrong)."""
    target = node.get("_target_") if isinstance(node, DictConfig) else None
    try:
        return getattr(get_object(target), "ARGS", {}) if target else {}
    except Exception:  # noqa: BLE001
        return {}


ARGUMENT_GROUPS = ("data", "model", "prior", "posterior", "likelihood", "loss", "optim", "scheduler")
PASSED_BY_VAELAB = {"self", "image_shape", "likelihood", "prior", "posterior", "params", "optimizer", "encoder",
                    "latent_dim_of", "context_dim"}  # what vaelab passes itself, never a config key


def check_arguments(cfg: DictConfig) -> None:
    """Each key of a group that instantiates a class must be one of its arguments: `+model.foo=1` is refused in
    one sentence before anything is built or written (Hydra would fail later, inside instantiate)."""
    for group in ARGUMENT_GROUPS:
        node = cfg.get(group)
        target = node.get("_target_") if isinstance(node, DictConfig) else None
        try:
            params = inspect.signature(get_object(target)).parameters if target else {}
        except Exception:  # noqa: BLE001 - a target that does not import: instantiate says so
            continue
        if not params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
            continue
        named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        for key in node:
            if key not in ("_target_", "_partial_", "name") and key not in named:
                allowed = ", ".join(n for n in named if n not in PASSED_BY_VAELAB)
                raise ConfigError(f"{group} has no argument {key} (its arguments: {allowed}); remove {group}.{key} "
                                  "or check its spelling")


def check_keys(cfg: DictConfig, rules: Iterable[tuple[str, Arg]]) -> None:
    """Check each config key present in cfg against its rule; the first wrong value raises ConfigError."""
    for key, arg in rules:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if value != _ABSENT:
            arg.check(value, key)


_VALIDATED: set[str] = set()  # configs validated in this process (the run guard's, then train()'s: once)


def validate(cfg: DictConfig) -> None:
    """Every value of a vaelab-train config, before anything is built or written: the app's own keys, the
    training recipe's (loss, optim, eval, trainer.steps_per_execution, cuda_graphs), and those of each object
    the config instantiates (data, model, prior, likelihood, loggers, callbacks), by the rules they declare.
    A config already validated in this process (by the run guard) is not validated again."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    key = json.dumps(plain, sort_keys=True, default=str)
    if key in _VALIDATED:
        return
    rules = [(arg.key, arg) for arg in [*TRAIN_ARGS, *TrainingRecipe.ARGS.values(), *Loss.ARGS.values(),
                                        *OPTIM_ARGS.values(), *SCHEDULER_OPTIONS.values()]]
    for group in ("data", "model", "prior", "posterior", "likelihood", "loss"):
        rules += [(f"{group}.{name}", arg) for name, arg in target_args(cfg.get(group)).items()]
    for group in ("logger", "callbacks"):
        for entry, node in (cfg.get(group) or {}).items():
            rules += [(f"{group}.{entry}.{name}", arg) for name, arg in target_args(node).items()]
    check_keys(cfg, rules)
    check_arguments(cfg)
    _VALIDATED.add(key)


def check_consistency(cfg: DictConfig, binary: bool, channels: int | None = None) -> str:
    """Checks across config groups: the likelihood must fit the data (`channels`: its images', if known). Returns
    the pixel values the likelihood is given (vaelab/pixels.py)."""
    lik = cfg.likelihood.get("name", "")
    try:
        models = getattr(get_object(cfg.likelihood._target_), "pixels", "continuous")
    except Exception:  # noqa: BLE001 - a target that does not import: instantiate says so
        models = "continuous"
    pixels = pixel_values(models, binary, lik)
    source = SOURCES.get(cfg.data.name)
    channels = channels or (source.channels if source is not None else None)
    if lik == "bernoulli" and not binary and (channels or 1) > 1:
        raise ConfigError(f"likelihood=bernoulli does not fit colour images (data={cfg.data.name}); "
                          "use likelihood=dmol or discretized_logistic (8-bit pixel values)")
    return pixels


def build(node: DictConfig, **kwargs):
    """hydra.utils.instantiate, with our own errors unwrapped so people see the sentence, not the wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, VaelabError):
            raise exc.__cause__ from None
        raise


def spec(node: DictConfig) -> DictConfig:
    """A model-part config without its `name`, which labels runs and is no constructor argument."""
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"})


def build_recipe(cfg: DictConfig, config: dict | None = None) -> TrainingRecipe:
    """The training recipe the config describes: what loss/, optim/ and scheduler/ instantiate (the objective; the
    optimiser and schedule as partials called with the parameters and the optimiser), eval/, cuda_graphs, and the
    trainer keys that are the recipe's (steps_per_execution, gradient_clip_val: RECIPE_KEYS). `config`: the run's
    whole config, kept in its checkpoints."""
    scheduler = cfg.get("scheduler")
    trainer = {k: cfg.trainer[k] for k in cfg.trainer if k in RECIPE_KEYS}
    return TrainingRecipe(loss=build(cfg.loss), optimizer=build(spec(cfg.optim)),
                          scheduler=build(spec(scheduler)) if scheduler and scheduler.get("_target_") else None,
                          cuda_graphs=cfg.get("cuda_graphs", "auto"), config=config, **trainer,
                          **OmegaConf.to_container(cfg.eval, resolve=True))


def trainer_config(cfg: DictConfig) -> DictConfig:
    """conf/trainer without the recipe's keys: the lightning.Trainer's own arguments."""
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                             if k not in RECIPE_KEYS})


def build_model(cfg: DictConfig, image_shape) -> torch.nn.Module:
    likelihood = build(spec(cfg.likelihood))
    prior = build(spec(cfg.prior))  # a partial: the model builds it with its own latent size and encoder
    parts = {"posterior": build(spec(cfg.posterior))} if cfg.get("posterior") else {}  # a partial too
    try:
        return build(spec(cfg.model), image_shape=image_shape, likelihood=likelihood, prior=prior, **parts)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, MemoryError) or (isinstance(cause, RuntimeError) and "alloc" in str(cause).lower()):
            sizes = ", ".join(f"model.{k}={cfg.model[k]}" for k in ("hidden_dim", "latent_dim", "num_layers")
                              if k in cfg.model)
            raise ConfigError(f"the model is too large for this machine's memory ({sizes}); lower "
                              "model.hidden_dim or model.latent_dim") from None
        raise


def restore(ckpt_path: str | Path, data_overrides: dict | None = None):
    """(labels of model, prior, likelihood and data; the data module, set up; the model with the checkpoint's
    weights, in eval mode). The data come from the run's config (vaelab-train) or from the data module's saved
    hyperparameters (a plain Trainer with vaelab's ImageDataModule)."""
    ckpt = load_checkpoint(ckpt_path)
    spec = model_spec(ckpt)
    if ckpt.get("vaelab_config"):
        cfg = OmegaConf.create(ckpt["vaelab_config"])
        data_cfg, labels = cfg.data, {g: cfg[g].get("name") for g in ("model", "prior", "likelihood")}
        labels["posterior"] = cfg.posterior.get("name") if cfg.get("posterior") else "gaussian"
    elif ckpt.get("datamodule_hyper_parameters"):
        data_cfg = OmegaConf.create({"_target_": "vaelab.data.ImageDataModule", **ckpt["datamodule_hyper_parameters"]})
        labels = {g: spec[g]["_target_"].rsplit(".", 1)[-1] for g in ("model", "prior", "likelihood", "posterior")
                  if g in spec}
    else:
        raise CheckpointError(f"{ckpt_path} records no data set (it was trained without vaelab's ImageDataModule); "
                              "evaluate it in Python with vaelab.load_model and your own data")
    data_cfg = OmegaConf.merge(data_cfg, {k: v for k, v in (data_overrides or {}).items() if v is not None})
    datamodule = build(data_cfg)
    datamodule.setup("test")
    model = model_of(ckpt, ckpt_path)
    datamodule.use_pixels(pixel_values(model.likelihood.pixels, datamodule.is_binary, labels.get("likelihood", "")))
    return {**labels, "data": data_cfg.name, "pixels": datamodule.pixels}, datamodule, model


def refuse_unknown_keys(cfg: DictConfig, app: str, config_file: Path) -> None:
    """vaelab-eval and vaelab-sample rebuild the model, prior, likelihood and data from the checkpoint: an
    override such as +model=vanilla would be silently ignored, so it is refused instead."""
    own = set(OmegaConf.load(config_file).keys()) | {"hydra", "defaults"}
    unknown = sorted(set(cfg.keys()) - own)
    if unknown:
        raise ConfigError(f"{app} rebuilds the model, prior, likelihood and data from the checkpoint's own config, "
                          f"so {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not among its options; "
                          f"remove {'it' if len(unknown) == 1 else 'them'} (its options: conf/{config_file.name})")


CONFIG_ORDER = ("data", "model", "prior", "posterior", "likelihood", "loss", "optim", "scheduler", "trainer", "callbacks",
                "logger", "eval", "paths")


def print_config(cfg: DictConfig) -> None:
    """The resolved config as a rich tree, groups first in the order above (lightning-hydra-template's
    print_config_tree); switched off with extras.print_config=false. In a terminal the YAML is highlighted; in a
    log file (stdout not a terminal) it is plain text, never cut at 80 columns nor padded to them."""
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.text import Text
    from rich.tree import Tree

    console = Console()
    if not console.is_terminal:
        console = Console(width=10_000, no_color=True, highlight=False)
    tree = Tree("config", style="dim", guide_style="dim")
    groups = [k for k in CONFIG_ORDER if k in cfg] + [k for k in cfg if k not in CONFIG_ORDER and k != "extras"]
    for key in groups:
        node = cfg[key]
        text = (OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)).rstrip()
        body = Syntax(text, "yaml") if console.is_terminal else Text(text)
        tree.add(f"[bold]{key}[/bold]", style="dim", guide_style="dim").add(body)
    console.print(tree)
