"""Image grids that show what a VAE learned: prior samples, reconstructions, latent interpolations and
latent traversals (and a VampPrior's pseudo-inputs). Plain PyTorch on the model protocol; used by the training
callback and vaelab-sample."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.utils import make_grid


def _grid(images: Tensor, nrow: int) -> Tensor:
    return make_grid(images.float().cpu(), nrow=nrow, padding=2, pad_value=0.5)


@torch.no_grad()
def sample_grid(model, n: int = 64, nrow: int = 8, temperature: float = 1.0) -> Tensor:
    """n prior samples; temperature scales every layer's prior standard deviation (models/base.py sample)."""
    return _grid(model.sample(n, temperature), nrow)


@torch.no_grad()
def reconstruction_grid(model, x: Tensor, nrow: int = 8) -> Tensor:
    """Rows of originals, each followed by the row of their reconstructions; with fewer than nrow images, one
    pair of rows as wide as they are, and with more, whole rows only (so that every row keeps its pair)."""
    nrow = min(nrow, x.shape[0])
    x = x[: x.shape[0] - x.shape[0] % nrow]
    recons = model.reconstruct(x)
    rows = []
    for i in range(0, x.shape[0], nrow):
        rows += [x[i : i + nrow], recons[i : i + nrow]]
    return _grid(torch.cat(rows), nrow)


@torch.no_grad()
def interpolation_images(model, x_a: Tensor, x_b: Tensor, steps: int = 10) -> Tensor:
    """[pairs, steps, C, H, W]: decode (1-t) E_q[z|x_a] + t E_q[z|x_b] for t from 0 to 1, every layer."""
    means_a, means_b = model.posterior_means(x_a), model.posterior_means(x_b)  # lists of [P, D_l]
    t = torch.linspace(0, 1, steps, device=x_a.device)[:, None, None]  # [steps, 1, 1]
    zs = [((1 - t) * a + t * b).reshape(-1, a.shape[-1]) for a, b in zip(means_a, means_b)]  # [steps*P, D]
    images = model.decode_mean(zs).reshape(steps, x_a.shape[0], *x_a.shape[1:])
    return images.transpose(0, 1)


@torch.no_grad()
def interpolation_grid(model, x_a: Tensor, x_b: Tensor, steps: int = 10) -> Tensor:
    """One row per pair: x_a, the interpolation, x_b."""
    inner = interpolation_images(model, x_a, x_b, steps)
    rows = torch.cat([x_a[:, None], inner, x_b[:, None]], 1)  # [P, steps + 2, C, H, W]
    return _grid(rows.flatten(0, 1), steps + 2)


@torch.no_grad()
def most_active_dims(model, x: Tensor, n: int, layer: int = -1) -> list[int]:
    """The n latent dimensions of a layer whose posterior means vary most over x."""
    var = model.posterior_means(x)[layer].var(0)
    return var.argsort(descending=True)[:n].tolist()


@torch.no_grad()
def traversal_images(model, x: Tensor, dims: list[int], values: Tensor, layer: int = -1) -> Tensor:
    """[len(dims), len(values), C, H, W]: start from E_q[z|x] of one image; set one dimension of one layer
    (default the top) to each value in turn, the others fixed; decode."""
    means = [m[:1] for m in model.posterior_means(x[:1])]  # per layer [1, D]
    layer = layer % len(means)
    rows = []
    for d in dims:
        zs = [m.expand(len(values), -1).clone() for m in means]
        zs[layer][:, d] = values.to(zs[layer])
        rows.append(model.decode_mean(zs))
    return torch.stack(rows)


@torch.no_grad()
def traversal_grid(model, x: Tensor, num_dims: int = 8, steps: int = 9, span: float = 3.0,
                   layer: int = -1) -> Tensor:
    """Rows: the num_dims most active dimensions of a layer; columns: values from -span to +span."""
    dims = most_active_dims(model, x, num_dims, layer)
    values = torch.linspace(-span, span, steps)
    images = traversal_images(model, x, dims, values, layer)
    return _grid(images.flatten(0, 1), steps)


def pseudo_input_range(model, n: int = 64) -> tuple[float, float] | None:
    """The smallest and largest value of the first n pseudo-inputs (None without a VampPrior)."""
    prior = getattr(model, "prior", None)
    if prior is None or not hasattr(prior, "pseudo_inputs"):
        return None
    u = prior.pseudo_inputs.detach()[:n]
    return float(u.min()), float(u.max())


def pseudo_input_grid(model, n: int = 64) -> Tensor | None:
    """The first n pseudo-inputs, min-max scaled over the grid (pseudo_input_range says from what): they start
    at N(0.05, 0.01), which at their values is a black picture that reads as broken."""
    span = pseudo_input_range(model, n)
    if span is None:
        return None
    lo, hi = span
    u = model.prior.pseudo_inputs.detach()[:n]
    return _grid((u - lo) / (hi - lo) if hi > lo else u, 8)


def grid_note(name: str, model, n: int = 64, temperature: float = 1.0) -> str:
    """What a grid's caption adds to its name (the pseudo-inputs' scale, the samples' temperature), or ''."""
    if name == "samples":
        return f"temperature {temperature:g}" if temperature != 1 else ""
    span = pseudo_input_range(model, n) if name == "pseudo_inputs" else None
    return f"scaled min-max from [{span[0]:.3f}, {span[1]:.3f}]" if span else ""


@torch.no_grad()
def component_grid(model, n: int = 64) -> Tensor | None:
    """A mixture prior's component means, decoded (the lower layers, if any, at their conditional means)."""
    means = getattr(getattr(model, "prior", None), "means", None)
    if not isinstance(means, Tensor):
        return None
    return _grid(model.decode_mean(model.latents_from_top(means[:n])), 8)


@torch.no_grad()
def all_grids(model, x: Tensor, num_samples: int = 64, steps: int = 10, temperature: float = 1.0) -> dict[str, Tensor]:
    """Every grid for a model and a fixed batch x: what the callback logs and vaelab-sample writes. With a
    single image there is no pair to interpolate between, and that grid is left out. temperature: the prior
    samples' (1: the model's prior)."""
    grids = {
        "samples": sample_grid(model, num_samples, temperature=temperature),
        "reconstructions": reconstruction_grid(model, x),
    }
    half = min(8, x.shape[0] // 2)
    if half >= 1:
        grids["interpolations"] = interpolation_grid(model, x[:half], x[half : 2 * half], steps)
    grids["traversals"] = traversal_grid(model, x, num_dims=min(8, model.latent_dims[-1]), steps=steps - 1)
    u = pseudo_input_grid(model, num_samples)
    if u is not None:
        grids["pseudo_inputs"] = u
    c = component_grid(model, num_samples)
    if c is not None:
        grids["prior_components"] = c
    return grids
