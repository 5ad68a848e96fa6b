"""Plain-PyTorch VAEs speaking one protocol. Nothing here imports lightning, hydra or wandb."""

from vaelab.models.base import ElboTerms, VAEBase
from vaelab.models.discrete import DiscretizedGaussian, DiscretizedLogistic, DiscretizedMixtureOfLogistics
from vaelab.models.hvae import HierarchicalVAE
from vaelab.models.ladder import LadderVAE
from vaelab.models.likelihoods import Bernoulli, ContinuousBernoulli, Gaussian, Likelihood
from vaelab.models.posteriors import GaussianPosterior, IAFPosterior
from vaelab.models.priors import MixtureOfGaussians, Prior, StandardNormal, VampPrior
from vaelab.models.vae import VAE

__all__ = [
    "VAE",
    "Bernoulli",
    "ContinuousBernoulli",
    "DiscretizedGaussian",
    "DiscretizedLogistic",
    "DiscretizedMixtureOfLogistics",
    "ElboTerms",
    "Gaussian",
    "GaussianPosterior",
    "IAFPosterior",
    "MixtureOfGaussians",
    "HierarchicalVAE",
    "LadderVAE",
    "Likelihood",
    "Prior",
    "StandardNormal",
    "VAEBase",
    "VampPrior",
]
