"""Likelihoods of 8-bit images: an exact probability mass for each of the 256 values k/255 of a pixel, so that
the NLL, and bits/dim, are those of the 8-bit images themselves (vaelab/pixels.py): a discretised logistic (the
VampPrior code's log_Logistic_256), a discretised mixture of logistics (PixelCNN++, openai/vdvae, NVAE) and a
discretised Gaussian (the MSE assumption made a probability). Each value owns the bin [(k - 0.5)/255,
(k + 0.5)/255]; the edge bins take the tails (k = 0 everything below, k = 255 everything above), as PixelCNN++
does, so the 256 masses sum to 1, in float32 within 2e-6 (tests/test_likelihoods.py)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vaelab.checks import check_args, positive, positive_int
from vaelab.models.distributions import LOG_2PI
from vaelab.models.likelihoods import Gaussian, Likelihood, _sum_pixels
from vaelab.models.spec import constructor_args


def _edges(x, mean, inv_scale):
    """Standardised bin edges (lower, upper) and which pixels are the first or last value. Each edge is computed
    from the integer k as (k +- 0.5) / 255, so that neighbouring bins share the very same float: x +- 1/510
    leaves float32 gaps and overlaps between bins, and the masses summed to 1 + 2e-5."""
    k = torch.round(x * 255.0)
    return ((k - 0.5) / 255.0 - mean) * inv_scale, ((k + 0.5) / 255.0 - mean) * inv_scale, k < 0.5, k > 254.5


def _log_2sinh(h: Tensor) -> Tensor:
    """log(2 sinh h) for h > 0, exact at both ends (expm1 for small h). Each branch of the where is clamped to its
    own range: torch.where differentiates both, and an infinite value in the branch not taken makes a NaN
    gradient (it did: the logistic runs of experiment=compare_likelihoods diverged at epoch 1)."""
    small = h.clamp(min=1e-30, max=10.0)
    large = h.clamp(min=10.0)
    return torch.where(h > 10.0, large + torch.log1p(-torch.exp(-2.0 * large)), torch.log(torch.expm1(2.0 * small)) - small)


def log_mass_logistic(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(pixel = x) of a logistic(mean, exp(log_scale)) discretised to the 256 values, elementwise; exact in
    float32 (no difference of nearly equal numbers: the masses sum to 1 within 2e-6, tests/test_likelihoods.py)."""
    lower, upper, first, last = _edges(x, mean, torch.exp(-log_scale))
    # sigma(u) - sigma(l) = e^((u+l)/2) 2 sinh((u-l)/2) / ((1+e^u)(1+e^l)): no difference of nearly equal numbers
    log_delta = 0.5 * (upper + lower) + _log_2sinh(0.5 * (upper - lower)) - F.softplus(upper) - F.softplus(lower)
    return torch.where(first, F.logsigmoid(upper), torch.where(last, F.logsigmoid(-lower), log_delta))


def log_mass_normal(x: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log P(pixel = x) of a normal(mean, exp(log_std)) discretised to the 256 values, elementwise: a difference of
    normal CDFs in log space (torch.special.log_ndtr), taken on the far side of the mean; for a bin narrow against
    the standard deviation near the mean, the midpoint rule with its curvature term."""
    lower, upper, first, last = _edges(x, mean, torch.exp(-log_std))
    flip = lower > 0  # Phi(u) - Phi(l) = Phi(-l) - Phi(-u): on the side where the two are not both near 1
    a, b = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_b = torch.special.log_ndtr(b)
    # log(1 - e^d), d = log Phi(a) - log Phi(b) < 0: log(-expm1(d)), exact as d nears 0 (log1p(-exp(d)) reaches
    # log 0 there, and its infinite gradient a NaN through the where below)
    log_delta = log_b + torch.log(-torch.expm1((torch.special.log_ndtr(a) - log_b).clamp(max=-1e-30)))
    # a bin narrow against sigma near the mean: the midpoint rule with its curvature term (error ~ w^4)
    w, m = (upper - lower).clamp(min=1e-30), 0.5 * (upper + lower)
    midpoint = torch.log(w) - 0.5 * m.pow(2) - 0.5 * LOG_2PI + torch.log1p((m.pow(2) - 1) * w.pow(2) / 24)
    log_delta = torch.where((w < 0.05) & (m.abs() < 6), midpoint, log_delta)
    return torch.where(first, torch.special.log_ndtr(upper),
                       torch.where(last, torch.special.log_ndtr(-lower), log_delta))



def _survival_mean(survival, like: Tensor) -> Tensor:
    """E[X] of a pixel over the 256 values k/255: (1/255) sum_k P(X >= k/255), with P(X >= k/255) =
    survival((k - 0.5) / 255), the mass above bin k's lower edge (one elementwise pass per edge: no [256, ...])."""
    total = torch.zeros_like(like)
    for k in range(1, 256):
        total = total + survival((k - 0.5) / 255.0)
    return total / 255.0


def _to_values(y: Tensor) -> Tensor:
    """A continuous draw as the 8-bit value whose bin holds it (the edge bins take the tails): exact samples of the
    discretised distribution."""
    return torch.round(y.clamp(0.0, 1.0) * 255.0) / 255.0


class DiscretizedLogistic(Likelihood):
    """One logistic per pixel, discretised to the 256 values of 8-bit images: an exact probability mass each
    (the VampPrior code's log_Logistic_256; PixelCNN++'s edge bins). The decoder gives the mean (through a
    sigmoid, in [0, 1]) and the log-scale, bounded below by log(min_scale), in pixel units."""

    ARGS = {"min_scale": positive("likelihood.min_scale")}
    pixels = "8-bit"
    num_params = 2

    def __init__(self, min_scale: float = 1e-3) -> None:
        check_args(self.ARGS, locals())
        super().__init__()
        self.init_args = constructor_args(DiscretizedLogistic.__init__, locals())
        self.min_log_scale = math.log(min_scale)

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        raw_mean, log_scale = params.chunk(2, dim=-3)
        return torch.sigmoid(raw_mean), log_scale.clamp(min=self.min_log_scale)

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        mean, log_scale = self._split(params)
        return _sum_pixels(log_mass_logistic(x.expand_as(mean), mean, log_scale))

    def mean(self, params: Tensor) -> Tensor:
        mean, log_scale = self._split(params)
        return _survival_mean(lambda edge: torch.sigmoid((mean - edge) * torch.exp(-log_scale)), mean)

    def sample(self, params: Tensor) -> Tensor:
        mean, log_scale = self._split(params)
        u = torch.rand_like(mean).clamp(1e-6, 1 - 1e-6)
        return _to_values(mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u)))


class DiscretizedMixtureOfLogistics(Likelihood):
    """A mixture of `num_mixtures` logistics per pixel, discretised to the 256 values of 8-bit images (PixelCNN++,
    openai/vdvae, NVAE): per pixel and channel, the decoder gives K mixture logits, K means (sigmoid, in [0, 1])
    and K log-scales (at least log(min_scale)). Channels are modelled independently given z: PixelCNN++'s
    coupling of R, G and B needs a decoder output that is not per channel (docs/models.md)."""

    ARGS = {"num_mixtures": positive_int("likelihood.num_mixtures"), "min_scale": positive("likelihood.min_scale")}
    pixels = "8-bit"

    def __init__(self, num_mixtures: int = 5, min_scale: float = 1e-3) -> None:
        check_args(self.ARGS, locals())
        super().__init__()
        self.init_args = constructor_args(DiscretizedMixtureOfLogistics.__init__, locals())
        self.num_mixtures, self.min_log_scale = num_mixtures, math.log(min_scale)
        self.num_params = 3 * num_mixtures

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[..., K, C, H, W] each: log mixture weights, means, log-scales (decoder channels: parameter-major)."""
        k = self.num_mixtures
        p = params.unflatten(-3, (3, k, params.shape[-3] // (3 * k)))
        logits, raw_mean, log_scale = p.unbind(-5)
        return (torch.log_softmax(logits, dim=-4), torch.sigmoid(raw_mean), log_scale.clamp(min=self.min_log_scale))

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        log_w, mean, log_scale = self._split(params)
        x = x.unsqueeze(-4).expand_as(mean)
        return _sum_pixels(torch.logsumexp(log_w + log_mass_logistic(x, mean, log_scale), dim=-4))

    def mean(self, params: Tensor) -> Tensor:
        log_w, mean, log_scale = self._split(params)
        w, inv_s = log_w.exp(), torch.exp(-log_scale)
        return _survival_mean(lambda edge: (w * torch.sigmoid((mean - edge) * inv_s)).sum(-4), mean[..., 0, :, :, :])

    def sample(self, params: Tensor) -> Tensor:
        log_w, mean, log_scale = self._split(params)
        pick = torch.distributions.Categorical(logits=log_w.movedim(-4, -1)).sample().unsqueeze(-4)  # [..., 1, C, H, W]
        mu, ls = mean.gather(-4, pick).squeeze(-4), log_scale.gather(-4, pick).squeeze(-4)
        u = torch.rand_like(mu).clamp(1e-6, 1 - 1e-6)
        return _to_values(mu + torch.exp(ls) * (torch.log(u) - torch.log1p(-u)))


class DiscretizedGaussian(Gaussian):
    """The Gaussian (MSE) assumption made discrete: a normal per pixel, discretised to the 256 values of 8-bit
    images, an exact probability mass each; variance fixed (MSE), learned (one scalar) or per pixel, as
    likelihood=gaussian. Its figures are the 8-bit images' NLL and bits/dim, comparable with the logistic's."""

    pixels = "8-bit"

    def __init__(self, variance: str = "learned", sigma: float = 0.1, mean_activation: str = "sigmoid",
                 min_logvar: float = -14.0) -> None:
        super().__init__(variance, sigma, mean_activation, min_logvar)
        self.init_args = constructor_args(DiscretizedGaussian.__init__, locals())

    def log_prob(self, x: Tensor, params: Tensor) -> Tensor:
        mean, logvar = self._split(params)
        return _sum_pixels(log_mass_normal(x.expand_as(mean), mean, (0.5 * logvar).expand_as(mean)))

    def mean(self, params: Tensor) -> Tensor:
        mean, logvar = self._split(params)
        inv_s = torch.exp(-0.5 * logvar)
        return _survival_mean(lambda edge: torch.special.ndtr((mean - edge) * inv_s), mean)

    def sample(self, params: Tensor) -> Tensor:
        return _to_values(super().sample(params))
