"""Parts a user might add, defined outside vaelab: a new prior is one class (plus its config)."""

import torch
from torch import Tensor

from vaelab.checks import check_args, positive
from vaelab.models.distributions import LOG_2PI
from vaelab.models.priors import Prior


class ScaledNormal(Prior):
    """p(z) = N(0, scale^2 I), its KL estimated by Monte Carlo (the Prior default)."""

    ARGS = {"scale": positive("prior.scale")}

    def __init__(self, latent_dim: int, scale: float = 1.0, **context) -> None:
        check_args(self.ARGS, locals())
        super().__init__()
        self.latent_dim, self.scale = latent_dim, scale

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (LOG_2PI + 2 * torch.log(torch.tensor(self.scale)) + (z / self.scale).pow(2)).sum(-1)

    def sample(self, n: int) -> Tensor:
        return self.scale * torch.randn(n, self.latent_dim)
