"""The vanilla VAE: one Gaussian latent layer, q(z|x) = N(mu(x), sigma(x)^2), p(x|z) from the
likelihood, and any prior (standard normal by default, closed-form KL; VampPrior, Monte Carlo KL)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vaelab.checks import check_args
from vaelab.models.base import ElboTerms, VAEBase
from vaelab.models.distributions import log_normal_diag
from vaelab.models.networks import Decoder, Encoder
from vaelab.models.priors import sample_prior
from vaelab.models.spec import constructor_args


class VAE(VAEBase):
    """The vanilla VAE: one Gaussian latent layer q(z|x) = N(mu(x), sigma(x)^2), a prior p(z) and a likelihood p(x|z).

    image_shape: [C, H, W] of the images. latent_dim: size of z. hidden_dim, num_hidden: width and depth of the
    encoder's and decoder's gated MLPs (or of the conv stack's dense part). network: "mlp" | "conv".
    likelihood: a Likelihood (default Bernoulli()). prior: a factory called with latent_dim, encoder and image_shape
    (default StandardNormal; functools.partial(VampPrior, num_components=500) for the VampPrior). posterior: a
    factory called with latent_dim and context_dim (default GaussianPosterior; IAFPosterior for a flow).
    encoder, decoder: your own networks instead (encoder(x) -> (mu, logvar); decoder(z) -> the likelihood's
    parameters).

    vae(x) returns the ELBO's terms (ElboTerms: recon and kl_layers per example, .loss = -ELBO); also
    log_importance_weights, sample, reconstruct, posterior_means (models/base.py)."""

    def __init__(
        self,
        image_shape: tuple[int, ...],
        latent_dim: int = 40,
        hidden_dim: int = 300,
        num_hidden: int = 2,
        network: str = "mlp",
        likelihood=None,
        prior=None,
        posterior=None,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
    ) -> None:
        check_args(self.ARGS, locals())
        super().__init__(image_shape, likelihood, prior, posterior)
        # what spec() records; None with a custom encoder or decoder, which no spec describes
        custom = encoder is not None or decoder is not None
        self.init_args = None if custom else constructor_args(VAE.__init__, locals(), ("likelihood", "prior", "posterior",
                                                                                         "encoder", "decoder"))
        self.latent_dim = latent_dim
        self.encoder = encoder or Encoder(self.image_shape, latent_dim, hidden_dim, num_hidden, network)
        self.decoder = decoder or Decoder(
            latent_dim, self.image_shape, self.likelihood.num_params, hidden_dim, num_hidden, network
        )
        self.prior = self._build_prior(latent_dim, self.encoder)
        self.posterior = self._build_posterior(latent_dim, hidden_dim)

    @property
    def latent_dims(self) -> list[int]:
        return [self.latent_dim]

    def elbo_terms(self, x: Tensor, noise: Tensor | None = None) -> ElboTerms:
        z, q_mu, q_logvar, log_q = self._sample_posterior(self.encoder, x, eps=noise)  # z [B, D]
        recon = -self.likelihood.log_prob(x, self.decoder(z))  # [B]
        kl = self._kl_top(z, q_mu, q_logvar, log_q)  # [B]
        return ElboTerms(recon=recon, kl_layers=kl.unsqueeze(0))

    def log_importance_weights(self, x: Tensor, k: int, noise: Tensor | None = None,
                               kl_weight: float | Tensor = 1.0) -> Tensor:
        z, q_mu, q_logvar, log_q = self._sample_posterior(self.encoder, x, n=k, eps=noise)  # z [k, B, D]
        log_p_x = self.likelihood.log_prob(x, self.decoder(z))  # [k, B]
        if log_q is None:
            log_q = log_normal_diag(z, q_mu, q_logvar)
        if isinstance(kl_weight, Tensor) or kl_weight != 1:
            return log_p_x + kl_weight * (self.prior.log_prob(z) - log_q)
        return log_p_x + self.prior.log_prob(z) - log_q

    def sample_latents(self, n: int, temperature: float = 1.0) -> list[Tensor]:
        return [sample_prior(self.prior, n, temperature)]

    def latents_from_top(self, z_top: Tensor) -> list[Tensor]:
        return [z_top]

    def decode_mean(self, zs: list[Tensor]) -> Tensor:
        (z,) = zs
        return self.likelihood.mean(self.decoder(z))

    @torch.no_grad()
    def posterior_means(self, x: Tensor) -> list[Tensor]:
        return [self._posterior_point(self.encoder, x)]

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode_mean([self._sample_posterior(self.encoder, x)[0]])
