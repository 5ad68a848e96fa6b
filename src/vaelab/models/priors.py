"""Priors p(z) over the (top) latent layer. Every prior offers log_prob(z), sample(n) and kl(z, mu, logvar).

A prior is built by the model, which offers it `latent_dim`, the top-layer `encoder` and `image_shape`;
each prior takes what it needs from that context.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab.checks import Arg, check_args, one_of, positive_int
from vaelab.errors import ConfigError
from vaelab.models.distributions import (
    kl_normal_standard,
    log_normal_diag,
    log_normal_mixture,
    log_normal_standard,
)

Encoder = Callable[[Tensor], tuple[Tensor, Tensor]]


class Prior(nn.Module):
    """ARGS: the rules of the prior's own arguments (conf/prior/<name>.yaml), read by config validation."""

    ARGS: dict[str, Arg] = {}
    analytic_kl: bool = False

    def log_prob(self, z: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:  # pragma: no cover - interface
        """n draws [n, D]; temperature scales each draw's standard deviation (a mixture's: its component's)."""
        raise NotImplementedError

    def kl(self, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(q(z|x) || p(z)) per example. Default: the one-sample Monte Carlo estimate
        log q(z|x) - log p(z) at the z ~ q(z|x) that the model drew (unbiased, no closed form needed)."""
        return log_normal_diag(z, mu, logvar) - self.log_prob(z)


def sample_prior(prior: Prior, n: int, temperature: float = 1.0) -> Tensor:
    """prior.sample(n, temperature); a prior of your own whose sample takes no temperature is called as
    sample(n) at temperature 1, and refused in one sentence at any other."""
    if temperature == 1:
        return prior.sample(n)
    try:
        return prior.sample(n, temperature)
    except TypeError as exc:
        if "temperature" not in str(exc) and "positional argument" not in str(exc):
            raise
        raise ConfigError(f"{type(prior).__name__}.sample takes no temperature: give it a temperature argument "
                          "(the standard deviation's factor) or sample at temperature=1") from None


class StandardNormal(Prior):
    """p(z) = N(0, I); its KL against a Gaussian posterior is in closed form."""

    analytic_kl = True

    def __init__(self, latent_dim: int, **context) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.register_buffer("_device_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, z: Tensor) -> Tensor:
        return log_normal_standard(z)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        return temperature * torch.randn(n, self.latent_dim, device=self._device_anchor.device)

    def kl(self, z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
        return kl_normal_standard(mu, logvar).expand(z.shape[:-1])


class VampPrior(Prior):
    """p(z) = (1/K) sum_k q(z | u_k): a mixture of the posteriors at K learned pseudo-inputs u_k
    (Tomczak & Welling, 2018). The u_k are images, kept in [0, 1] by a hard tanh as in the paper."""

    ARGS = {
        "num_components": positive_int("prior.num_components"),
        "init": one_of("prior.init", "random", "data"),
    }

    def __init__(
        self,
        latent_dim: int,
        encoder: Encoder,
        image_shape: tuple[int, ...],
        num_components: int = 500,
        init: str = "random",
        init_mean: float = 0.05,
        init_std: float = 0.01,
        **context,
    ) -> None:
        check_args(self.ARGS, locals())
        super().__init__()
        self.latent_dim = latent_dim
        self.num_components = num_components
        self.init = init
        # The encoder belongs to the model; hold it without registering it a second time.
        object.__setattr__(self, "_encoder", encoder)
        self.pseudo_inputs_raw = nn.Parameter(
            torch.randn(self.num_components, *image_shape) * init_std + init_mean
        )

    @property
    def pseudo_inputs(self) -> Tensor:
        """The K pseudo-inputs as images in [0, 1]: [K, C, H, W]."""
        return F.hardtanh(self.pseudo_inputs_raw, 0.0, 1.0)

    @torch.no_grad()
    def init_from_data(self, images: Tensor) -> None:
        """Set the pseudo-inputs to K random training images (prior.init=data)."""
        if images.shape[0] < self.num_components:
            raise ConfigError(
                f"prior.init=data needs at least prior.num_components={self.num_components} training images, "
                f"got {images.shape[0]}; lower prior.num_components or raise data.subset"
            )
        pick = torch.randperm(images.shape[0])[: self.num_components]
        self.pseudo_inputs_raw.copy_(images[pick].to(self.pseudo_inputs_raw))

    def components(self) -> tuple[Tensor, Tensor]:
        """q(z|u_k) for all k, computed once per call: means and log-variances [K, D]."""
        return self._encoder(self.pseudo_inputs)

    def log_prob(self, z: Tensor) -> Tensor:
        mu, logvar = self.components()
        # log (1/K) sum_k q(z|u_k), by log-sum-exp over components so nothing underflows.
        return torch.logsumexp(log_normal_mixture(z, mu, logvar), dim=-1) - math.log(self.num_components)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        mu, logvar = self.components()
        k = torch.randint(self.num_components, (n,), device=mu.device)
        return mu[k] + temperature * torch.exp(0.5 * logvar[k]) * torch.randn_like(mu[k])


class MixtureOfGaussians(Prior):
    """p(z) = sum_k w_k N(z | m_k, diag exp(v_k)): K learned means and diagonal variances, with learned or uniform
    weights. The baseline between N(0, I) and the VampPrior: a learned multimodal prior whose components are free
    parameters rather than posteriors at pseudo-inputs. Its KL has no closed form (Monte Carlo)."""

    ARGS = {
        "num_components": positive_int("prior.num_components"),
        "weights": one_of("prior.weights", "learned", "uniform"),
    }

    def __init__(self, latent_dim: int, num_components: int = 10, weights: str = "learned", init_std: float = 1.0,
                 **context) -> None:
        check_args(self.ARGS, locals())
        super().__init__()
        self.latent_dim, self.num_components = latent_dim, num_components
        self.means = nn.Parameter(torch.randn(num_components, latent_dim) * init_std)
        self.logvars = nn.Parameter(torch.zeros(num_components, latent_dim))
        logits = torch.zeros(num_components)
        if weights == "learned":
            self.logits = nn.Parameter(logits)
        else:
            self.register_buffer("logits", logits)

    def log_weights(self) -> Tensor:
        return torch.log_softmax(self.logits, dim=0)  # [K]

    def log_prob(self, z: Tensor) -> Tensor:
        # log sum_k w_k N(z | m_k, v_k), by log-sum-exp over components
        return torch.logsumexp(log_normal_mixture(z, self.means, self.logvars) + self.log_weights(), dim=-1)

    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        k = torch.multinomial(self.log_weights().exp(), n, replacement=True)
        return self.means[k] + temperature * torch.exp(0.5 * self.logvars[k]) * torch.randn(
            n, self.latent_dim, device=self.means.device)
