"""The VampPrior and the hierarchical VAE against slow direct computations and against each other."""

import math
from functools import partial

import pytest
import torch

from vaelab.models import VAE, Bernoulli, Gaussian, HierarchicalVAE, StandardNormal, VampPrior
from vaelab.models.distributions import log_normal_diag
from vaelab.training.module import VAEModule
from vaelab.training.objective import Loss
from vaelab.training.recipe import TrainingRecipe

SHAPE = (1, 28, 28)


def _vamp_vae(k=5, **kw):
    torch.manual_seed(0)
    return VAE(SHAPE, latent_dim=6, hidden_dim=32, prior=partial(VampPrior, num_components=k), **kw)


def test_vamp_log_prob_equals_a_slow_direct_mixture():
    model = _vamp_vae(k=9)
    prior = model.prior
    z = torch.randn(4, 3, 6) * 2
    mu, logvar = model.encoder(prior.pseudo_inputs)  # [K, D]
    dens = torch.zeros(4, 3, dtype=torch.float64)
    for k in range(9):  # sum of densities, one component at a time, in float64
        comp = torch.distributions.Normal(mu[k].double(), torch.exp(0.5 * logvar[k]).double())
        dens += comp.log_prob(z.double()).sum(-1).exp() / 9
    torch.testing.assert_close(prior.log_prob(z).double(), dens.log(), rtol=1e-4, atol=1e-4)


def test_vamp_with_one_pseudo_input_is_that_posterior():
    model = _vamp_vae(k=1)
    z = torch.randn(10, 6)
    mu, logvar = model.encoder(model.prior.pseudo_inputs)
    torch.testing.assert_close(model.prior.log_prob(z), log_normal_diag(z, mu[0], logvar[0]))


def test_pseudo_inputs_stay_images_and_receive_gradients():
    model = _vamp_vae(k=5)
    u = model.prior.pseudo_inputs
    assert u.shape == (5, *SHAPE) and u.min() >= 0 and u.max() <= 1
    model.elbo_terms(torch.rand(8, *SHAPE).round()).loss.mean().backward()
    grad = model.prior.pseudo_inputs_raw.grad
    assert grad is not None and grad.abs().sum() > 0


def test_pseudo_input_encodings_are_computed_once_per_call_not_per_sample():
    model = _vamp_vae(k=20)
    calls = []
    model.encoder.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    model.log_importance_weights(torch.rand(7, *SHAPE).round(), 50)
    assert sorted(calls) == [7, 20]  # the batch once, the 20 pseudo-inputs once: not 50 x 7 times


def test_vamp_data_init_uses_training_images():
    model = _vamp_vae(k=3)
    images = torch.rand(10, *SHAPE)
    model.prior.init_from_data(images)
    u = model.prior.pseudo_inputs
    assert all(any(torch.equal(u[i], images[j]) for j in range(10)) for i in range(3))


def test_vamp_sampling_picks_components():
    model = _vamp_vae(k=4)
    assert model.prior.sample(11).shape == (11, 6)
    assert model.sample(3).shape == (3, *SHAPE)


MODELS = {
    "vanilla": lambda prior, lik: VAE(SHAPE, latent_dim=5, hidden_dim=24, prior=prior, likelihood=lik),
    "conv": lambda prior, lik: VAE(SHAPE, latent_dim=5, hidden_dim=24, network="conv", prior=prior, likelihood=lik),
    "deep": lambda prior, lik: HierarchicalVAE(SHAPE, latent_dim=5, hidden_dim=24, prior=prior, likelihood=lik),
    "deep3": lambda prior, lik: HierarchicalVAE(SHAPE, latent_dim=4, num_layers=3, hidden_dim=24, prior=prior,
                                                likelihood=lik),
}
PRIORS = {"standard": StandardNormal, "vamp": partial(VampPrior, num_components=6, init_mean=0.3, init_std=0.2)}


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("name", MODELS)
def test_importance_weights_at_k1_average_to_minus_elbo_terms(name, prior):
    """Two paths of the maths: E[log w] with k=1 is the ELBO, and so is -(recon + kl) from elbo_terms."""
    torch.manual_seed(0)
    lik = Gaussian("fixed", sigma=0.3) if name == "conv" else Bernoulli()
    model = MODELS[name](PRIORS[prior], lik).eval()
    x = torch.rand(3, *SHAPE)
    x = x if name == "conv" else x.round()
    with torch.no_grad():
        n = 2000
        log_w = model.log_importance_weights(x, n)  # [n, 3]
        neg_loss = -torch.stack([model.elbo_terms(x).loss for _ in range(n // 4)])  # [n/4, 3]
    diff = log_w.mean(0) - neg_loss.mean(0)
    se = (log_w.var(0) / n + neg_loss.var(0) / (n // 4)).sqrt()
    assert torch.all(diff.abs() < 4.5 * se + 1e-3), (diff, se)


def test_hierarchy_reports_one_kl_per_layer():
    model = MODELS["deep3"](StandardNormal, Bernoulli())
    terms = model.elbo_terms(torch.rand(6, *SHAPE).round())
    assert terms.kl_layers.shape == (3, 6)
    torch.testing.assert_close(terms.kl, terms.kl_layers.sum(0))
    assert [m.shape for m in model.posterior_means(torch.rand(2, *SHAPE))] == [(2, 4)] * 3


def test_free_bits_floor_each_layers_kl_and_beta_weights_it():
    model = MODELS["deep"](StandardNormal, Bernoulli())
    terms = model.elbo_terms(torch.rand(6, *SHAPE).round())
    kl = terms.kl_layers.mean(1)
    recon = terms.recon.mean()
    plain = VAEModule(model, TrainingRecipe(loss=Loss(beta=1.0))).loss  # the module's objective, from its recipe
    torch.testing.assert_close(plain(terms, 1.0), recon + kl.sum())
    torch.testing.assert_close(plain(terms, 0.25), recon + 0.25 * kl.sum())
    floor = float(kl.max().detach()) + 1.0
    fb = VAEModule(model, TrainingRecipe(loss=Loss(free_bits=floor))).loss
    torch.testing.assert_close(fb(terms, 1.0), recon + 2 * torch.tensor(floor))
    assert math.isclose(float(fb(terms, 1.0).detach()), float(recon.detach()) + 2 * floor, rel_tol=1e-6)
    assert Loss(beta=2.0, warmup_epochs=4).weight(3, steps_per_epoch=2) == pytest.approx(2.0 * 3 / 2 / 4)
