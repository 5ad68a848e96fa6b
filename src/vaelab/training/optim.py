"""Optimisers and learning-rate schedules, by name (conf/optim/, conf/scheduler/). Every optimiser takes the
fused kernel where the device has one, and can keep its state on the device for CUDA graphs (capturable)."""

from __future__ import annotations

import torch
from torch import nn

from vaelab.checks import Arg, non_negative, one_of, positive


class AdamNormGrad(torch.optim.Adam):
    """Adam on gradients scaled to unit L2 norm per parameter tensor, as in the VampPrior paper's own code
    (jmtomczak/vae_vampprior, utils/optimizer.py)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.div_(torch.linalg.vector_norm(p.grad) + 1e-7)
        super().step()
        return loss


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adam_normgrad": AdamNormGrad}
OPTIMIZER: Arg = one_of("optim.name", *OPTIMIZERS)
SCHEDULER: Arg = one_of("scheduler.name", "none", "cosine", "plateau", "exponential")
SCHEDULER_OPTIONS: dict[str, Arg] = {  # conf/scheduler/<name>.yaml's keys
    "eta_min": non_negative("scheduler.eta_min"), "gamma": positive("scheduler.gamma"),
    "factor": positive("scheduler.factor"), "patience": Arg("scheduler.patience", "int", 0),
    "min_lr": non_negative("scheduler.min_lr"),
}


def build_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float = 0.0,
                    fused: bool = True, capturable: bool = False) -> torch.optim.Optimizer:
    """The optimiser `name`, with the fused kernel when asked for and the parameters' device and dtype have
    one (torch checks this when the optimiser is built); otherwise torch's default implementation. Same
    algorithm either way. capturable: keep the step count on the device, so that the step can be captured in
    a CUDA graph."""
    cls = OPTIMIZERS[OPTIMIZER.check(name)]
    if capturable:
        return cls(params, lr=lr, weight_decay=weight_decay, fused=fused, capturable=True)
    if fused:
        try:
            return cls(params, lr=lr, weight_decay=weight_decay, fused=True)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return cls(params, lr=lr, weight_decay=weight_decay)


def adam(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0, fused: bool = True,
         capturable: bool = False) -> torch.optim.Adam:
    return build_optimizer("adam", params, lr, weight_decay, fused, capturable)


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, max_epochs: int | None, **options):
    """The learning-rate schedule `name`, stepped once per epoch (plateau: on val/loss), or None for "none".
    cosine: from lr to eta_min over max_epochs; exponential: lr * gamma^epoch; plateau: lr * factor after
    `patience` epochs without a better val/loss."""
    SCHEDULER.check(name)
    for key, value in options.items():
        if key in SCHEDULER_OPTIONS:
            SCHEDULER_OPTIONS[key].check(value)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, max_epochs or 1),
                                                          eta_min=options.get("eta_min", 0.0))
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=options.get("gamma", 0.98))
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=options.get("factor", 0.5),
                                                          patience=options.get("patience", 5),
                                                          min_lr=options.get("min_lr", 0.0))
    return None
