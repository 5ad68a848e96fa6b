"""Likelihood families p(x|z): each turns decoder output into log p(x|z), a mean and a sample.

A decoder produces `num_params` channels per image channel; the likelihood reads them.
log_prob returns one value per example, summed over pixels: [*batch].
Each says which pixel values it models (`pixels`, vaelab/pixels.py): binary (Bernoulli), or a density on [0, 1]
(Gaussian, continuous Bernoulli), given dequantised 8-bit images. The likelihoods of the 256 values of 8-bit
images, each an exact probability mass, are in discrete.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab.checks import Arg, check_args, one_of, positive
from vaelab.models.spec import constructor_args, qualified_name


def _sum_pixels(t: Tensor, image_ndim: int = 3) -> Tensor:
    return t.flatten(-image_ndim).sum(-1)


class Likelihood(nn.Module):
    """Base class: `num_params` decoder channels per image channel; ARGS, the rules of its own arguments."""

    ARGS: dict[str, Arg] = {}
    num_params: int = 1
    pixels: str = "continuous"  # the pixel values it models: binary, 8-bit or continuous (vaelab/pixels.py)
    init_args: dict = {}  # the constructor's arguments, for spec()

    def spec(self) -> dict:
        """This likelihood as plain data (models/spec.py)."""
        return {"_target_": qualified_name(type(self)), **self.init_args}

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def sample(self, params: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Bernoulli(Likelihood):
    """Bernoulli pixels with logits from the decoder; -log p(x|z) is the summed binary cross-entropy. No arguments.
    A likelihood of binary pixels: on grey ones BCE is no normalised likelihood (continuous_bernoulli is)."""

    pixels = "binary"

    def __init__(self) -> None:
        super().__init__()

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        x = x.expand_as(params)
        return -_sum_pixels(F.binary_cross_entropy_with_logits(params, x, reduction="none"))

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def sample(self, params: Tensor) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params))


class Gaussian(Likelihood):
    """Gaussian pixels: mean from the decoder, variance fixed, learned (one scalar) or per pixel.

    With fixed variance, -log p(x|z) is the summed squared error / (2 sigma^2) plus a constant (MSE).
    `mean_activation="sigmoid"` keeps means in the [0, 1] range of images; "identity" leaves them free.
    """

    ARGS = {
        "variance": one_of("likelihood.variance", "fixed", "learned", "per_pixel"),
        "sigma": positive("likelihood.sigma"),
        "mean_activation": one_of("likelihood.mean_activation", "sigmoid", "identity"),
    }

    def __init__(
        self,
        variance: str = "learned",
        sigma: float = 0.1,
        mean_activation: str = "sigmoid",
        min_logvar: float = -9.0,
    ) -> None:
        check_args(self.ARGS, locals())
        super().__init__()
        self.init_args = constructor_args(Gaussian.__init__, locals())
        self.variance = variance
        self.mean_activation = mean_activation
        self.min_logvar = min_logvar
        self.num_params = 2 if variance == "per_pixel" else 1
        logvar = torch.tensor(2.0 * math.log(sigma))
        if variance == "learned":
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer("logvar", logvar)

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        if self.variance == "per_pixel":
            raw_mean, logvar = params.chunk(2, dim=-3)
        else:
            raw_mean, logvar = params, self.logvar
        mean = torch.sigmoid(raw_mean) if self.mean_activation == "sigmoid" else raw_mean
        return mean, logvar.clamp(min=self.min_logvar)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        mean, logvar = self._split(params)
        log_density = -0.5 * (math.log(2 * math.pi) + logvar + (x - mean).pow(2) * torch.exp(-logvar))
        return _sum_pixels(log_density.expand_as(mean))

    def mean(self, params: Tensor) -> Tensor:
        return self._split(params)[0]

    def sample(self, params: Tensor) -> Tensor:
        mean, logvar = self._split(params)
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019): BCE made a normalised density on [0, 1], for
    grey pixels, with logits from the decoder (torch.distributions.ContinuousBernoulli). A density: on 8-bit
    images it is given dequantised pixels, and its bits/dim is the dequantised bound. No arguments."""

    pixels = "continuous"

    def __init__(self) -> None:
        super().__init__()

    def _dist(self, params: Tensor):
        return torch.distributions.ContinuousBernoulli(logits=params, validate_args=False)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        return _sum_pixels(self._dist(params).log_prob(x.expand_as(params)))

    def mean(self, params: Tensor) -> Tensor:
        return self._dist(params).mean

    def sample(self, params: Tensor) -> Tensor:
        return self._dist(params).sample()
