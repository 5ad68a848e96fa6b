"""vaelab: experiment-tracked training of Variational Autoencoders.

The library, without Hydra:

    from vaelab import VAE, VampPrior, Bernoulli, VAEModule, TrainingRecipe, Loss, ImageDataModule, load_model
    from vaelab import embed, interpolate
    from vaelab import HierarchicalVAE, LadderVAE, MixtureOfGaussians, IAFPosterior, GaussianPosterior

The names load on first use, so `import vaelab` stays light."""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "VAE": "vaelab.models", "HierarchicalVAE": "vaelab.models", "LadderVAE": "vaelab.models", "StandardNormal": "vaelab.models",
    "VampPrior": "vaelab.models", "Bernoulli": "vaelab.models", "Gaussian": "vaelab.models",
    "DiscretizedLogistic": "vaelab.models", "DiscretizedMixtureOfLogistics": "vaelab.models",
    "DiscretizedGaussian": "vaelab.models", "ContinuousBernoulli": "vaelab.models",
    "VAEModule": "vaelab.training.module", "TrainingRecipe": "vaelab.training.recipe", "Loss": "vaelab.training.objective",
    "ImageDataModule": "vaelab.data", "load_model": "vaelab.training.checkpoints",
    "EvalMetrics": "vaelab.evaluation.metrics", "evaluate": "vaelab.evaluation.metrics",
    "embed": "vaelab.evaluation.latents", "interpolate": "vaelab.evaluation.latents",
    "ElboTerms": "vaelab.models.base",
    # the parts every model composes with: a prior or posterior is passed as a factory, e.g.
    # VAE(shape, prior=partial(MixtureOfGaussians, num_components=10), posterior=partial(IAFPosterior, num_flows=2))
    "Prior": "vaelab.models.priors", "MixtureOfGaussians": "vaelab.models.priors",
    "GaussianPosterior": "vaelab.models.posteriors", "IAFPosterior": "vaelab.models.posteriors",
    # a plain Trainer as quiet as the app: Lightning's INFO lines off, and vaelab's progress lines for its bar
    "quiet_lightning": "vaelab.console", "LineProgress": "vaelab.training.callbacks",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'vaelab' has no attribute {name!r}")
