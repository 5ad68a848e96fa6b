"""Flow posteriors and the mixture prior, against exact maths: the IAF's log-determinant against its autograd
Jacobian, the MoG density against torch.distributions, and for every model x prior x posterior the ELBO below
the importance-sampled bound, equal to the K=1 bound in expectation."""

import functools
import math

import pytest
import torch

from vaelab.models import (
    VAE,
    HierarchicalVAE,
    IAFPosterior,
    MixtureOfGaussians,
    StandardNormal,
    VampPrior,
)


def test_iaf_log_determinant_is_the_log_abs_det_of_its_jacobian():
    torch.manual_seed(0)
    dim, context = 5, 7
    flow = IAFPosterior(dim, context, num_flows=3, hidden_dim=24).double()
    for p in flow.parameters():  # move away from the initialisation, so that every path matters
        p.data.add_(0.3 * torch.randn_like(p))
    h = torch.randn(4, context, dtype=torch.float64)
    z0 = torch.randn(4, dim, dtype=torch.float64)
    _, log_det = flow(z0, h)
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda z: flow(z[None], h[i : i + 1])[0][0], z0[i])
        assert torch.allclose(log_det[i], torch.linalg.slogdet(jac).logabsdet, atol=1e-10)
        # autoregressive: each step is triangular; two steps in opposite orders make a full Jacobian
        assert (jac.abs() > 1e-8).sum() > dim * (dim + 1) // 2
    one = IAFPosterior(dim, context, num_flows=1, hidden_dim=24).double()
    jac = torch.autograd.functional.jacobian(lambda z: one(z[None], h[:1])[0][0], z0[0])
    assert torch.allclose(jac, torch.tril(jac))  # output d depends only on z_1..z_d


def test_mixture_of_gaussians_log_prob_matches_torch_distributions():
    torch.manual_seed(1)
    prior = MixtureOfGaussians(latent_dim=3, num_components=6)
    with torch.no_grad():
        prior.logits.copy_(torch.randn(6))
        prior.logvars.copy_(0.5 * torch.randn(6, 3))
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=prior.logits),
        torch.distributions.Independent(torch.distributions.Normal(prior.means, torch.exp(0.5 * prior.logvars)), 1))
    z = torch.randn(4, 9, 3)
    torch.testing.assert_close(prior.log_prob(z), reference.log_prob(z), atol=1e-5, rtol=1e-5)
    samples = prior.sample(20000)
    assert samples.shape == (20000, 3)
    torch.testing.assert_close(samples.mean(0), reference.mean, atol=0.05, rtol=0)
    uniform = MixtureOfGaussians(latent_dim=3, num_components=6, weights="uniform")
    assert not any(p is uniform.logits for p in uniform.parameters())
    assert torch.allclose(uniform.log_weights(), torch.full((6,), -math.log(6)))


PRIORS = {"standard": StandardNormal, "vamp": functools.partial(VampPrior, num_components=4),
          "mog": functools.partial(MixtureOfGaussians, num_components=4)}
POSTERIORS = {"gaussian": None, "iaf": functools.partial(IAFPosterior, num_flows=2, hidden_dim=16)}


@pytest.mark.parametrize("posterior", list(POSTERIORS))
@pytest.mark.parametrize("prior", list(PRIORS))
@pytest.mark.parametrize("model_cls", [VAE, HierarchicalVAE])
def test_the_elbo_is_below_the_importance_bound_and_is_its_k1_expectation(model_cls, prior, posterior):
    torch.manual_seed(2)
    model = model_cls((1, 28, 28), latent_dim=3, hidden_dim=16, prior=PRIORS[prior], posterior=POSTERIORS[posterior])
    x = torch.rand(3, 1, 28, 28).bernoulli()
    draws = 4000
    with torch.no_grad():
        elbo = -model.elbo_terms(x.repeat(draws, 1, 1, 1)).loss.view(draws, 3)  # [S, B]
        log_w1 = model.log_importance_weights(x.repeat(draws, 1, 1, 1), 1).view(draws, 3)  # K=1, [S, B]
        log_w = model.log_importance_weights(x, draws)  # [K, B]
    iw_bound = torch.logsumexp(log_w, 0) - math.log(draws)  # log p(x) >= this >= ELBO
    se = torch.sqrt(elbo.var(0) / draws + log_w1.var(0) / draws)
    assert torch.all((elbo.mean(0) - log_w1.mean(0)).abs() < 5 * se), (elbo.mean(0), log_w1.mean(0), se)
    assert torch.all(iw_bound > elbo.mean(0) + 3 * elbo.std(0) / math.sqrt(draws)), (iw_bound, elbo.mean(0))
    assert ("Monte Carlo" in model.kl_estimator) == (posterior == "iaf" or prior != "standard")


def test_the_flow_posterior_density_integrates_to_one():
    """log q(z_K|x) = log q(z_0|x) - sum log-dets is a normalised density: E_q[r(z) / q(z)] = 1 for any density r
    (here a Gaussian fitted to q's own draws, a little narrower, so that the ratio stays bounded)."""
    torch.manual_seed(3)
    model = VAE((1, 28, 28), latent_dim=2, hidden_dim=16, posterior=POSTERIORS["iaf"]).double()
    for p in model.posterior.parameters():
        p.data.add_(0.5 * torch.randn_like(p))
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64).bernoulli()
    with torch.no_grad():
        z, _, _, log_q = model._sample_posterior(model.encoder, x, n=200_000)  # [S, 1, D], [S, 1]
    z, log_q = z[:, 0], log_q[:, 0]
    r = torch.distributions.MultivariateNormal(z.mean(0), 0.8 * torch.cov(z.T))
    ratio = torch.exp(r.log_prob(z) - log_q)
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(len(ratio)) + 0.01
