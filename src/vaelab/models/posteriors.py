"""Posteriors q(z|x) on top of the encoder's diagonal Gaussian q(z_0|x): the Gaussian itself, or an inverse
autoregressive flow (IAF; Kingma et al., 2016) that makes it flexible.

A posterior maps the Gaussian draw z_0 [..., B, D] and the encoder's features h [B, H] to (z_K, sum of the
flow's log-determinants), so that log q(z_K|x) = log q(z_0|x) - sum_k log |det dz_k/dz_{k-1}|. A model built
with a flow estimates its KL by Monte Carlo (log q(z_K|x) - log p(z_K)), for every prior.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vaelab.checks import Arg, check_args, positive_int


class GaussianPosterior(nn.Module):
    """q(z|x) = N(mu(x), diag sigma(x)^2) as the encoder gives it: z_K = z_0, no log-determinant."""

    ARGS: dict[str, Arg] = {}
    is_flow = False

    def __init__(self, latent_dim: int, context_dim: int, **context) -> None:
        super().__init__()

    def forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return z0, torch.zeros(z0.shape[:-1], dtype=z0.dtype, device=z0.device)


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE, Germain et al., 2015)."""

    def __init__(self, in_features: int, out_features: int, mask: Tensor) -> None:
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.float())

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(x, self.weight * self.mask, self.bias)


class AutoregressiveNet(nn.Module):
    """MADE with a context: (m, s) [..., D] from z [..., D] and h, where output d sees only the inputs before d
    in `order` (and all of h). Two masked hidden layers of `hidden_dim` ELU units."""

    def __init__(self, dim: int, hidden_dim: int, context_dim: int, order: Tensor) -> None:
        super().__init__()
        degree_in = order + 1  # 1..D: the position of each input in the autoregressive order
        degree_hidden = torch.arange(hidden_dim) % max(1, dim - 1) + (1 if dim > 1 else 0)
        self.first = MaskedLinear(dim, hidden_dim, degree_hidden[:, None] >= degree_in[None, :])
        self.context = nn.Linear(context_dim, hidden_dim)
        self.second = MaskedLinear(hidden_dim, hidden_dim, degree_hidden[:, None] >= degree_hidden[None, :])
        out_mask = degree_in[:, None] > degree_hidden[None, :]  # [D, H]: output d sees hidden units of degree < d
        self.out = MaskedLinear(hidden_dim, 2 * dim, torch.cat([out_mask, out_mask]))
        self.context_out = nn.Linear(context_dim, 2 * dim)  # so that every output, the first too, sees h
        self.act = nn.ELU()

    def forward(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        hidden = self.act(self.first(z) + self.context(h))
        hidden = self.act(self.second(hidden))
        m, s = (self.out(hidden) + self.context_out(h)).chunk(2, dim=-1)
        return m, s


class IAFStep(nn.Module):
    """One IAF step, in the numerically stable form of Kingma et al. (2016): sigma = sigmoid(s + 1),
    z' = sigma * z + (1 - sigma) * m; log |det dz'/dz| = sum log sigma (the Jacobian is triangular)."""

    def __init__(self, dim: int, hidden_dim: int, context_dim: int, order: Tensor) -> None:
        super().__init__()
        self.net = AutoregressiveNet(dim, hidden_dim, context_dim, order)

    def forward(self, z: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        m, s = self.net(z, h)
        log_sigma = nn.functional.logsigmoid(s + 1.0)  # the +1 starts each step near the identity-ish gate
        sigma = torch.exp(log_sigma)
        return sigma * z + (1 - sigma) * m, log_sigma.sum(-1)


class IAFPosterior(nn.Module):
    """An inverse autoregressive flow of `num_flows` steps on the encoder's Gaussian, conditioned on the
    encoder's features; the autoregressive order is reversed from one step to the next."""

    ARGS: dict[str, Arg] = {
        "num_flows": positive_int("posterior.num_flows"),
        "hidden_dim": positive_int("posterior.hidden_dim"),
    }
    is_flow = True

    def __init__(self, latent_dim: int, context_dim: int, num_flows: int = 2, hidden_dim: int = 300,
                 **context) -> None:
        check_args(self.ARGS, locals())
        super().__init__()
        order = torch.arange(latent_dim)
        self.steps = nn.ModuleList(
            IAFStep(latent_dim, hidden_dim, context_dim, order if k % 2 == 0 else order.flip(0))
            for k in range(num_flows))

    def forward(self, z0: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """z0 [..., B, D], h [B, H] -> (z_K [..., B, D], sum of log-determinants [..., B])."""
        z, log_det = z0, torch.zeros(z0.shape[:-1], dtype=z0.dtype, device=z0.device)
        h = h.expand(*z0.shape[:-1], h.shape[-1])
        for step in self.steps:
            z, step_log_det = step(z, h)
            log_det = log_det + step_log_det
        return z, log_det
