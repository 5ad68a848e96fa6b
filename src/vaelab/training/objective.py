"""The training objective as one object: -ELBO with a KL weight that warms up linearly, and free bits. Built from
conf/loss/ (`_target_: vaelab.training.objective.Loss`) or in Python; the step engine calls it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

from torch import Tensor

from vaelab.checks import Arg, check_args, non_negative
from vaelab.models.base import ElboTerms


@dataclass(frozen=True)
class Loss:
    """recon + beta_t * sum_l max(free_bits, KL_l), batch means. With beta=1, no warm-up and no free bits it is
    -ELBO. beta_t rises linearly from 0 to `beta` over `warmup_epochs` (fractional epochs; 0: no warm-up); free
    bits (Kingma et al. 2016) remove the pressure on a layer's KL below `free_bits` nats, against posterior
    collapse."""

    beta: float = 1.0
    warmup_epochs: float = 0.0
    free_bits: float = 0.0

    ARGS: ClassVar[dict[str, Arg]] = {  # named by their config keys (conf/loss/)
        "beta": non_negative("loss.beta"),
        "warmup_epochs": non_negative("loss.warmup_epochs"),
        "free_bits": non_negative("loss.free_bits"),
    }

    def __post_init__(self) -> None:
        check_args(self.ARGS, asdict(self))

    def weight(self, step: int | Tensor, steps_per_epoch: int) -> float | Tensor:
        """The KL weight at optimiser step `step`; a tensor step (inside a CUDA graph) gives a tensor."""
        if self.warmup_epochs <= 0:
            return self.beta
        progress = step / steps_per_epoch / self.warmup_epochs
        return self.beta * progress.clamp(max=1.0) if isinstance(progress, Tensor) else self.beta * min(1.0, progress)

    def __call__(self, terms: ElboTerms, weight: float | Tensor) -> Tensor:
        kl_layers = terms.kl_layers.mean(1)  # [L]
        if self.free_bits > 0:
            kl_layers = kl_layers.clamp(min=self.free_bits)
        return terms.recon.mean() + weight * kl_layers.sum()
