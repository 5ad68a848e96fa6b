"""The optimiser: Adam, fused where the device has a kernel for it, capturable for CUDA graphs."""

from __future__ import annotations

import torch
from torch import nn


def adam(params: list[nn.Parameter], lr: float, weight_decay: float = 0.0, fused: bool = True,
         capturable: bool = False) -> torch.optim.Adam:
    """Adam, with the fused kernel when asked for and the parameters' device and dtype have one (torch checks
    this when the optimiser is built); otherwise torch's default implementation. Same algorithm either way.
    capturable: keep the step count on the device, so that the step can be captured in a CUDA graph."""
    if capturable:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused, capturable=True)
    if fused:
        try:
            return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
        except RuntimeError:  # no fused kernel for this device or dtype
            pass
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
