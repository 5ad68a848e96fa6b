"""Interpolation and traversal grids: the expected shapes, and images that change along the varied axis."""

import pytest
import torch

from vaelab.evaluation.grids import all_grids, interpolation_images, traversal_images
from vaelab.models import VAE, HierarchicalVAE

SHAPE = (1, 28, 28)


@pytest.mark.parametrize("make", [lambda: VAE(SHAPE, latent_dim=6, hidden_dim=32),
                                  lambda: HierarchicalVAE(SHAPE, latent_dim=6, hidden_dim=32)])
def test_interpolations_and_traversals(make):
    torch.manual_seed(0)
    model = make().eval()
    with torch.no_grad():  # an untrained net maps everything near one image: make it sensitive
        for p in model.parameters():
            p.mul_(4.0)
    x = torch.rand(8, *SHAPE).round()
    inter = interpolation_images(model, x[:3], x[3:6], steps=7)
    assert inter.shape == (3, 7, *SHAPE)
    assert (inter[:, 0] - inter[:, -1]).abs().mean() > 1e-3  # the ends differ ...
    steps = (inter[:, 1:] - inter[:, :-1]).abs().flatten(2).mean(-1)
    assert torch.all(steps > 0)  # ... and every step moves
    # t=0 decodes the posterior mean of x_a itself
    zs = model.posterior_means(x[:3])
    torch.testing.assert_close(inter[:, 0], model.decode_mean(zs), atol=1e-4, rtol=1e-4)

    values = torch.linspace(-3, 3, 5)
    trav = traversal_images(model, x, dims=[0, 2, 4], values=values)
    assert trav.shape == (3, 5, *SHAPE)
    along = (trav[:, 1:] - trav[:, :-1]).abs().flatten(2).mean(-1)  # [dims, values-1]
    assert torch.all(along > 0)  # the image changes as the one dimension moves


def test_all_grids_are_image_grids():
    model = VAE(SHAPE, latent_dim=4, hidden_dim=16).eval()
    grids = all_grids(model, torch.rand(8, *SHAPE), num_samples=16, steps=6)
    assert set(grids) == {"samples", "reconstructions", "interpolations", "traversals"}
    assert grids["interpolations"].shape[-1] == 2 + 8 * 30  # 8 columns: x_a, 6 steps, x_b
    assert grids["traversals"].shape[-2] == 2 + 4 * 30  # 4 rows: every dimension of a 4-d latent
