import pytest
import torch
import torch.nn.functional as F

from vaelab.errors import ConfigError
from vaelab.models import Bernoulli, Gaussian


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
