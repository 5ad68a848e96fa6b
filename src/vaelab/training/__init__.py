"""Training with Lightning: VAEModule (module.py: the Lightning adapter) built from a TrainingRecipe (recipe.py: the
objective, optimiser, schedule, clipping, steps per execution and checks), the step engine (engine.py: N optimiser
steps per Lightning step, eagerly or as one CUDA graph; it owns steps per epoch and the non-finite rule), what is kept from each step
without a sync (step_records.py), the optimiser (optim.py), callbacks (callbacks/), loggers and the W&B life cycle
(loggers.py), checkpoints (checkpoints.py) and trainer.fit with its early endings (fit.py)."""

import warnings

from vaelab.training.module import VAEModule
from vaelab.training.recipe import TrainingRecipe

# Lightning 2.6 calls torch's deprecated `isinstance(treespec, LeafSpec)` (lightning/pytorch/utilities/_pytree.py):
# nothing a vaelab user can act on, and the result is right; only that message is ignored
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")

__all__ = ["TrainingRecipe", "VAEModule"]
