"""Small pure functions for diagonal Gaussians: the maths every model composes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def reparameterize(mu: Tensor, logvar: Tensor, n: int | None = None, eps: Tensor | None = None) -> Tensor:
    """z = mu + sigma * eps, eps ~ N(0, I); with n, n independent draws stacked in front: [n, *mu.shape].
    `eps` supplies the standard-normal draws (common random numbers) instead of the global generator."""
    std = torch.exp(0.5 * logvar)
    if eps is None:
        shape = mu.shape if n is None else (n, *mu.shape)
        eps = torch.randn(shape, dtype=mu.dtype, device=mu.device)
    return mu + std * eps


def log_normal_diag(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z | mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(-1)


def log_normal_standard(z: Tensor) -> Tensor:
    """log N(z | 0, I), summed over the last dimension."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def kl_normal_normal(mu_q: Tensor, logvar_q: Tensor, mu_p: Tensor, logvar_p: Tensor) -> Tensor:
    """Closed-form KL(N(mu_q, var_q) || N(mu_p, var_p)) for diagonal Gaussians, summed over the last dim."""
    return 0.5 * (
        logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p).pow(2)) * torch.exp(-logvar_p) - 1.0
    ).sum(-1)


def kl_normal_standard(mu: Tensor, logvar: Tensor) -> Tensor:
    """Closed-form KL(N(mu, var) || N(0, I)), summed over the last dim."""
    return 0.5 * (mu.pow(2) + torch.exp(logvar) - logvar - 1.0).sum(-1)


def log_normal_mixture(z: Tensor, mu: Tensor, logvar: Tensor) -> Tensor:
    """log N(z | mu_k, var_k) for every z against every component k: [..., D] x [K, D] -> [..., K].

    Written as matrix products (sum z^2/var - 2 z mu/var + sum mu^2/var) so that no [..., K, D]
    tensor is built: this is what keeps the VampPrior cheap at K=500 and thousands of samples.
    """
    inv_var = torch.exp(-logvar)  # [K, D]
    flat = z.reshape(-1, z.shape[-1])  # [N, D]
    quad = flat.pow(2) @ inv_var.T - 2.0 * flat @ (mu * inv_var).T  # [N, K]
    const = (mu.pow(2) * inv_var + logvar).sum(-1) + z.shape[-1] * LOG_2PI  # [K]
    out = -0.5 * (quad + const)
    return out.reshape(*z.shape[:-1], mu.shape[0])
