"""Where the maths runs: the device a tool picks, and torch's float32 matmul precision on it."""

from __future__ import annotations

import torch

from vaelab.checks import one_of

# matmul_precision=auto, by device: TF32 ("high") on a GPU trained and evaluated faster at the same test NLL
# (README, Speed); "highest" keeps fp32 on a CPU.
AUTO_MATMUL_PRECISION = {"cpu": "highest", "cuda": "high"}
MATMUL_PRECISION = one_of("matmul_precision", "auto", "highest", "high", "medium")


def matmul_precision(setting: str, accelerator: str) -> str:
    """torch's float32 matmul precision for `setting` (highest | high | medium | auto) on `accelerator` (a
    Lightning accelerator name: cpu, gpu, cuda or auto)."""
    if MATMUL_PRECISION.check(setting) != "auto":
        return setting
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return AUTO_MATMUL_PRECISION["cuda" if on_gpu else "cpu"]


def pick_device(name: str) -> torch.device:
    """auto: the GPU when there is one, else the CPU; or any torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
