"""The protocol every VAE speaks: shapes, and the two paths of the maths agreeing."""

import pytest
import torch

from vaelab.errors import ConfigError
from vaelab.evaluation.metrics import ActiveUnits
from vaelab.models import VAE, Bernoulli, Gaussian

SHAPE = (1, 28, 28)


@pytest.mark.parametrize("network", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", [Bernoulli(), Gaussian("per_pixel")])
def test_protocol_shapes(network, likelihood):
    model = VAE(SHAPE, latent_dim=8, hidden_dim=32, network=network, likelihood=likelihood)
    x = torch.rand(5, *SHAPE).round()
    terms = model.elbo_terms(x)
    assert terms.recon.shape == terms.kl.shape == (5,) and terms.kl_layers.shape == (1, 5)
    assert model.log_importance_weights(x, 3).shape == (3, 5)
    assert model.sample(4).shape == (4, *SHAPE)
    assert model.reconstruct(x).shape == (5, *SHAPE)
    assert [m.shape for m in model.posterior_means(x)] == [(5, 8)]


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match=r"model.latent_dim must be greater than 0, got -3"):
        VAE(SHAPE, latent_dim=-3)
    with pytest.raises(ConfigError, match="model.network must be one of mlp, conv"):
        VAE(SHAPE, network="transformer")


def test_active_units_counts_dimensions_whose_posterior_mean_varies():
    metric = ActiveUnits(latent_dim=4)
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1.0, 0.5, 0.05, 0.0])  # variances 1, 0.25, 0.0025, 0
    for _ in range(5):
        metric.update(torch.randn(200, 4, generator=g) * scales + 3.0)
    assert metric.compute().item() == 2
    torch.testing.assert_close(metric.variances().float(), scales**2, atol=0.05, rtol=0.1)


def test_a_checkpoint_from_before_the_rename_of_the_lower_posteriors_loads():
    from vaelab.models import HierarchicalVAE
    from vaelab.training.checkpoints import check_weights, model_state

    torch.manual_seed(0)
    trained, fresh = HierarchicalVAE(SHAPE, latent_dim=4, hidden_dim=16), HierarchicalVAE(SHAPE, latent_dim=4, hidden_dim=16)
    old = {k.replace("lower_posteriors.", "posteriors."): v for k, v in trained.state_dict().items()}
    assert any(k.startswith("posteriors.") for k in old)
    check_weights(fresh, model_state({"state_dict": {f"model.{k}": v for k, v in old.items()}}), "old.ckpt")
    fresh.load_state_dict(dict(old))
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.state_dict().items())
