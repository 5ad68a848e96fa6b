"""The hierarchical ("deeper") VAE: L stochastic layers, generalising the two-level HVAE of the VampPrior
paper (Tomczak & Welling, 2018, appendix):

    inference   q(z_L | x),  q(z_l | x, z_{l+1})  for l = L-1 .. 1
    generative  p(z_L) (the prior choice),  p(z_l | z_{l+1}),  p(x | z_1, ..., z_L)

KL per layer: the top layer's against the prior (closed form or Monte Carlo, as the prior offers); each
lower layer's KL(q(z_l|x,z_{l+1}) || p(z_l|z_{l+1})) in closed form given the sampled z_{l+1}.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vaelab.checks import check_args, positive_int
from vaelab.models.base import ElboTerms, VAEBase
from vaelab.models.distributions import kl_normal_normal, log_normal_diag, reparameterize
from vaelab.models.networks import Decoder, Encoder, GatedDense, GaussianHead, ImageFeatures, gated_mlp
from vaelab.models.priors import sample_prior
from vaelab.models.spec import constructor_args


class ConditionalPosterior(nn.Module):
    """q(z_l | x, z_{l+1}): an x branch and a z branch, joined by a gated layer (the paper's q(z1|x,z2))."""

    def __init__(self, image_shape, latent_dim: int, hidden_dim: int, network: str) -> None:
        super().__init__()
        self.x_features = ImageFeatures(image_shape, hidden_dim, 1, network)
        self.z_branch = GatedDense(latent_dim, hidden_dim)
        self.joint = GatedDense(2 * hidden_dim, hidden_dim)
        self.head = GaussianHead(hidden_dim, latent_dim)

    def forward(self, h_x: Tensor, z_above: Tensor) -> tuple[Tensor, Tensor]:
        """h_x: x_features(x), [B, H], broadcast against z_above [..., B, D]."""
        h_z = self.z_branch(z_above)
        return self.head(self.joint(torch.cat([h_x.expand_as(h_z), h_z], -1)))


class ConditionalPrior(nn.Module):
    """p(z_l | z_{l+1}): a gated MLP and a Gaussian head."""

    def __init__(self, latent_dim: int, hidden_dim: int, num_hidden: int) -> None:
        super().__init__()
        self.net = gated_mlp(latent_dim, hidden_dim, num_hidden)
        self.head = GaussianHead(hidden_dim, latent_dim)

    def forward(self, z_above: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.net(z_above))


class JointDecoder(nn.Module):
    """p(x | z_1, ..., z_L): each z_l through its own gated layer, concatenated, then the image decoder."""

    def __init__(self, num_layers, latent_dim, image_shape, num_params, hidden_dim, network) -> None:
        super().__init__()
        self.branches = nn.ModuleList(GatedDense(latent_dim, hidden_dim) for _ in range(num_layers))
        self.decoder = Decoder(num_layers * hidden_dim, image_shape, num_params, hidden_dim, 1, network)

    def forward(self, zs: list[Tensor]) -> Tensor:
        return self.decoder(torch.cat([b(z) for b, z in zip(self.branches, zs)], -1))


def renamed_lower_posteriors(state_dict: dict, prefix: str = "", *args) -> dict:
    """Checkpoints written before the rename call the lower layers' posteriors `posteriors`: the one shim kept,
    since runs of the landed code hold such checkpoints (tests/test_models.py loads one). In place; returned."""
    for key in [k for k in state_dict if k.startswith(prefix + "posteriors.")]:
        state_dict[prefix + "lower_posteriors." + key[len(prefix + "posteriors."):]] = state_dict.pop(key)
    return state_dict


class HierarchicalVAE(VAEBase):
    """The deep VAE: L stochastic layers (the two-level HVAE of Tomczak & Welling's VampPrior paper, for any L).
    q(z_L|x) and q(z_l|z_l+1, x) top-down, conditional priors p(z_l|z_l+1) below the top, the prior p(z_L) on top,
    and p(x|z_1, ..., z_L).

    image_shape: [C, H, W]. latent_dim: size of each layer. num_layers: L. hidden_dim, num_hidden, network: as for
    VAE. likelihood, prior, posterior: as for VAE (the prior and a flow posterior act on the top layer).

    vae(x) returns the ELBO's terms (ElboTerms, one KL per layer, layer 1 nearest the data first)."""

    ARGS = {**VAEBase.ARGS, "num_layers": positive_int("model.num_layers")}

    def __init__(
        self,
        image_shape: tuple[int, ...],
        latent_dim: int = 40,
        num_layers: int = 2,
        hidden_dim: int = 300,
        num_hidden: int = 2,
        network: str = "mlp",
        likelihood=None,
        prior=None,
        posterior=None,
    ) -> None:
        check_args(self.ARGS, locals())
        super().__init__(image_shape, likelihood, prior, posterior)
        self.init_args = constructor_args(HierarchicalVAE.__init__, locals(), ("likelihood", "prior", "posterior"))
        self.latent_dim, self.num_layers = latent_dim, num_layers
        # Lists run bottom-up: index 0 is layer 1 (nearest the data), index L-1 the top layer.
        self.top_encoder = Encoder(self.image_shape, latent_dim, hidden_dim, num_hidden, network)
        # q(z_l | z_l+1, x) of the layers below the top; `posterior` (VAEBase's) is the flow on the top layer's q
        self.lower_posteriors = nn.ModuleList(
            ConditionalPosterior(self.image_shape, latent_dim, hidden_dim, network) for _ in range(num_layers - 1)
        )
        self._register_load_state_dict_pre_hook(renamed_lower_posteriors)
        self.conditional_priors = nn.ModuleList(
            ConditionalPrior(latent_dim, hidden_dim, num_hidden) for _ in range(num_layers - 1)
        )
        self.decoder = JointDecoder(num_layers, latent_dim, self.image_shape, self.likelihood.num_params,
                                    hidden_dim, network)
        self.prior = self._build_prior(latent_dim, self.top_encoder)
        self.posterior = self._build_posterior(latent_dim, hidden_dim)  # a flow acts on the top layer

    @property
    def latent_dims(self) -> list[int]:
        return [self.latent_dim] * self.num_layers

    def _infer(self, x: Tensor, k: int | None, noise: Tensor | None = None):
        """Sample z_L, ..., z_1 from q top-down. Returns per layer (z, q_mu, q_logvar), bottom-up order, and the
        top layer's log q(z_L|x) when it comes from a flow (else None). noise: optional standard-normal draws
        [k, B, L * D], consumed top layer first."""
        eps = [None] * self.num_layers if noise is None else list(noise.split(self.latent_dim, dim=-1))
        z, mu, logvar, log_q_top = self._sample_posterior(self.top_encoder, x, n=k, eps=eps[0])
        layers = [(z, mu, logvar)]
        for post, e in zip(reversed(self.lower_posteriors), eps[1:]):
            mu, logvar = post(post.x_features(x), z)
            z = reparameterize(mu, logvar, eps=e)
            layers.append((z, mu, logvar))
        return layers[::-1], log_q_top

    def elbo_terms(self, x: Tensor, noise: Tensor | None = None) -> ElboTerms:
        layers, log_q_top = self._infer(x, None, noise)
        zs = [z for z, _, _ in layers]
        recon = -self.likelihood.log_prob(x, self.decoder(zs))  # [B]
        kls = []
        for i, cond_prior in enumerate(self.conditional_priors):
            _, q_mu, q_logvar = layers[i]
            p_mu, p_logvar = cond_prior(zs[i + 1])
            kls.append(kl_normal_normal(q_mu, q_logvar, p_mu, p_logvar))  # [B]
        kls.append(self._kl_top(*layers[-1], log_q_top))
        return ElboTerms(recon=recon, kl_layers=torch.stack(kls))

    def log_importance_weights(self, x: Tensor, k: int, noise: Tensor | None = None,
                               kl_weight: float | Tensor = 1.0) -> Tensor:
        layers, log_q_top = self._infer(x, k, noise)  # each z: [k, B, D]
        zs = [z for z, _, _ in layers]
        log_p_x = self.likelihood.log_prob(x, self.decoder(zs))  # [k, B]
        if isinstance(kl_weight, Tensor) or kl_weight != 1:  # the latents' part weighted (IWAE's KL warm-up)
            return log_p_x + kl_weight * self._add_latent_terms(0.0, layers, log_q_top, zs)
        return self._add_latent_terms(log_p_x, layers, log_q_top, zs)

    def _add_latent_terms(self, log_w, layers, log_q_top, zs) -> Tensor:
        """log_w + log p(z_1..L) - log q(z_1..L|x), added term by term (the order the NLL's figures were made in)."""
        log_w = log_w + self.prior.log_prob(zs[-1])
        for i, cond_prior in enumerate(self.conditional_priors):
            log_w = log_w + log_normal_diag(zs[i], *cond_prior(zs[i + 1]))
        for i, (z, q_mu, q_logvar) in enumerate(layers):
            top_flow = i == len(layers) - 1 and log_q_top is not None
            log_w = log_w - (log_q_top if top_flow else log_normal_diag(z, q_mu, q_logvar))
        return log_w

    def latents_from_top(self, z_top: Tensor) -> list[Tensor]:
        zs = [z_top]
        for cond_prior in reversed(self.conditional_priors):
            zs.append(cond_prior(zs[-1])[0])
        return zs[::-1]

    def sample_latents(self, n: int, temperature: float = 1.0) -> list[Tensor]:
        z = sample_prior(self.prior, n, temperature)
        zs = [z]
        for cond_prior in reversed(self.conditional_priors):
            mu, logvar = cond_prior(z)
            z = mu + temperature * torch.exp(0.5 * logvar) * torch.randn_like(mu)
            zs.append(z)
        return zs[::-1]

    def decode_mean(self, zs: list[Tensor]) -> Tensor:
        return self.likelihood.mean(self.decoder(zs))

    @torch.no_grad()
    def posterior_means(self, x: Tensor) -> list[Tensor]:
        """E_q[z_L|x] (with a flow: the flow at the base mean), then each lower layer's mean given the point
        above (a deterministic pass)."""
        mu = self._posterior_point(self.top_encoder, x)
        means = [mu]
        for post in reversed(self.lower_posteriors):
            mu, _ = post(post.x_features(x), mu)
            means.append(mu)
        return means[::-1]

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.decode_mean([z for z, _, _ in self._infer(x, None)[0]])
