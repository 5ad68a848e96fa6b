"""Counter-based standard-normal noise: common random numbers for the importance-sampled NLL, a pure function of
(seed, image index, sample number, dimension), so an estimate does not depend on batching or process count."""

from __future__ import annotations

import math

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _fmix32_int(x: int) -> int:
    """MurmurHash3's 32-bit finaliser on a Python int."""
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & _M32
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _signed32(c: int) -> int:
    return c - 2**32 if c >= 2**31 else c


_C1, _C2 = _signed32(0x85EBCA6B), _signed32(0xC2B2AE35)


def _fmix32(x: Tensor) -> Tensor:
    """MurmurHash3's finaliser on int32 tensors holding the bits of unsigned 32-bit values: products wrap
    modulo 2^32 as unsigned ones do, and the masks make the right shifts logical (int32 halves the memory
    traffic of an int64 version; the values are the same bit for bit)."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 13) & 0x7FFFF)
    x = x * _C2
    return x ^ ((x >> 16) & 0xFFFF)


def _uniform(lo: Tensor, hi: Tensor, seed_hash: int) -> Tensor:
    """A uniform in (0, 1), float64, from the 64-bit counter hi * 2^32 + lo and the seed."""
    h = _fmix32(_fmix32(lo ^ _signed32(seed_hash)) ^ hi).double()
    h = torch.where(h < 0, h + 2.0**32, h)  # the unsigned value of the bits
    return (h + 0.5) / 2.0**32


def counter_normal(seed: int, index: Tensor, first_sample: int, k: int, dim: int) -> Tensor:
    """Standard normal draws [k, B, dim] that are a pure function of (seed, image index, sample number,
    dimension): common random numbers, so an image's importance-sampled estimate is the same whatever the
    batch, the chunking of samples, the device count or the order of images (Box-Muller on a counter hash)."""
    device = index.device
    s = torch.arange(first_sample, first_sample + k, device=device)[:, None, None]
    i = index.long()[None, :, None]
    d = torch.arange(dim, device=device)[None, None, :]
    counter = ((i * 2**24 + s) * dim + d) * 2  # [k, B, dim]; distinct for < 2^20 images, < 2^24 samples
    lo, hi = (counter & _M32).to(torch.int32), (counter >> 32).to(torch.int32)  # the counter's two halves
    seed_hash = _fmix32_int(seed & _M32)
    u1, u2 = _uniform(lo, hi, seed_hash), _uniform(lo + 1, hi, seed_hash)  # counter + 1: lo is even, no carry
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).float()
