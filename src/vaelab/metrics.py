"""Metrics kept as summed states, so they are right on one process and on many (DDP)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from vaelab.errors import ConfigError

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


# (sample, image) pairs per decoder pass with points_per_pass="auto": on a CPU larger passes gain nothing; on a
# GPU small passes leave it launch-bound (5,000 points made the batched estimator slower than a per-image loop
# on an H200), and 200,000 points of a 784-pixel MLP decoder take about 2.5 GB of activations.
AUTO_POINTS_PER_PASS = {"cpu": 5_000, "cuda": 200_000}


def points_per_pass_for(points_per_pass: int | str, device: torch.device) -> int:
    """eval.importance_points_per_pass as a number: "auto" picks by device (AUTO_POINTS_PER_PASS)."""
    if points_per_pass == "auto":
        return AUTO_POINTS_PER_PASS.get(device.type, AUTO_POINTS_PER_PASS["cuda"])
    if isinstance(points_per_pass, bool) or not isinstance(points_per_pass, int) or points_per_pass <= 0:
        raise ConfigError(f"points per pass must be auto or a positive number of (image, sample) pairs, "
                          f"got {points_per_pass!r}")
    return points_per_pass


def importance_log_weights(model, x: Tensor, k: int, points_per_pass: int | str = "auto",
                           index: Tensor | None = None, seed: int = 0) -> Tensor:
    """All k importance log-weights for a batch, [k, B], computed in chunks of samples so that one pass
    through the decoder holds at most `points_per_pass` (sample, image) pairs: batched over images and
    samples alike, never a Python loop over images. With `index` (each image's position in its data set),
    the samples are common random numbers keyed by (seed, index): reproducible across batchings and DDP."""
    points_per_pass = points_per_pass_for(points_per_pass, x.device)
    chunk = max(1, min(k, points_per_pass // max(1, x.shape[0])))
    dim = sum(model.latent_dims)
    out = []
    for s in range(0, k, chunk):
        n = min(chunk, k - s)
        noise = None if index is None else counter_normal(seed, index.to(x.device), s, n, dim).to(x.dtype)
        out.append(model.log_importance_weights(x, n, noise=noise))
    return torch.cat(out)


class ElboMeans(Metric):
    """Running means of -ELBO's terms over an epoch: recon and each layer's KL, as summed states.
    One cheap on-device update per step, one log per epoch: no per-step logging cost, right under DDP."""

    full_state_update = False

    def __init__(self, num_layers: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.add_state("total", default=torch.zeros(1 + num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, recon: Tensor, kl_layers: Tensor, count: int | None = None) -> None:
        """recon: [B]; kl_layers: [L, B], one value per example. With `count`, they are instead sums over
        `count` examples in all, one per optimiser step (the step engine's rows): recon [n], kl_layers [L, n]."""
        self.total += torch.cat([recon.detach().sum(0, keepdim=True), kl_layers.detach().sum(1)]).double()
        self.count += recon.shape[0] if count is None else count

    def compute(self) -> dict[str, Tensor]:
        mean = (self.total / self.count).float()
        recon, kl_layers = mean[0], mean[1:]
        kl = kl_layers.sum()
        out = {"loss": recon + kl, "elbo": -(recon + kl), "recon": recon, "kl": kl}
        if self.num_layers > 1:
            out.update({f"kl_{i + 1}": v for i, v in enumerate(kl_layers)})
        return out


class ImportanceSampledNLL(Metric):
    """-log p(x) estimated by importance sampling with q(z|x) as proposal (the IWAE bound):
    log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x), tightening to log p(x) as K grows. In nats/example.

    Also keeps the Monte Carlo variance of each image's estimate (delta method:
    Var[log mean w] ~ Var[w] / (K mean(w)^2)), so `standard_error()` says how far another run with other
    samples may land: the error of the mean NLL from sampling, not from the choice of images."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("mc_var_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, log_weights: Tensor) -> None:
        """log_weights: [K, B] for B examples."""
        log_w = log_weights.double()
        k = log_w.shape[0]
        log_px = torch.logsumexp(log_w, dim=0) - math.log(k)  # [B]
        self.nll_sum += -log_px.sum()
        if k > 1:
            w = torch.exp(log_w - log_w.max(0).values)  # scaled weights, the largest 1: [K, B]
            self.mc_var_sum += (w.var(0) / (k * w.mean(0).pow(2))).sum()
        self.count += log_px.numel()

    def compute(self) -> Tensor:
        return (self.nll_sum / self.count).float()

    def standard_error(self) -> Tensor:
        """Monte Carlo standard error of compute(), in nats (summed over all processes, as compute() is)."""
        with self.sync_context(should_sync=self._to_sync):
            return (self.mc_var_sum.sqrt() / self.count).float()


class ActiveUnits(Metric):
    """Number of latent dimensions whose posterior mean varies over the data: Cov_x(E_q[z_d]) > threshold
    (Burda et al., 2016; threshold 0.01). States are sums of E_q[z] and its square, in float64."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, latent_dim: int, threshold: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("total", default=torch.zeros(latent_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", default=torch.zeros(latent_dim, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, means: Tensor) -> None:
        """means: [B, D], E_q[z|x] for B examples."""
        m = means.double()
        self.total += m.sum(0)
        self.total_sq += m.pow(2).sum(0)
        self.count += m.shape[0]

    def variances(self) -> Tensor:
        mean = self.total / self.count
        return (self.total_sq / self.count - mean.pow(2)).clamp(min=0)

    def compute(self) -> Tensor:
        return (self.variances() > self.threshold).sum()


def bits_per_dim(nll_nats: Tensor | float, num_dims: int) -> Tensor | float:
    """nats per example -> bits per dimension."""
    return nll_nats / (num_dims * math.log(2.0))
