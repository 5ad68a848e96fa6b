"""The protocol every VAE speaks, so that the training module, metrics and callbacks never ask which
VAE they hold: elbo_terms, log_importance_weights, sample, reconstruct, posterior_means."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vaelab.checks import Arg, positive_int
from vaelab.errors import ConfigError
from vaelab.models.likelihoods import Bernoulli, Likelihood
from vaelab.models.networks import NETWORK
from vaelab.models.priors import Prior, StandardNormal
from vaelab.models.spec import factory_spec, qualified_name


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


class VAEBase(nn.Module):
    """Shared wiring: the likelihood, the prior over the top layer, and the protocol's signatures.
    Latents are always a list of tensors, one [n, D_l] per stochastic layer, layer 1 (nearest the data) first."""

    ARGS: dict[str, Arg] = {
        "latent_dim": positive_int("model.latent_dim"),
        "hidden_dim": positive_int("model.hidden_dim"),
        "num_hidden": positive_int("model.num_hidden"),
        "network": NETWORK,
    }

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

    def spec(self) -> dict | None:
        """The model as plain data (class paths and constructor arguments: models/spec.py), which checkpoints
        store so that `load_model` rebuilds it; None when a part cannot be described so (a custom encoder)."""
        prior, likelihood = factory_spec(self._prior_factory), self.likelihood.spec()
        if prior is None or likelihood is None or getattr(self, "init_args", None) is None:
            return None
        model = {"_target_": qualified_name(type(self)), **self.init_args, "image_shape": self.image_shape}
        return {"model": model, "prior": prior,
                "likelihood": likelihood}

    @property
    def kl_estimator(self) -> str:
        """How elbo_terms computes the KL of the top layer, in words (results.json and W&B record it)."""
        if self.prior.analytic_kl:
            return "closed-form KL(q(z|x) || p(z))"
        return "Monte Carlo KL estimate log q(z|x) - log p(z) at z ~ q(z|x) (no closed form for this prior)"

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

    def sample_latents(self, n: int) -> list[Tensor]:  # pragma: no cover - interface
        """n draws from the prior, one [n, D_l] tensor per layer (layer 1 first)."""
        raise NotImplementedError

    def decode_mean(self, zs: list[Tensor]) -> Tensor:  # pragma: no cover - interface
        """The mean of p(x | z_1, ..., z_L), [..., C, H, W]."""
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
