"""The training objective and every setting of it, as one object (`Loss`, built from conf/loss/ or in Python):
which bound (the ELBO, or the IWAE bound with k samples), the KL weight that warms up linearly, and free bits.
The step (step.py) asks it for a step's noise and its objective: solo, in a CUDA graph and stacked alike. A new
objective is added here, once."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import Tensor

from vaelab.checks import Arg, check_args, non_negative, one_of, positive_int
from vaelab.errors import ConfigError
from vaelab.models.base import ElboTerms


@dataclass(frozen=True)
class Loss:
    """objective=elbo (the default): recon + beta_t * sum_l max(free_bits, KL_l), batch means. With beta=1, no
    warm-up and no free bits it is -ELBO. beta_t rises linearly from 0 to `beta` over `warmup_epochs` (fractional
    epochs; 0: no warm-up); free bits (Kingma et al. 2016) remove the pressure on a layer's KL below `free_bits`
    nats, against posterior collapse.

    objective=iwae: -log (1/k) sum_i w_i, w_i = p(x|z_i) (p(z_i) / q(z_i|x))^beta_t, z_i ~ q(z|x), batch mean:
    with beta_t = 1 the importance-weighted bound of Burda et al. (2016) with k = `samples` (k=1: the ELBO with a
    Monte Carlo KL). beta and its warm-up weight each sample's log p(z) - log q(z|x), the KL's estimate; free bits
    floor a layer's KL, which the bound does not have, so they are refused. The step's recon and KL statistics are
    then the ELBO's terms at the first of the k samples."""

    beta: float = 1.0
    warmup_epochs: float = 0.0
    free_bits: float = 0.0
    objective: str = "elbo"
    samples: int = 1

    ARGS: ClassVar[dict[str, Arg]] = {  # named by their config keys (conf/loss/)
        "beta": non_negative("loss.beta"),
        "warmup_epochs": non_negative("loss.warmup_epochs"),
        "free_bits": non_negative("loss.free_bits"),
        "objective": one_of("loss.objective", "elbo", "iwae"),
        "samples": positive_int("loss.samples"),
    }

    def __post_init__(self) -> None:
        check_args(self.ARGS, asdict(self))
        if self.objective == "iwae" and self.free_bits > 0:
            raise ConfigError(f"loss.free_bits={self.free_bits} floors each layer's KL, which loss.objective=iwae "
                              "does not have: set loss.free_bits=0, or train the ELBO (loss.objective=elbo)")
        if self.objective == "elbo" and self.samples != 1:
            raise ConfigError(f"loss.samples={self.samples} is the IWAE bound's k and loss.objective=elbo draws one "
                              "sample: use loss=iwae (or loss.objective=iwae), or leave loss.samples=1")

    def weight(self, step: int | Tensor, steps_per_epoch: int) -> float | Tensor:
        """The KL weight at optimiser step `step`; a tensor step (inside a CUDA graph) gives a tensor."""
        if self.warmup_epochs <= 0:
            return self.beta
        progress = step / steps_per_epoch / self.warmup_epochs
        return self.beta * progress.clamp(max=1.0) if isinstance(progress, Tensor) else self.beta * min(1.0, progress)

    def shape(self) -> tuple:
        """What must be equal for two runs' steps to be stacked as one: the bound and its samples."""
        return (self.objective, self.samples)

    def noise_shape(self, batch: int, dim: int) -> tuple[int, ...]:
        """A step's standard-normal draws: [B, dim] for the ELBO, [k, B, dim] for the IWAE bound."""
        return (batch, dim) if self.objective == "elbo" else (self.samples, batch, dim)

    def draw_noise(self, model, batch: int, device: torch.device | str) -> Tensor:
        """A step's draws from the default generator, as elbo_terms would draw them (models/base.py draw_noise)."""
        if self.objective == "elbo":
            return model.draw_noise(batch, device)
        return model.draw_noise(self.samples * batch, device).view(self.samples, batch, -1)

    def step(self, model, x: Tensor, noise: Tensor, weight: float | Tensor,
             free_bits: float | Tensor | None = None) -> tuple[Tensor, ElboTerms]:
        """The objective to minimise on images x with these draws, and the ELBO's terms for the statistics.
        free_bits: a stacked member's own, as a tensor (None: this Loss's)."""
        if self.objective == "iwae":
            log_w = model.log_importance_weights(x, self.samples, noise=noise, kl_weight=weight)  # [k, B]
            with torch.no_grad():
                terms = model.elbo_terms(x, noise[0])
            return -(torch.logsumexp(log_w, 0) - math.log(self.samples)).mean(), terms
        terms = model.elbo_terms(x, noise)
        return self(terms, weight, free_bits), terms

    def __call__(self, terms: ElboTerms, weight: float | Tensor, free_bits: float | Tensor | None = None) -> Tensor:
        """The ELBO objective of these terms: recon mean + weight * sum_l max(free_bits, KL_l mean). A tensor
        free_bits (one per stacked member, under vmap) floors only where it is above 0 (a Monte Carlo KL may be
        negative)."""
        free_bits = self.free_bits if free_bits is None else free_bits
        kl_layers = terms.kl_layers.mean(1)  # [L]
        if isinstance(free_bits, Tensor):
            kl_layers = torch.where(free_bits > 0, torch.maximum(kl_layers, free_bits), kl_layers)
        elif free_bits > 0:
            kl_layers = kl_layers.clamp(min=free_bits)
        return terms.recon.mean() + weight * kl_layers.sum()
