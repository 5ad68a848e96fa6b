"""The importance-sampled NLL against a model whose log-likelihood is known exactly: a linear-Gaussian VAE,
x = W z + b + noise, z ~ N(0, I), so p(x) = N(b, W W^T + sigma^2 I)."""

import math

import pytest
import torch
from torch import nn

from vaelab.evaluation.metrics import ImportanceSampledNLL, importance_log_weights
from vaelab.models import VAE, Gaussian

D_Z, SHAPE, SIGMA = 2, (1, 2, 3), 0.5
D_X = math.prod(SHAPE)


class LinearEncoder(nn.Module):
    def __init__(self, a, c, logvar):
        super().__init__()
        self.a, self.c, self.logvar = nn.Parameter(a), nn.Parameter(c), nn.Parameter(logvar)

    def forward(self, x):
        mu = x.flatten(-3) @ self.a.T + self.c
        return mu, self.logvar.expand_as(mu)


def linear_gaussian_vae(exact_posterior: bool):
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(D_X, D_Z, generator=g, dtype=torch.float64))
    s = torch.tensor([1.5, 0.8], dtype=torch.float64)
    w, b = q * s, torch.randn(D_X, generator=g, dtype=torch.float64) * 0.3
    post_var = 1.0 / (1.0 + s**2 / SIGMA**2)  # W^T W is diagonal, so the posterior is too
    a = post_var[:, None] * w.T / SIGMA**2
    c = -a @ b
    logvar = torch.log(post_var)
    if not exact_posterior:  # a worse proposal: shifted and too wide
        c, logvar = c + 0.4, logvar + 0.8
    decoder = nn.Sequential(nn.Linear(D_Z, D_X), nn.Unflatten(-1, SHAPE))
    with torch.no_grad():
        decoder[0].weight.copy_(w)
        decoder[0].bias.copy_(b)
    model = VAE(SHAPE, latent_dim=D_Z, likelihood=Gaussian("fixed", SIGMA, "identity"),
                encoder=LinearEncoder(a, c, logvar), decoder=decoder).double()
    exact = torch.distributions.MultivariateNormal(b, w @ w.T + SIGMA**2 * torch.eye(D_X, dtype=torch.float64))
    return model, exact


def _data(exact, n=20):
    torch.manual_seed(3)
    return exact.sample((n,)).reshape(n, *SHAPE)


def test_with_the_exact_posterior_every_importance_weight_is_log_p_x():
    model, exact = linear_gaussian_vae(exact_posterior=True)
    x = _data(exact)
    log_w = model.log_importance_weights(x, 5)  # [5, 20]
    torch.testing.assert_close(log_w, exact.log_prob(x.flatten(1)).expand(5, -1))


def test_importance_sampled_estimate_converges_to_exact_log_likelihood():
    model, exact = linear_gaussian_vae(exact_posterior=False)
    x = _data(exact)
    log_px = exact.log_prob(x.flatten(1))  # [20]
    torch.manual_seed(0)
    gaps = {}
    for k in (1, 10, 100, 1000, 10000):
        log_w = importance_log_weights(model, x, k, points_per_pass=50_000)
        estimate = torch.logsumexp(log_w, 0) - math.log(k)
        gaps[k] = (log_px - estimate).mean().item()  # >= 0 in expectation: the IWAE bound
    assert gaps[1] > 0.1, gaps  # the ELBO is loose with this proposal ...
    assert all(gaps[a] > gaps[b] for a, b in [(1, 10), (10, 100), (100, 1000)]), gaps  # ... and tightens
    assert abs(gaps[10000]) < 0.01, gaps  # ... to the exact value


def test_elbo_terms_and_importance_weights_agree_on_the_elbo():
    model, exact = linear_gaussian_vae(exact_posterior=False)
    x = _data(exact, n=4)
    torch.manual_seed(1)
    draws = 20000
    elbo_iw = model.log_importance_weights(x, draws)  # [draws, 4]: each a one-sample ELBO estimate
    terms = [model.elbo_terms(x) for _ in range(500)]
    elbo_terms = -torch.stack([t.loss for t in terms])  # [500, 4]
    diff = elbo_iw.mean(0) - elbo_terms.mean(0)
    se = (elbo_iw.var(0) / draws + elbo_terms.var(0) / 500).sqrt()
    assert torch.all(diff.abs() < 4 * se), (diff, se)


def test_nll_metric_is_the_log_mean_exp_and_merges_batches():
    metric = ImportanceSampledNLL()
    log_w = torch.log(torch.tensor([[1.0, 4.0], [3.0, 2.0]]))  # [K=2, B=2]: mean weights 2 and 3
    metric.update(log_w[:, :1])
    metric.update(log_w[:, 1:])
    expected = -(math.log(2.0) + math.log(3.0)) / 2
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)


def test_monte_carlo_standard_error_predicts_the_spread_of_repeated_estimates():
    model, exact = linear_gaussian_vae(exact_posterior=False)
    x = _data(exact, n=50)
    estimates, ses = [], []
    torch.manual_seed(5)
    for _ in range(40):
        metric = ImportanceSampledNLL()
        metric.update(model.log_importance_weights(x, 64))
        estimates.append(metric.compute().item())
        ses.append(metric.standard_error().item())
    spread = torch.tensor(estimates).std().item()
    predicted = sum(ses) / len(ses)
    assert 0.6 < spread / predicted < 1.5, (spread, predicted)


def test_common_random_numbers_make_estimates_independent_of_batching_and_chunking():
    from vaelab.evaluation.noise import counter_normal

    model, exact = linear_gaussian_vae(exact_posterior=False)
    x = _data(exact, n=12)
    index = torch.arange(100, 112)
    whole = importance_log_weights(model, x, 40, points_per_pass=10_000, index=index, seed=3)
    parts = torch.cat([importance_log_weights(model, x[i:i + 5], 40, points_per_pass=35, index=index[i:i + 5], seed=3)
                       for i in range(0, 12, 5)], dim=1)
    torch.testing.assert_close(whole, parts)
    other = importance_log_weights(model, x, 40, index=index, seed=4)
    assert not torch.allclose(whole, other)
    eps = counter_normal(0, torch.arange(2000), 0, 50, 8).flatten().double()
    assert abs(eps.mean()) < 0.01 and abs(eps.std() - 1) < 0.01  # 800k draws: N(0, 1) to within noise
    assert abs(torch.corrcoef(torch.stack([eps[:-1], eps[1:]]))[0, 1]) < 0.01  # neighbours uncorrelated


def test_points_per_pass_is_auto_by_device_or_a_positive_number():
    from vaelab.errors import ConfigError
    from vaelab.evaluation.metrics import AUTO_POINTS_PER_PASS, points_per_pass_for

    assert points_per_pass_for("auto", torch.device("cpu")) == AUTO_POINTS_PER_PASS["cpu"] == 5_000
    assert points_per_pass_for("auto", torch.device("cuda")) == AUTO_POINTS_PER_PASS["cuda"]
    assert points_per_pass_for(1234, torch.device("cpu")) == 1234
    for bad in ("abc", 0, -5, True):
        with pytest.raises(ConfigError, match="importance_points_per_pass must be"):
            points_per_pass_for(bad, torch.device("cpu"))
