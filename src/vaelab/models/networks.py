"""Encoder and decoder networks. Encoders map x to the parameters (mu, logvar) of a diagonal Gaussian;
decoders map z to the parameters of p(x|z). Both accept any number of leading batch dimensions."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vaelab.checks import one_of
from vaelab.errors import ConfigError

NETWORK = one_of("model.network", "mlp", "conv")  # the image networks, as model.network names them


class GatedDense(nn.Module):
    """h = (W x + b) * sigmoid(V x + c): the gated units of the VampPrior paper."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.h = nn.Linear(in_features, out_features)
        self.g = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.h(x) * torch.sigmoid(self.g(x))


def gated_mlp(in_features: int, hidden_dim: int, num_hidden: int) -> nn.Sequential:
    layers, width = [], in_features
    for _ in range(num_hidden):
        layers.append(GatedDense(width, hidden_dim))
        width = hidden_dim
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """Features -> (mu, logvar); logvar bounded to [-6, 2] by a hard tanh, as in the VampPrior code."""

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.mu = nn.Linear(in_features, latent_dim)
        self.logvar = nn.Linear(in_features, latent_dim)
        self.bound = nn.Hardtanh(-6.0, 2.0)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        return self.mu(h), self.bound(self.logvar(h))


def _flatten_leading(x: Tensor, event_ndim: int) -> tuple[Tensor, torch.Size]:
    lead = x.shape[: x.dim() - event_ndim]
    return x.reshape(-1, *x.shape[x.dim() - event_ndim :]), lead


class ImageFeatures(nn.Module):
    """x [..., C, H, W] -> features [..., hidden_dim], by a gated MLP or a small conv stack."""

    def __init__(self, image_shape: tuple[int, ...], hidden_dim: int, num_hidden: int, network: str) -> None:
        super().__init__()
        c, h, w = image_shape
        if NETWORK.check(network) == "mlp":
            self.net = nn.Sequential(nn.Flatten(), gated_mlp(c * h * w, hidden_dim, num_hidden))
        elif network == "conv":
            _check_conv_shape(image_shape)
            self.net = nn.Sequential(
                nn.Conv2d(c, 32, 4, 2, 1), nn.ELU(),
                nn.Conv2d(32, 64, 4, 2, 1), nn.ELU(),
                nn.Flatten(),
                gated_mlp(64 * (h // 4) * (w // 4), hidden_dim, max(1, num_hidden - 1)),
            )
        self.out_features = hidden_dim

    def forward(self, x: Tensor) -> Tensor:
        flat, lead = _flatten_leading(x, 3)
        h = self.net(flat)
        return h.reshape(*lead, h.shape[-1])


class Encoder(nn.Module):
    """q(z|x) = N(mu(x), diag exp(logvar(x)))."""

    def __init__(self, image_shape, latent_dim: int, hidden_dim: int, num_hidden: int, network: str) -> None:
        super().__init__()
        self.features = ImageFeatures(image_shape, hidden_dim, num_hidden, network)
        self.head = GaussianHead(hidden_dim, latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.features(x))

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mu, logvar, h): the Gaussian's parameters and the features h they came from, the context a flow
        posterior conditions on."""
        h = self.features(x)
        mu, logvar = self.head(h)
        return mu, logvar, h


class Decoder(nn.Module):
    """z [..., in_features] -> parameters of p(x|z) [..., C * num_params, H, W]."""

    def __init__(
        self, in_features: int, image_shape, num_params: int, hidden_dim: int, num_hidden: int, network: str
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        self.out_shape = (c * num_params, h, w)
        if NETWORK.check(network) == "mlp":
            self.net = nn.Sequential(
                gated_mlp(in_features, hidden_dim, num_hidden),
                nn.Linear(hidden_dim if num_hidden else in_features, math.prod(self.out_shape)),
                nn.Unflatten(-1, self.out_shape),
            )
        elif network == "conv":
            _check_conv_shape(image_shape)
            self.net = nn.Sequential(
                gated_mlp(in_features, hidden_dim, max(1, num_hidden - 1)),
                nn.Linear(hidden_dim, 64 * (h // 4) * (w // 4)), nn.ELU(),
                nn.Unflatten(-1, (64, h // 4, w // 4)),
                nn.ConvTranspose2d(64, 32, 4, 2, 1), nn.ELU(),
                nn.ConvTranspose2d(32, 32, 4, 2, 1), nn.ELU(),
                nn.Conv2d(32, c * num_params, 3, 1, 1),
            )

    def forward(self, z: Tensor) -> Tensor:
        flat, lead = _flatten_leading(z, 1)
        out = self.net(flat)
        return out.reshape(*lead, *self.out_shape)


def _check_conv_shape(image_shape) -> None:
    if image_shape[1] % 4 or image_shape[2] % 4:
        raise ConfigError(
            f"model.network=conv needs image height and width divisible by 4, got {tuple(image_shape)}; "
            "use model.network=mlp for this data set"
        )
