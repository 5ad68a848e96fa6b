"""Where the maths runs: the device a tool picks, and torch's float32 matmul precision on it."""

from __future__ import annotations

import os

import torch

from vaelab.checks import one_of

# matmul_precision=auto, by device: TF32 ("high") on a GPU trained and evaluated faster at the same test NLL
# (docs/speed.md); "highest" keeps fp32 on a CPU.
AUTO_MATMUL_PRECISION = {"cpu": "highest", "cuda": "high"}
MATMUL_PRECISION = one_of("matmul_precision", "auto", "highest", "high", "medium")


def matmul_precision(setting: str, accelerator: str) -> str:
    """torch's float32 matmul precision for `setting` (highest | high | medium | auto) on `accelerator` (a
    Lightning accelerator name: cpu, gpu, cuda or auto)."""
    if MATMUL_PRECISION.check(setting) != "auto":
        return setting
    return AUTO_MATMUL_PRECISION["cuda" if on_gpu(accelerator) else "cpu"]


def on_gpu(accelerator: str) -> bool:
    """Whether a Lightning accelerator name (cpu, gpu, cuda or auto) trains on a GPU here."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def pick_device(name: str) -> torch.device:
    """auto: the GPU when there is one, else the CPU; or any torch device name."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_cores() -> int:
    """The cores this process may run on (its affinity: a SLURM allocation, taskset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def job_share(job: int, parallel: int, cores: int, gpus: int) -> tuple[int | None, int]:
    """A parallel sweep job's share of the machine: (its GPU, its torch threads). Job `job` of a sweep that runs
    `parallel` jobs at once gets GPU job mod G when there are G GPUs (None without), and cores // parallel threads
    (at least one), so that parallel jobs neither queue on the first GPU nor oversubscribe the cores."""
    gpu = job % gpus if gpus > 0 else None
    return gpu, max(1, cores // max(1, parallel))
