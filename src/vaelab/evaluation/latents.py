"""The latent space from Python: embed images (their posterior means) and interpolate between images, for any VAE
that speaks the protocol (models/base.py). Exported as vaelab.embed and vaelab.interpolate."""

from __future__ import annotations

import torch
from torch import Tensor

from vaelab.evaluation.grids import interpolation_images


@torch.no_grad()
def embed(model, images: Tensor, layer: int = -1, batch_size: int = 1000) -> Tensor:
    """E_q[z|x] of every image at stochastic `layer` (default: the top one; 0 is the layer nearest the data), in
    batches on the model's device: [N, D]. With a flow posterior, the flow at the base Gaussian's mean."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        out = [model.posterior_means(images[i:i + batch_size].to(device))[layer].cpu()
               for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def interpolate(model, x_a: Tensor, x_b: Tensor, steps: int = 10) -> Tensor:
    """Images decoded along the straight line between the posterior means of x_a and x_b (every layer), t from 0 to
    1: [steps, C, H, W] for single images [C, H, W], [pairs, steps, C, H, W] for batches."""
    single = x_a.dim() == 3
    device = next(model.parameters()).device
    a, b = (x.unsqueeze(0) if single else x for x in (x_a, x_b))
    images = interpolation_images(model, a.to(device), b.to(device), steps).cpu()
    return images[0] if single else images
