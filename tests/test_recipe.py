"""One recipe: VAEModule(model, recipe) is built the same way by the app and by hand, the recipe survives its
checkpoint as plain data, a wrong value is the app's sentence, and the engine owns steps per epoch and the NaN rule."""

import inspect
from functools import partial

import pytest
import torch
from conftest import compose

from vaelab.cli.config import build_recipe, trainer_config
from vaelab.errors import ConfigError, NonFiniteLossError
from vaelab.models import VAE, Bernoulli, StandardNormal
from vaelab.training.engine import StepEngine
from vaelab.training.module import VAEModule
from vaelab.training.objective import Loss
from vaelab.training.recipe import TrainingRecipe


def _vae() -> VAE:
    torch.manual_seed(0)
    return VAE((1, 8, 8), latent_dim=3, hidden_dim=16, likelihood=Bernoulli(), prior=StandardNormal)


def test_the_module_takes_a_model_a_recipe_and_how_it_runs_and_nothing_else():
    """The runner (training/runner.py) is decided where a run is set up: alone by default, a stacked member's when
    the stacked launcher hands one in."""
    from vaelab.training.runner import Solo

    params = inspect.signature(VAEModule).parameters
    assert list(params) == ["model", "recipe", "runner"] and params["runner"].default is None
    assert type(VAEModule(_vae()).runner) is Solo


def test_the_app_and_a_script_build_the_same_recipe():
    """conf/'s defaults and the same recipe written by hand are one value: the app has no other way in."""
    cfg = compose()
    by_hand = TrainingRecipe(loss=Loss(warmup_epochs=10), steps_per_execution="auto",
                             optimizer=partial(torch.optim.Adam, lr=5e-4, weight_decay=0.0, fused=True))
    assert build_recipe(cfg).spec() == by_hand.spec()
    # the trainer keys that are the recipe's go to it, and no further to the lightning.Trainer
    cfg = compose("trainer.gradient_clip_val=2.0", "trainer.steps_per_execution=3", "scheduler=cosine",
                  "trainer.max_epochs=7", "trainer.default_root_dir=.")
    recipe = build_recipe(cfg)
    assert (recipe.gradient_clip_val, recipe.steps_per_execution) == (2.0, 3)
    assert recipe.scheduler.keywords["T_max"] == 7
    trainer = trainer_config(cfg)
    assert "gradient_clip_val" not in trainer and "steps_per_execution" not in trainer and trainer.max_epochs == 7


def test_a_recipe_survives_its_checkpoint_as_plain_data():
    recipe = TrainingRecipe(loss=Loss(beta=0.5, warmup_epochs=2, free_bits=0.1),
                            optimizer=partial(torch.optim.SGD, lr=0.01, momentum=0.9),
                            scheduler=partial(torch.optim.lr_scheduler.ExponentialLR, gamma=0.5),
                            gradient_clip_val=1.5, importance_samples=7, config={"seed": 3})
    spec = recipe.spec()
    assert "config" not in spec  # kept beside it, as vaelab_config
    again = TrainingRecipe.from_spec(spec)
    assert again.spec() == spec and again.loss == recipe.loss
    module = VAEModule(_vae(), spec)  # what load_from_checkpoint hands the module: the plain-data copy
    opt = module.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    assert module.hparams["recipe"] == spec


def test_a_wrong_recipe_value_is_the_apps_sentence():
    with pytest.raises(ConfigError, match=r"^eval.importance_samples must be greater than 0, got 0$"):
        TrainingRecipe(importance_samples=0)
    with pytest.raises(ConfigError, match=r"^trainer.steps_per_execution must be auto or an integer, got 'many'$"):
        TrainingRecipe(steps_per_execution="many")
    with pytest.raises(ConfigError, match="is not a class or a functools.partial of one"):
        TrainingRecipe(optimizer=lambda params: torch.optim.Adam(params))


def test_a_spec_naming_anything_but_an_optimiser_is_refused():
    spec = TrainingRecipe().spec()
    spec["optimizer"] = {"_target_": "subprocess.run", "args": "echo pwned"}
    with pytest.raises(ConfigError, match="not an optimiser or learning-rate scheduler class"):
        TrainingRecipe.from_spec(spec)


def test_the_engine_owns_steps_per_epoch_the_kl_schedule_and_the_nonfinite_rule():
    model = _vae()
    x = torch.rand(4, 1, 8, 8).round()
    engine = StepEngine(model, torch.optim.Adam(model.parameters(), lr=1e-3), Loss(beta=2.0, warmup_epochs=4),
                        images=lambda batch, i: batch[i])
    assert engine.check_every == 1  # the rule's default on a CPU: every step, before the weights are touched
    engine.start_epoch(5)
    assert engine.steps_per_epoch == 5 and engine.weight(10) == pytest.approx(2.0 * 10 / 5 / 4)
    before = [p.detach().clone() for p in model.parameters()]
    bad = torch.stack([x, torch.full_like(x, float("nan"))])
    with pytest.raises(NonFiniteLossError, match=r"at step 11 \(epoch 2\)"):
        engine.run(bad, 2, 10)  # step 10 trains, step 11's objective is NaN: stopped before its update
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
