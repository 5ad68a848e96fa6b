import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vaelab.errors import ConfigError
from vaelab.models import (
    Bernoulli,
    ContinuousBernoulli,
    DiscretizedGaussian,
    DiscretizedLogistic,
    DiscretizedMixtureOfLogistics,
    Gaussian,
)
from vaelab.pixels import pixel_values


def test_bernoulli_log_likelihood_is_minus_bce_with_logits_sum():
    x = torch.bernoulli(torch.rand(6, 1, 4, 5))
    logits = torch.randn(6, 1, 4, 5) * 3
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum((1, 2, 3))
    torch.testing.assert_close(Bernoulli().log_prob(x, logits), expected)


def test_bernoulli_broadcasts_over_importance_samples():
    x = torch.bernoulli(torch.rand(3, 1, 2, 2))
    logits = torch.randn(7, 3, 1, 2, 2)
    out = Bernoulli().log_prob(x, logits)
    assert out.shape == (7, 3)
    torch.testing.assert_close(out[4], Bernoulli().log_prob(x, logits[4]))


@pytest.mark.parametrize("variance", ["fixed", "learned", "per_pixel"])
def test_gaussian_log_likelihood_is_the_density(variance):
    lik = Gaussian(variance=variance, sigma=0.3, mean_activation="identity")
    x = torch.rand(5, 2, 3, 3)
    params = torch.randn(5, 2 * lik.num_params, 3, 3)
    if variance == "per_pixel":
        mean, logvar = params[:, :2], params[:, 2:]
    else:
        mean, logvar = params, torch.full_like(params, 2 * torch.log(torch.tensor(0.3)).item())
    ref = torch.distributions.Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum((1, 2, 3))
    torch.testing.assert_close(lik.log_prob(x, params), ref, rtol=1e-5, atol=1e-4)


def test_gaussian_fixed_variance_is_scaled_mse_plus_constant():
    lik = Gaussian(variance="fixed", sigma=1.0, mean_activation="sigmoid")
    x, params = torch.rand(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    mse = F.mse_loss(torch.sigmoid(params), x, reduction="none").sum((1, 2, 3))
    const = 0.5 * 9 * torch.log(torch.tensor(2 * torch.pi))
    torch.testing.assert_close(-lik.log_prob(x, params), 0.5 * mse + const)


def test_learned_variance_receives_gradients():
    lik = Gaussian(variance="learned")
    lik.log_prob(torch.rand(2, 1, 3, 3), torch.randn(2, 1, 3, 3)).sum().backward()
    assert lik.logvar.grad is not None and lik.logvar.grad.abs() > 0


def test_bad_gaussian_options_say_what_is_allowed():
    with pytest.raises(ConfigError, match="likelihood.variance must be one of fixed, learned, per_pixel"):
        Gaussian(variance="wobbly")
    with pytest.raises(ConfigError, match="likelihood.sigma must be greater than 0"):
        Gaussian(sigma=0.0)


# -- 8-bit images: the discrete likelihoods, each an exact probability mass over the 256 values of a pixel ----------
VALUES = torch.arange(256, dtype=torch.float32).div(255.0).reshape(256, 1, 1, 1)  # 256 one-pixel images
DISCRETE = {
    "discretized_logistic": lambda: DiscretizedLogistic(min_scale=1e-4),
    "dmol": lambda: DiscretizedMixtureOfLogistics(num_mixtures=4, min_scale=1e-4),
    "discretized_gaussian fixed": lambda: DiscretizedGaussian(variance="fixed", sigma=0.05),
    "discretized_gaussian learned": lambda: DiscretizedGaussian(variance="learned", sigma=0.003),
    "discretized_gaussian per_pixel": lambda: DiscretizedGaussian(variance="per_pixel"),
}


def masses(lik, params: torch.Tensor) -> torch.Tensor:
    """P(pixel = k/255) for k = 0..255 of one pixel whose decoder output is params [num_params]."""
    return lik.log_prob(VALUES, params.reshape(1, -1, 1, 1).expand(256, -1, 1, 1)).exp()


@pytest.mark.parametrize("name", list(DISCRETE))
def test_each_discrete_likelihoods_256_probabilities_of_a_pixel_sum_to_one(name):
    torch.manual_seed(0)
    lik = DISCRETE[name]()
    for _ in range(200):  # random parameters, float32: scales from 1e-4 to several pixels' range
        params = torch.randn(lik.num_params) * 3
        if name.startswith(("discretized_logistic", "dmol")):
            params = params.reshape(-1, 1)
            params[-len(params) // (3 if name == "dmol" else 2):] = torch.empty(len(params) // (
                3 if name == "dmol" else 2), 1).uniform_(-9, 1)  # log-scales
        p = masses(lik, params.flatten())
        assert p.dtype == torch.float32 and (p >= 0).all()
        assert abs(p.double().sum().item() - 1.0) < 1e-5, (name, p.double().sum().item())


def test_a_discretized_gaussians_bin_masses_are_the_normal_cdfs_differences():
    from scipy.stats import norm

    torch.manual_seed(1)
    lik = DiscretizedGaussian(variance="per_pixel", mean_activation="identity", min_logvar=-30)
    edges = np.concatenate([[-np.inf], (np.arange(255) + 0.5) / 255, [np.inf]])
    for _ in range(50):
        mean, std = float(torch.rand(()) * 1.4 - 0.2), float(torch.empty(()).uniform_(-8, 1).exp())
        p = masses(lik, torch.tensor([mean, 2 * math.log(std)])).double().numpy()
        ref = np.diff(norm.cdf(edges, loc=mean, scale=std))  # float64, scipy's own CDF
        big = ref > 1e-6
        np.testing.assert_allclose(p[big], ref[big], rtol=2e-4, err_msg=f"mean {mean}, std {std}")
        assert abs(p.sum() - 1) < 1e-5


def test_a_tiny_scale_logistic_puts_its_mass_on_one_bin():
    lik = DiscretizedLogistic(min_scale=1e-6)
    for k in (0, 1, 77, 128, 254, 255):
        mean_logit = math.log((k / 255) / (1 - k / 255)) if 0 < k < 255 else (-30.0 if k == 0 else 30.0)
        p = masses(lik, torch.tensor([mean_logit, math.log(1e-6)]))
        assert p[k] > 1 - 1e-5 and p.sum() == pytest.approx(1, abs=1e-5), (k, p[k])


def test_dmol_with_one_component_is_the_discretized_logistic():
    x = torch.randint(0, 256, (3, 1, 4, 4)).float() / 255
    mean_logit, log_scale = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4) - 3
    one = DiscretizedMixtureOfLogistics(num_mixtures=1, min_scale=1e-4)
    params = torch.cat([torch.zeros_like(mean_logit), mean_logit, log_scale], 1)  # logits, means, log-scales
    torch.testing.assert_close(one.log_prob(x, params),
                               DiscretizedLogistic(min_scale=1e-4).log_prob(x, torch.cat([mean_logit, log_scale], 1)))


def test_continuous_bernoulli_is_a_normalised_density_and_gaussian_at_most_one():
    y = torch.linspace(0, 1, 20001).reshape(-1, 1, 1, 1)
    for logit in (-6.0, -1.0, 0.0, 0.3, 4.0):
        density = ContinuousBernoulli().log_prob(y, torch.full((len(y), 1, 1, 1), logit)).exp().double()
        assert torch.trapezoid(density.flatten(), dx=1 / 20000).item() == pytest.approx(1.0, abs=1e-4), logit
    g = Gaussian(variance="fixed", sigma=0.2).log_prob(y, torch.zeros(len(y), 1, 1, 1)).exp().double()
    assert torch.trapezoid(g.flatten(), dx=1 / 20000).item() < 1  # its mass beyond [0, 1] is lost, never gained


@pytest.mark.parametrize("name", [*DISCRETE, "continuous_bernoulli"])
def test_means_and_samples_are_pixel_values(name):
    torch.manual_seed(2)
    lik = DISCRETE[name]() if name in DISCRETE else ContinuousBernoulli()
    params = torch.randn(6, lik.num_params, 5, 5)
    mean, sample = lik.mean(params), lik.sample(params)
    assert mean.shape == sample.shape == (6, 1, 5, 5) and ((0 <= mean) & (mean <= 1)).all()
    assert ((0 <= sample) & (sample <= 1)).all()
    if name in DISCRETE:  # samples are the 8-bit values k/255, and the mean is the masses' mean
        assert torch.equal(sample * 255, torch.round(sample * 255))
        p = lik.log_prob(VALUES.reshape(256, 1, 1, 1, 1), params[:1, :, :1, :1].unsqueeze(0).expand(256, -1, -1, -1, -1)).exp()
        assert mean[0, 0, 0, 0].item() == pytest.approx((p.flatten() * VALUES.flatten()).sum().item(), abs=1e-4)


def test_bad_discrete_likelihood_values_are_one_line():
    with pytest.raises(ConfigError, match=r"likelihood.num_mixtures must be .*0"):
        DiscretizedMixtureOfLogistics(num_mixtures=0)
    with pytest.raises(ConfigError, match=r"likelihood.min_scale must be .*-1"):
        DiscretizedLogistic(min_scale=-1)
    with pytest.raises(ConfigError, match=r"likelihood=dmol does not fit binarised data \(it models 8-bit pixel "
                                          r"values\); use data.binarize=none"):
        pixel_values("8-bit", True, "dmol")
