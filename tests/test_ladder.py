"""model=ladder, the top-down hierarchical VAE: its maths against closed forms and Monte Carlo, the protocol every
vaelab model speaks, sampling temperature, and one sentence for each size the images cannot hold."""

import functools
import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaelab.errors import ConfigError
from vaelab.models import (
    DiscretizedLogistic,
    DiscretizedMixtureOfLogistics,
    IAFPosterior,
    LadderVAE,
    MixtureOfGaussians,
    VampPrior,
)

SHAPE = (1, 28, 28)
SMALL = dict(width=8, cell_width=4, latent_channels=2, encoder_blocks=[1, 1, 1])


def ladder(**kw) -> LadderVAE:
    torch.manual_seed(0)
    return LadderVAE(kw.pop("shape", SHAPE), **{**SMALL, **kw})


def trained_a_little(model: LadderVAE, x: torch.Tensor, steps: int = 30) -> LadderVAE:
    """Some steps so that the conditional priors are no longer their initial N(0, I)."""
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(steps):
        loss = model(x).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def binary():
    return torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(0)).bernoulli()


def test_layers_sizes_and_the_protocol(binary):
    m = ladder()
    assert m.latent_dims == [2 * 14 * 14] * 2 + [2 * 7 * 7] * 3 + [2] * 2  # layer 1 (nearest the data) first
    terms = m(binary)
    assert terms.kl_layers.shape == (7, 16) and terms.recon.shape == (16,)
    assert m.log_importance_weights(binary, 5).shape == (5, 16)
    assert m.sample(3).shape == (3, *SHAPE) and m.reconstruct(binary).shape == binary.shape
    assert [z.shape[1] for z in m.posterior_means(binary)] == m.latent_dims
    zs = m.latents_from_top(torch.randn(4, 2))
    assert [z.shape for z in zs] == [(4, d) for d in m.latent_dims]
    assert m.decode_mean(zs).shape == (4, *SHAPE)
    grads = torch.autograd.grad(terms.loss.mean(), list(m.parameters()), allow_unused=True)
    # everything but the flow-free top's unused parts takes a gradient; the zero-initialised priors do too
    assert all(g is not None for g in grads)


def test_the_noise_argument_is_the_draws_elbo_terms_makes(binary):
    m = ladder()
    torch.manual_seed(5)
    fresh = m(binary).loss
    torch.manual_seed(5)
    given = m(binary, m.draw_noise(16)).loss
    assert torch.equal(fresh, given)
    torch.manual_seed(6)
    fresh = m.log_importance_weights(binary, 3)
    torch.manual_seed(6)
    assert torch.equal(fresh, m.log_importance_weights(binary, 3, m.draw_noise(48).view(3, 16, -1)))


def test_each_layers_kl_is_the_closed_form_of_its_two_gaussians(binary):
    """The KL per layer against torch.distributions' KL of q(z_l|x,z_>l) and p(z_l|z_>l) at the same draws."""
    m = trained_a_little(ladder(), binary)
    noise = m.draw_noise(16)
    terms = m(binary, noise)
    _, out = m._top_down(m._bottom_up(binary), 16, eps=m._split(noise, 16))
    for layer, (z, q_mu, q_logvar, p_mu, p_logvar, _) in enumerate(reversed(out)):
        if p_mu is None:  # the top layer: against the standard normal prior
            p_mu, p_logvar = torch.zeros_like(q_mu), torch.zeros_like(q_logvar)
        want = kl_divergence(Normal(q_mu, (0.5 * q_logvar).exp()), Normal(p_mu, (0.5 * p_logvar).exp())).sum(-1)
        assert torch.allclose(terms.kl_layers[layer], want, rtol=1e-4, atol=1e-4), layer
        assert want.mean() > 1e-3  # a layer that carries information, not the trivial 0 = 0


def test_the_importance_weights_average_to_the_elbo_and_their_bound_is_tighter(binary):
    """log w at one sample is log p(x,z) - log q(z|x): its mean over many draws is the ELBO (whose KL is in closed
    form), to Monte Carlo error; and log-mean-exp over k draws (the IWAE bound) is above the ELBO."""
    m = trained_a_little(ladder(), binary)
    x = binary[:4]
    with torch.no_grad():
        log_w = m.log_importance_weights(x, 2000)  # [2000, 4]
        elbo = torch.stack([-m(x).loss for _ in range(200)]).mean(0)
    mc, se = log_w.mean(0), log_w.std(0) / math.sqrt(2000)
    assert torch.all((mc - elbo).abs() < 4 * se + 0.5), (mc, elbo, se)
    iwae = torch.logsumexp(log_w, 0) - math.log(2000)
    assert torch.all(iwae > elbo + 0.1)


def test_temperature_scales_every_layers_prior_spread():
    m = trained_a_little(ladder(), torch.rand(16, *SHAPE, generator=torch.Generator().manual_seed(1)).bernoulli())
    torch.manual_seed(0)
    cold = m.sample_latents(256, temperature=1e-6)
    zs = m.latents_from_top(torch.zeros(1, 2))  # every layer at its conditional prior's mean under a zero top
    for c, z in zip(cold, zs):
        assert torch.allclose(c, z.expand_as(c), atol=1e-4)
    spread = [torch.stack(m.sample_latents(2000, temperature=t)[-1:]).std().item() for t in (1.0, 0.5)]
    assert spread[1] / spread[0] == pytest.approx(0.5, rel=0.1)  # the top layer's N(0, I) draws, scaled
    with pytest.raises(ConfigError, match="temperature=0 must be above 0"):
        m.sample(4, temperature=0)


@pytest.mark.parametrize("prior", ["vamp", "mog"])
def test_a_vector_top_layer_takes_the_vampprior_and_the_mixture_prior(binary, prior):
    factory = {"vamp": functools.partial(VampPrior, num_components=6),
               "mog": functools.partial(MixtureOfGaussians, num_components=3)}[prior]
    m = ladder(prior=factory)
    terms = m(binary)
    assert torch.isfinite(terms.loss).all() and terms.kl_layers.shape[0] == 7
    if prior == "vamp":  # the mixture of the top layer's posteriors at the pseudo-inputs
        mu, logvar = m.prior.components()
        assert mu.shape == (6, 2) and torch.allclose(mu, m.encode_top(m.prior.pseudo_inputs)[0])
    params = dict(m.named_parameters())
    grads = torch.autograd.grad(terms.loss.mean(), list(params.values()), allow_unused=True)
    prior_grads = [g for n, g in zip(params, grads) if n.startswith("prior.")]
    assert prior_grads and all(g is not None and g.abs().sum() > 0 for g in prior_grads)
    assert torch.isfinite(m.log_importance_weights(binary, 3)).all() and m.sample(2).shape == (2, *SHAPE)


def test_an_iaf_posterior_acts_on_the_top_layer(binary):
    m = ladder(posterior=functools.partial(IAFPosterior, num_flows=2, hidden_dim=16))
    assert m.posterior.is_flow
    terms = m(binary)
    assert torch.isfinite(terms.loss).all()
    log_w = m.log_importance_weights(binary, 4)
    assert torch.isfinite(log_w).all() and "log-determinants" in m.kl_estimator


@pytest.mark.parametrize("likelihood", [DiscretizedLogistic(), DiscretizedMixtureOfLogistics(num_mixtures=3)])
def test_8bit_colour_images_with_the_discrete_likelihoods(likelihood):
    """CIFAR-sized 3x32x32 images of 8-bit values with latents at 16x16, 8x8 and 1x1."""
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0)).float() / 255
    m = ladder(shape=(3, 32, 32), resolutions=[16, 8, 1], likelihood=likelihood)
    before = m(x).loss.mean().item()
    after = trained_a_little(m, x, steps=15)(x).loss.mean().item()
    assert math.isfinite(before) and after < before - 1000  # it learns these images' 8-bit values
    assert m.sample(2).shape == (2, 3, 32, 32)


@pytest.mark.parametrize("kwargs,says", [
    (dict(resolutions=[14, 7, 3]), "model.resolutions=[14, 7, 3] cannot hold these 28x28 images"),
    (dict(resolutions=[12, 6, 1]), "cannot hold these 28x28 images"),
    (dict(resolutions=[56, 28, 1]), "cannot hold"),
    (dict(resolutions=[14, 7], latent_layers=[2, 3, 2]), "one entry per resolution"),
    (dict(latent_layers=[0, 3, 2]), "at least one layer per resolution"),
    (dict(latent_channels=0), "model.latent_channels must be greater than 0, got 0"),
    (dict(width=0), "model.width must be greater than 0"),
    (dict(shape=(1, 28, 20)), "needs square images"),
])
def test_a_size_the_images_cannot_hold_is_one_sentence(kwargs, says):
    with pytest.raises(ConfigError, match=says.replace("[", r"\[").replace("]", r"\]")) as err:
        ladder(**kwargs)
    assert "\n" not in str(err.value)


def test_the_fields_size_builds_and_latents_at_the_image_size_work():
    m = ladder(resolutions=[28, 14, 7, 1], latent_layers=[1, 1, 1, 1], encoder_blocks=[1, 1, 1, 1])
    x = torch.rand(2, *SHAPE).bernoulli()
    assert m.latent_dims[0] == 2 * 28 * 28 and torch.isfinite(m(x).loss).all()
