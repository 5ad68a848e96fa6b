"""Metrics kept as summed states, so they are right on one process and on many (DDP)."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def importance_log_weights(model, x: Tensor, k: int, points_per_pass: int = 5_000) -> Tensor:
    """All k importance log-weights for a batch, [k, B], computed in chunks of samples so that one pass
    through the decoder holds at most `points_per_pass` (sample, image) pairs: batched over images and
    samples alike, never a Python loop over images."""
    chunk = max(1, min(k, points_per_pass // max(1, x.shape[0])))
    return torch.cat([model.log_importance_weights(x, min(chunk, k - s)) for s in range(0, k, chunk)])


class ElboMeans(Metric):
    """Running means of -ELBO's terms over an epoch: recon and each layer's KL, as summed states.
    One cheap on-device update per step, one log per epoch: no per-step logging cost, right under DDP."""

    full_state_update = False

    def __init__(self, num_layers: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.add_state("total", default=torch.zeros(1 + num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, recon: Tensor, kl_layers: Tensor) -> None:
        """recon: [B]; kl_layers: [L, B]."""
        self.total += torch.cat([recon.detach().sum(0, keepdim=True), kl_layers.detach().sum(1)]).double()
        self.count += recon.shape[0]

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
        """Monte Carlo standard error of compute(), in nats."""
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
