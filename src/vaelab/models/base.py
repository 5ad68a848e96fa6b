"""The protocol every VAE speaks, so that the training module, metrics and callbacks never ask which
VAE they hold: elbo_terms, log_importance_weights, sample, reconstruct, posterior_means."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vaelab.errors import ConfigError
from vaelab.models.likelihoods import Bernoulli, Likelihood
from vaelab.models.priors import Prior, StandardNormal


@dataclass
class ElboTerms:
    """Per-example terms of -ELBO = recon + kl. recon: -E_q log p(x|z), [B]; kl_layers: [L, B], one KL
    per stochastic layer (layer 1 nearest the data), closed form where one exists, else Monte Carlo."""

    recon: Tensor
    kl_layers: Tensor

    @property
    def kl(self) -> Tensor:
        return self.kl_layers.sum(0)

    @property
    def loss(self) -> Tensor:
        """-ELBO per example, [B]."""
        return self.recon + self.kl


def positive_int(value, key: str, source: str) -> int:
    """Config integers must be positive; say which key and which file when they are not."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key} must be a positive integer, got {value!r} ({source})")
    return value


class VAEBase(nn.Module):
    """Shared wiring: the likelihood, the prior over the top layer, and the protocol's signatures."""

    name = "vae"

    def __init__(
        self,
        image_shape: tuple[int, ...],
        likelihood: Likelihood | None,
        prior: Callable[..., Prior] | None,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ConfigError(f"images must be [C, H, W], got shape {tuple(image_shape)}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_pixels = math.prod(self.image_shape)
        self.likelihood = likelihood if likelihood is not None else Bernoulli()
        self._prior_factory = prior if prior is not None else StandardNormal

    def _build_prior(self, latent_dim: int, encoder) -> Prior:
        return self._prior_factory(latent_dim=latent_dim, encoder=encoder, image_shape=self.image_shape)

    @property
    def latent_dims(self) -> list[int]:  # pragma: no cover - interface
        """Sizes of the stochastic layers, layer 1 (nearest the data) first."""
        raise NotImplementedError

    def elbo_terms(self, x: Tensor) -> ElboTerms:  # pragma: no cover - interface
        raise NotImplementedError

    def log_importance_weights(self, x: Tensor, k: int, noise: Tensor | None = None) -> Tensor:  # pragma: no cover
        """[k, B]: log p(x, z_i) - log q(z_i|x), z_i ~ q(z|x); the IWAE bound is their log-mean-exp.
        noise: optional standard-normal draws [k, B, sum(latent_dims)] to use instead of fresh ones."""
        raise NotImplementedError

    def sample_latents(self, n: int) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def decode_mean(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def posterior_means(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - interface
        """E_q[z_l] per layer, [B, D_l] each (layer 1 first): what active units are counted on."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int) -> Tensor:
        """n images from the model: z from the prior, then the mean of p(x|z). [n, C, H, W]."""
        return self.decode_mean(self.sample_latents(n))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError
