import math

import torch

from vaelab.models.distributions import (
    kl_normal_normal,
    kl_normal_standard,
    log_normal_diag,
    log_normal_mixture,
    log_normal_standard,
    reparameterize,
)


def test_closed_form_kl_matches_monte_carlo_within_standard_error():
    g = torch.Generator().manual_seed(0)
    mu_q, logvar_q = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g) * 0.5
    mu_p, logvar_p = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g) * 0.5
    torch.manual_seed(1)
    z = reparameterize(mu_q, logvar_q, n=200_000)  # [N, 5, 8]
    samples = log_normal_diag(z, mu_q, logvar_q) - log_normal_diag(z, mu_p, logvar_p)  # [N, 5]
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    exact = kl_normal_normal(mu_q, logvar_q, mu_p, logvar_p)
    assert torch.all((mc - exact).abs() < 4 * se), (mc, exact, se)
    assert torch.all(exact > 0)


def test_kl_against_standard_normal_is_the_special_case():
    mu, logvar = torch.randn(7, 3), torch.randn(7, 3)
    zeros = torch.zeros_like(mu)
    torch.testing.assert_close(kl_normal_standard(mu, logvar), kl_normal_normal(mu, logvar, zeros, zeros))
    assert torch.allclose(kl_normal_standard(zeros, zeros), torch.zeros(7))


def test_log_normal_densities_match_torch_distributions():
    mu, logvar, z = torch.randn(4, 6), torch.randn(4, 6), torch.randn(4, 6)
    ref = torch.distributions.Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal_diag(z, mu, logvar), ref)
    torch.testing.assert_close(log_normal_standard(z), torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1))


def test_mixture_log_density_by_matmul_equals_direct_broadcast():
    mu, logvar = torch.randn(11, 5), torch.randn(11, 5) * 0.7
    z = torch.randn(3, 4, 5)
    direct = log_normal_diag(z[..., None, :], mu, logvar)  # [3, 4, 11]
    torch.testing.assert_close(log_normal_mixture(z, mu, logvar), direct, rtol=1e-4, atol=1e-4)
