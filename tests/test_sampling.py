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


def test_the_pseudo_inputs_grid_is_readable_and_its_caption_says_its_scale():
    """A fresh VampPrior's pseudo-inputs lie in about [0.02, 0.08] (their init, N(0.05, 0.01)): at their values a
    black picture. The grid spans black to white (min-max over the grid) and its note gives the true range."""
    from functools import partial

    from vaelab.evaluation.grids import grid_note, pseudo_input_grid
    from vaelab.models.priors import VampPrior
    from vaelab.training.callbacks.grids import to_uint8

    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent_dim=2, hidden_dim=16, prior=partial(VampPrior, num_components=16))
    u = model.prior.pseudo_inputs.detach()
    assert u.max() < 0.2  # what a person would see as black
    pixels = to_uint8(pseudo_input_grid(model, 16))
    cells = pixels[2:10, 2:10, 0]  # the first pseudo-input, inside the grid's padding
    assert pixels.min() == 0 and pixels.max() == 255
    first = u[0, 0]
    expected = ((first - u.min()) / (u.max() - u.min())).mul(255).add(0.5).floor().to(torch.uint8).numpy()
    assert (cells == expected).all()
    assert grid_note("pseudo_inputs", model, 16) == f"scaled min-max from [{u.min():.3f}, {u.max():.3f}]"
    assert grid_note("samples", model, 16) == ""
