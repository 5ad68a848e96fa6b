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
from vaelab.models.distributions import log_normal_diag, reparameterize
from vaelab.models.likelihoods import Bernoulli, Likelihood
from vaelab.models.networks import NETWORK
from vaelab.models.posteriors import GaussianPosterior
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
        posterior: Callable[..., nn.Module] | None = None,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ConfigError(f"images must be [C, H, W], got shape {tuple(image_shape)}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.num_pixels = math.prod(self.image_shape)
        self.likelihood = likelihood if likelihood is not None else Bernoulli()
        self._prior_factory = prior if prior is not None else StandardNormal
        self._posterior_factory = posterior if posterior is not None else GaussianPosterior

    def _build_prior(self, latent_dim: int, encoder) -> Prior:
        return self._prior_factory(latent_dim=latent_dim, encoder=encoder, image_shape=self.image_shape)

    def _build_posterior(self, latent_dim: int, context_dim: int) -> nn.Module:
        return self._posterior_factory(latent_dim=latent_dim, context_dim=context_dim)

    # -- the (top) layer's posterior: the encoder's Gaussian, or a flow on it (posteriors.py) -----------
    def _sample_posterior(self, encoder, x: Tensor, n: int | None = None, eps: Tensor | None = None):
        """(z, mu, logvar, log_q): a draw from q(z|x) of the layer `encoder` encodes. With the Gaussian posterior
        log_q is None (the prior takes the KL, in closed form where it has one); with a flow z is z_K and
        log_q = log q(z_0|x) - sum of the flow's log-determinants."""
        if not self.posterior.is_flow:
            mu, logvar = encoder(x)
            return reparameterize(mu, logvar, n=n, eps=eps), mu, logvar, None
        mu, logvar, h = encoder.encode(x)
        z0 = reparameterize(mu, logvar, n=n, eps=eps)
        z, log_det = self.posterior(z0, h)
        return z, mu, logvar, log_normal_diag(z0, mu, logvar) - log_det

    def _kl_top(self, z: Tensor, mu: Tensor, logvar: Tensor, log_q: Tensor | None) -> Tensor:
        """KL of the layer the prior is on: the prior's own (closed form or Monte Carlo) for a Gaussian
        posterior; with a flow the Monte Carlo estimate log q(z_K|x) - log p(z_K)."""
        return self.prior.kl(z, mu, logvar) if log_q is None else log_q - self.prior.log_prob(z)

    @torch.no_grad()
    def _posterior_point(self, encoder, x: Tensor) -> Tensor:
        """A deterministic point of q(z|x): its mean for the Gaussian; the flow applied to the base mean (eps = 0)."""
        if not self.posterior.is_flow:
            return encoder(x)[0]
        mu, _, h = encoder.encode(x)
        return self.posterior(mu, h)[0]

    def spec(self) -> dict | None:
        """The model as plain data (class paths and constructor arguments: models/spec.py), which checkpoints
        store so that `load_model` rebuilds it; None when a part cannot be described so (a custom encoder)."""
        prior, likelihood = factory_spec(self._prior_factory), self.likelihood.spec()
        posterior = factory_spec(self._posterior_factory)
        if None in (prior, likelihood, posterior) or getattr(self, "init_args", None) is None:
            return None
        model = {"_target_": qualified_name(type(self)), **self.init_args, "image_shape": self.image_shape}
        return {"model": model, "prior": prior, "likelihood": likelihood, "posterior": posterior}

    @property
    def kl_estimator(self) -> str:
        """How elbo_terms computes the KL of the top layer, in words (results.json and W&B record it)."""
        if self.posterior.is_flow:
            return ("Monte Carlo KL estimate log q(z_K|x) - log p(z_K) at z_K ~ q(z|x), with log q(z_K|x) = "
                    "log q(z_0|x) - sum of the flow's log-determinants (no closed form with a flow posterior)")
        if self.prior.analytic_kl:
            return "closed-form KL(q(z|x) || p(z))"
        return "Monte Carlo KL estimate log q(z|x) - log p(z) at z ~ q(z|x) (no closed form for this prior)"

    @property
    def latent_dims(self) -> list[int]:  # pragma: no cover - interface
        """Sizes of the stochastic layers, layer 1 (nearest the data) first."""
        raise NotImplementedError

    def elbo_terms(self, x: Tensor, noise: Tensor | None = None) -> ElboTerms:  # pragma: no cover - interface
        """-ELBO's per-example terms at one draw z ~ q(z|x). noise: the standard-normal draws [B, sum(latent_dims)]
        to use (draw_noise's), instead of fresh ones from the default generator."""
        raise NotImplementedError

    def forward(self, x: Tensor, noise: Tensor | None = None) -> ElboTerms:
        """vae(x) is vae.elbo_terms(x): the per-example reconstruction and KL terms of -ELBO."""
        return self.elbo_terms(x, noise)

    def draw_noise(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        """The standard-normal draws elbo_terms makes for a batch, [batch, sum(latent_dims)], drawn from the default
        generator in the order and shapes elbo_terms draws them (the top layer first): elbo_terms(x, draw_noise(B))
        computes what elbo_terms(x) would have with the generator in the same state."""
        draws = [torch.randn(batch, d, device=device) for d in reversed(self.latent_dims)]
        return torch.cat(draws, -1)

    def log_importance_weights(self, x: Tensor, k: int, noise: Tensor | None = None,
                               kl_weight: float | Tensor = 1.0) -> Tensor:  # pragma: no cover
        """[k, B]: log p(x, z_i) - log q(z_i|x), z_i ~ q(z|x); the IWAE bound is their log-mean-exp.
        noise: optional standard-normal draws [k, B, sum(latent_dims)] to use instead of fresh ones. kl_weight:
        log p(x|z_i) + kl_weight * (log p(z_i) - log q(z_i|x)), the IWAE objective's KL warm-up (1: the weights)."""
        raise NotImplementedError

    def sample_latents(self, n: int, temperature: float = 1.0) -> list[Tensor]:  # pragma: no cover - interface
        """n draws from the prior, one [n, D_l] tensor per layer (layer 1 first); temperature scales the standard
        deviation of every layer's prior (1: the model's own; below 1: nearer the modes, as the field samples
        hierarchical VAEs)."""
        raise NotImplementedError

    def latents_from_top(self, z_top: Tensor) -> list[Tensor]:  # pragma: no cover - interface
        """All layers' latents for given top-layer ones: the lower layers at their conditional priors' means."""
        raise NotImplementedError

    def decode_mean(self, zs: list[Tensor]) -> Tensor:  # pragma: no cover - interface
        """The mean of p(x | z_1, ..., z_L), [..., C, H, W]."""
        raise NotImplementedError

    def posterior_means(self, x: Tensor) -> list[Tensor]:  # pragma: no cover - interface
        """E_q[z_l] per layer, [B, D_l] each (layer 1 first): what active units are counted on. With a flow
        posterior, the flow applied to the base Gaussian's mean."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """n images from the model: z from the prior (its standard deviations times temperature at every layer),
        then the mean of p(x|z). [n, C, H, W]."""
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature} must be above 0 (1: the prior itself; 0.7: VDVAE's "
                              "reduced-temperature samples)")
        return self.decode_mean(self.sample_latents(n, temperature))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError
