"""The house keeps its architecture: which layer may import what, no entry point imports another, short
functions, and every allowed value declared once, by the object it belongs to, and read from there."""

import ast
import os
import re
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose

from vaelab.cli.config import build_model, validate
from vaelab.data import SOURCES
from vaelab.errors import ConfigError

SRC = ROOT / "src" / "vaelab"
APPS = {"vaelab.cli.train", "vaelab.cli.eval", "vaelab.cli.sample", "vaelab.cli.report"}


def imports(path: Path) -> set[str]:
    """Every module a file imports (at any depth, lazily or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def layer_imports(layer: str) -> dict[str, set[str]]:
    return {str(p.relative_to(SRC)): imports(p) for p in (SRC / layer).rglob("*.py")}


def _roots(names: set[str]) -> set[str]:
    return {n.split(".")[0] for n in names}


def test_only_cli_knows_hydra_and_models_know_no_framework():
    for layer in ("models", "data", "training", "evaluation", "reporting"):
        for file, names in layer_imports(layer).items():
            assert not _roots(names) & {"hydra", "omegaconf"}, f"{file} imports Hydra"
            assert not any(n.startswith("vaelab.cli") for n in names), f"{file} imports the apps"
    for file, names in layer_imports("models").items():
        assert not _roots(names) & {"lightning", "wandb", "torchmetrics"}, file
    for layer in ("models", "data", "evaluation"):
        for file, names in layer_imports(layer).items():
            assert "wandb" not in _roots(names) and not any(n.startswith("vaelab.training") for n in names), file


# each imports only those before it: nothing on a solo run's path (training/ and before) imports stacking/
LAYERS = ["base", "models", "data", "evaluation", "training", "stacking", "reporting", "cli"]


def _layer(module: str) -> str:
    part = module.split(".")[1] if module.count(".") else ""
    return part if part in LAYERS else "base"


def test_each_layer_imports_only_the_layers_before_it():
    for path in SRC.rglob("*.py"):
        own = _layer("vaelab." + str(path.relative_to(SRC)).replace("/", "."))
        if path == SRC / "train.py":
            own = "cli"  # `python -m vaelab.train`: the training app under its earlier name
        for name in imports(path):
            if name.startswith("vaelab."):
                assert LAYERS.index(_layer(name)) <= LAYERS.index(own), f"{path.relative_to(SRC)} imports {name}"


def test_no_entry_point_imports_another():
    for app in APPS:
        path = SRC / (app.replace("vaelab.", "").replace(".", "/") + ".py")
        assert not imports(path) & (APPS - {app}), f"{app} imports another app"
    assert not imports(ROOT / "scripts" / "slurm_preview.py") & APPS


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in [*SRC.rglob("*.py"), *(SRC.parent / "hydra_plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not long, long


def test_every_data_set_is_one_registry_entry_and_one_small_yaml():
    data_dir = ROOT / "conf" / "data"
    yamls = {p.stem for p in data_dir.glob("*.yaml")} - {"common"}
    assert yamls == set(SOURCES)
    for name in SOURCES:
        cfg = compose(f"data={name}").data
        assert cfg.name == name and cfg._target_ == "vaelab.data.ImageDataModule"
        own = [ln for ln in (data_dir / f"{name}.yaml").read_text().splitlines() if ln and not ln.startswith("#")]
        # the common keys are inherited; your own images' sources add their reader's few options (data/own.py)
        assert own[:2] == ["defaults:", "  - common"] and len(own) <= (12 if SOURCES[name].reader else 6), own


def test_validation_reads_each_rule_from_the_class_that_declares_it():
    """A new prior is one class (tests/custom_parts.py) and its config: its rules need no edit to validation."""
    custom = ["prior._target_=custom_parts.ScaledNormal", "+prior.scale=-1"]
    with pytest.raises(ConfigError, match=r"^prior.scale must be greater than 0, got -1$"):
        validate(compose(*custom))
    cfg = compose("prior._target_=custom_parts.ScaledNormal", "+prior.scale=2.0")
    validate(cfg)
    model = build_model(cfg, (1, 28, 28))
    z = model.sample_latents(4000)[0]
    assert abs(z.std().item() - 2.0) < 0.05 and model.kl_estimator.startswith("Monte Carlo")
    # the data set's names come from the registry, the model's networks from the networks module
    with pytest.raises(ConfigError, match="data.name must be one of " + ", ".join(SOURCES)):
        validate(compose("data.name=imagenet"))
    with pytest.raises(ConfigError, match="model.network must be one of mlp, conv, got 'rnn'"):
        validate(compose("model.network=rnn"))


@pytest.mark.parametrize("model_name", ["vanilla", "deep"])
def test_latents_are_a_list_of_layers_for_every_model(model_name):
    model = build_model(compose(f"model={model_name}"), (1, 28, 28))
    zs = model.sample_latents(3)
    assert isinstance(zs, list) and [z.shape for z in zs] == [torch.Size([3, d]) for d in model.latent_dims]
    assert model.decode_mean(zs).shape == (3, 1, 28, 28)


def _module_imports(folder: str) -> dict[str, set[str]]:
    """{module: the modules of the same folder it imports, at any depth}."""
    mods = {"vaelab." + str(p.relative_to(SRC).with_suffix("")).replace("/", "."): p for p in (SRC / folder).rglob("*.py")}
    graph = {}
    for mod, path in mods.items():
        found = set()
        for name in imports(path):
            found |= {m for m in mods if m != mod and (name == m or name.startswith(m + "."))}
        graph[mod.removesuffix(".__init__")] = {m.removesuffix(".__init__") for m in found}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if nxt.endswith(".__init__") or graph.get(nxt) is None:
                continue
            if state.get(nxt) == 1:
                return [*path, node, nxt]
            if not state.get(nxt) and (found := visit(nxt, [*path, node])):
                return found
        state[node] = 2
        return None

    for node in graph:
        if not state.get(node) and (found := visit(node, [])):
            return found
    return None


@pytest.mark.parametrize("folder", ["training", "stacking", "models", "data", "evaluation"])
def test_no_module_imports_one_that_imports_it_back(folder):
    """training/: the engine does not call back into the module that drives it; models/: the parts import the
    leaf spec.py, and only build.py knows them all. Package __init__ files, which gather exports, are left out."""
    graph = {m: {d for d in deps if not d.endswith(folder)} for m, deps in _module_imports(folder).items()
             if not m.endswith(folder)}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_launcher_plugin_has_no_import_cycle_and_the_solo_path_no_thread_local():
    """hydra_plugins: stacked_launcher.py runs _core.py's plan here or _processes.py's processes, and _processes.py
    runs _core.py's units; _core.py imports neither back. A run learns that it is a stacked member from the runner
    it is handed (training/runner.py), not from a thread-local."""
    plugin = ROOT / "src" / "hydra_plugins" / "vaelab_stacked_launcher"
    mods = {p.stem: imports(p) for p in plugin.glob("*.py")}
    assert not any("_processes" in n or "stacked_launcher" in n for n in mods["_core"]), mods["_core"]
    for path in [p for layer in ("training", "models", "data", "evaluation", "cli") for p in (SRC / layer).rglob("*.py")]:
        text = path.read_text()
        assert "threading.local" not in text and "current_member" not in text, path.relative_to(SRC)


def test_the_engine_is_built_from_plain_arguments_not_from_the_module():
    """The engine owns whole optimiser steps; it is given the model, the optimiser, the objective, how to clip and
    backpropagate, how often to check, the weights' average and when to skip an update, and never holds the LightningModule that drives it."""
    import inspect

    from vaelab.training.engine import CudaGraphEngine, StepEngine

    assert list(inspect.signature(StepEngine).parameters) == ["model", "optimizer", "loss", "images", "clip",
                                                              "backward", "check_every", "average", "skip_above"]
    source = inspect.getsource(inspect.getmodule(StepEngine))
    assert "lightning" not in source.split('"""', 2)[2] and "LightningModule" not in source
    assert issubclass(CudaGraphEngine, StepEngine)


def _py_files_outside(*skip: str):
    for path in [*SRC.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "scripts").rglob("*.py")]:
        if not any(str(path).startswith(str(s)) for s in skip) and path.name != "test_layout.py":
            yield path


def test_only_data_decodes_a_training_batch():
    """The batch's shapes (images, stacked steps, indices) are read by data/batches.py alone; everyone else asks it
    (batch_counts, step_images)."""
    decoding = re.compile(r"\.dim\(\)\s*==\s*[45]|\.dtype\s*==\s*torch\.long|\.ndim\s*==\s*[45]")
    found = [f"{p.relative_to(ROOT)}:{i}" for p in _py_files_outside(SRC / "data")
             for i, line in enumerate(p.read_text().splitlines(), 1) if decoding.search(line)]
    assert not found, found


def test_nobody_reads_the_step_statistics_by_column():
    """StepStats (training/step.py, its schema STATS) is read by name: stats.recon, stats["grad_norm"]."""
    found = []
    for path in _py_files_outside(SRC / "training" / "step.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Subscript):
                target = node.value
                name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
                by_name = (isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str)) or (
                    isinstance(node.slice, ast.Name) and node.slice.id == "name")
                if name in ("stats", "table") and not by_name:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not found, found


LONG = 250  # lines: a module longer than this says why in its docstring ("Why it is long: ...")


def test_no_module_is_long_without_saying_why_and_each_says_what_it_owns():
    plugins = ROOT / "src" / "hydra_plugins"
    for path in [*SRC.rglob("*.py"), *plugins.rglob("*.py")]:
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        if path.name != "__init__.py" or text.strip():
            assert len(doc) > 40, f"{path.relative_to(ROOT)} has no docstring saying what it owns"
        if len(text.splitlines()) > LONG:
            assert "Why it is long:" in doc, f"{path.relative_to(ROOT)} is over {LONG} lines and does not say why"


# each responsibility in its room: where it is defined, once (a second definition elsewhere fails too)
ROOMS = {
    "TrainingRecipe": "training/recipe.py",  # what the module is built from, by the app and by hand alike
    "build_recipe": "cli/config.py",  # the config's recipe: the app's one way in
    "group_jobs": "stacking/plan.py",  # the stacked sweep's plan, beside the stack, from plain data
    "process_count": "stacking/plan.py",
    "step_objective": "training/step.py",  # the one step: eager, CUDA graph and stacked (vmap) all call it
    "StepStats": "training/step.py",
    "evaluation_outputs": "evaluation/metrics.py",  # the one evaluation: EvalMetrics and the stacked pass
    "Loss": "training/objective.py",  # every objective and its settings
    "find_runs": "reporting/runs.py",  # vaelab-report's work: reporting/, Hydra-free
    "write_page": "reporting/page.py",
    "curves_figure": "reporting/figures.py",
    "save_run_state": "training/run_state.py",
    "steps_per_epoch": "training/execution.py",
    "count_optimizer_steps": "training/execution.py",
    "results_of": "cli/outcome.py",
}


def test_each_responsibility_lives_in_its_room():
    defined: dict[str, list[str]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined.setdefault(node.name, []).append(str(path.relative_to(SRC)))
    for name, room in ROOMS.items():
        assert defined.get(name) == [room], (name, defined.get(name))
    # the apps parse, build and call: no app module holds the report's or the sweep plan's logic
    for path in (SRC / "cli").glob("*.py"):
        names = imports(path)
        assert not any(n.startswith("matplotlib") for n in names), f"{path.name} draws figures"
    launcher = imports(ROOT / "src" / "hydra_plugins" / "vaelab_stacked_launcher" / "_core.py")
    assert "vaelab.stacking.plan" in launcher  # the launcher runs the plan; it does not make one


# the private attributes of other libraries that vaelab touches, each where no public way exists: its comment there
# says why, and the test named pins the behaviour it serves
PRIVATE = {
    "_batches_that_stepped": ("training/execution.py", "tests/test_steps_per_execution.py"),  # Lightning's loggers' x-axis
    "_wandb_init": ("training/wandb_runs.py", "tests/test_what_people_see.py"),  # Lightning passes wandb `anonymous`
    "_opt_called": ("stacking/member.py", "tests/test_stacked.py"),  # torch: a schedule after a stacked step
    "_return_value": ("../hydra_plugins/vaelab_stacked_launcher/_core.py", "tests/test_stacked.py"),  # Hydra's job error
    "_timeout": ("training/fit.py", "tests/test_scale.py"),  # Lightning's DDP collective timeout, for the sentence
}


def test_no_private_attribute_of_another_library_is_touched_but_those_said_and_pinned():
    """Attributes named _x read or written on anything but vaelab's own objects (self, cls, a module's own names),
    by name or through getattr, and private names imported from another library."""
    found = {}
    for path in [*SRC.rglob("*.py"), *(SRC.parent / "hydra_plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if (isinstance(node, ast.Attribute)
                    and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "_thread", "_here"))):
                name = node.attr
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)  # getattr(x, "_y") is a read too
                  and node.func.id in ("getattr", "setattr", "hasattr") and len(node.args) > 1
                  and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                name = node.args[1].value
            elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith(("vaelab", "hydra_plugins")):
                for alias in node.names:  # a library's private class or function, imported
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.setdefault(alias.name, set()).add(os.path.relpath(path, SRC))
            if name and name.startswith("_") and not name.startswith("__"):
                found.setdefault(name, set()).add(os.path.relpath(path, SRC))
    found.pop("_target_", None)  # a config key, not an attribute of a library's object
    assert {k: sorted(v) for k, v in found.items()} == {k: [f] for k, (f, _) in PRIVATE.items()}
    for attr, (file, test) in PRIVATE.items():
        source = (SRC / file).read_text()
        assert "No public way" in source or "no public way" in source.lower(), file
        assert (ROOT / test).is_file()
    assert "tests/test_steps_per_execution.py pins" in (SRC / "training" / "execution.py").read_text()


def _readme_map() -> dict[str, str]:
    """README's "To add something, edit these files" table: {what: the cell naming the files}."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("To add something, edit these files"):]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and not ln.startswith(("| to add", "| ---"))]
    return {cells[0]: cells[1] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in rows)}


def test_readme_map_names_files_that_exist_and_the_places_that_decide():
    """README's map of where to add a likelihood, prior, model, objective, per-step figure, evaluation figure,
    launcher setting or data set names real files, and each entry is where that thing is decided: every config
    of the group targets a class in the named files, an objective's name (iwae) appears in no other source file, a
    statistic logged as an epoch mean (grad_norm) in none but step.py, and every launcher setting is the launcher's argument and
    checked by check_settings."""
    import importlib
    import inspect

    import yaml

    entries = _readme_map()
    assert set(entries) == {"a likelihood", "a prior", "a model", "an objective", "a per-step figure",
                            "an evaluation figure", "a launcher setting", "a data set"}, entries
    for what, cell in entries.items():
        for path in re.findall(r"`((?:src|conf)/[^`]+)`", cell):
            folder = ROOT / path.split("<name>")[0] if "<name>" in path else None
            assert (folder.is_dir() if folder else (ROOT / path).is_file()), (what, path)

    def targets(group: str) -> set[type]:
        out = set()
        for p in (ROOT / "conf" / group).glob("*.yaml"):
            target = (yaml.safe_load(p.read_text()) or {}).get("_target_")
            if target:
                module, _, name = target.rpartition(".")
                out.add(getattr(importlib.import_module(module), name))
        return out

    for what, group in (("a likelihood", "likelihood"), ("a prior", "prior"), ("a model", "model")):
        files = {f"src/{p}" for p in re.findall(r"`src/([^`<]+\.py)`", entries[what])}
        for cls in targets(group):
            where = os.path.relpath(inspect.getsourcefile(cls), ROOT)
            assert where in files or (group == "model" and where.startswith("src/vaelab/models/")), (what, cls, where)
    from vaelab.training.objective import Loss
    from vaelab.training.step import STATS

    for choice in set(Loss.ARGS["objective"].choices) - {"elbo"}:  # "elbo" is also a metric's name
        users = [p.relative_to(SRC) for p in SRC.rglob("*.py") if f'"{choice}"' in p.read_text()]
        assert users == [Path("training/objective.py")], (choice, users)
    for stat in [s for s in STATS if s.epoch_mean]:  # recon, kl_layers, objective: also the ELBO's own names
        users = [p.relative_to(SRC) for p in SRC.rglob("*.py") if f'"{stat.name}"' in p.read_text()]
        assert users == [Path("training/step.py")], (stat.name, users)
    from hydra_plugins.vaelab_stacked_launcher._core import check_settings
    from hydra_plugins.vaelab_stacked_launcher.stacked_launcher import StackedLauncher

    keys = set(yaml.safe_load((ROOT / "conf/hydra/launcher/stacked.yaml").read_text())) - {"_target_"}
    assert keys == set(inspect.signature(StackedLauncher).parameters), keys
    checked = inspect.getsource(check_settings)
    assert all(f"launcher.{k}" in checked for k in keys), keys
