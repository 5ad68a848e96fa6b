"""The CPU fast paths are the same maths: fused Adam against torch's default Adam, and the module's wiring."""

from functools import partial

import torch

from vaelab.models.likelihoods import Bernoulli
from vaelab.models.priors import StandardNormal
from vaelab.models.vae import VAE
from vaelab.training.module import VAEModule
from vaelab.training.optim import adam
from vaelab.training.recipe import TrainingRecipe


def _model(seed: int) -> VAE:
    torch.manual_seed(seed)
    return VAE((1, 8, 8), latent_dim=4, hidden_dim=16, likelihood=Bernoulli(), prior=StandardNormal)


def test_fused_adam_takes_the_same_steps_as_default_adam():
    a, b = _model(0), _model(0)
    fused, plain = adam(list(a.parameters()), 1e-2, 1e-4, fused=True), adam(list(b.parameters()), 1e-2, 1e-4, fused=False)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    x = torch.bernoulli(torch.full((32, 1, 8, 8), 0.3), generator=torch.Generator().manual_seed(1))
    for step in range(20):
        for model, opt in ((a, fused), (b, plain)):
            torch.manual_seed(step)  # the same reparameterisation noise for both
            opt.zero_grad()
            model.elbo_terms(x).loss.mean().backward()
            opt.step()
    moved = [(pa - p0).abs().max() for pa, p0 in zip(a.parameters(), _model(0).parameters())]
    assert min(moved) > 1e-3  # the steps did something
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


def test_the_module_builds_fused_adam_only_when_asked():
    assert VAEModule(_model(0)).configure_optimizers().defaults["fused"] is True
    unfused = TrainingRecipe(optimizer=partial(torch.optim.Adam, lr=5e-4, fused=False))
    assert not VAEModule(_model(0), unfused).configure_optimizers().defaults["fused"]
