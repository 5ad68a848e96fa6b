"""Test and validation metrics, kept as summed torchmetrics states so they are right on one process and on
many (DDP): -ELBO's terms, the importance-sampled NLL, active units and bits/dim, as one bundle (`EvalMetrics`)
that training and vaelab-eval alike update and compute. A new metric is added here, once. Why it is long: it is
every metric's one definition (ELBO terms, the importance-sampled NLL and its error, bits/dim, active units) and
the bundle that computes them all; split, each stage would assemble them again."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from vaelab.checks import Arg, check_args, positive_int
from vaelab.evaluation.noise import counter_normal
from vaelab.pixels import has_bpd, nll_offset

# (sample, image) pairs per decoder pass with points_per_pass="auto": on a CPU larger passes gain nothing; on a
# GPU small passes leave it launch-bound (docs/speed.md), and 200,000 points of a 784-pixel MLP decoder take
# about 2.5 GB of activations.
AUTO_POINTS_PER_PASS = {"cpu": 5_000, "cuda": 200_000}


# The arguments of the importance-sampled NLL, wherever they are configured (eval.* in conf/train.yaml,
# conf/eval.yaml)
IMPORTANCE_ARGS: dict[str, Arg] = {
    "importance_samples": positive_int("eval.importance_samples"),
    "points_per_pass": positive_int("eval.importance_points_per_pass", auto=True),
}


def points_per_pass_for(points_per_pass: int | str, device: torch.device) -> int:
    """eval.importance_points_per_pass as a number: "auto" picks by device (AUTO_POINTS_PER_PASS)."""
    IMPORTANCE_ARGS["points_per_pass"].check(points_per_pass)
    if points_per_pass == "auto":
        return AUTO_POINTS_PER_PASS.get(device.type, AUTO_POINTS_PER_PASS["cuda"])
    return points_per_pass


def importance_log_weights(model, x: Tensor, k: int, points_per_pass: int | str = "auto",
                           index: Tensor | None = None, seed: int = 0) -> Tensor:
    """All k importance log-weights for a batch, [k, B], computed in chunks of samples so that one pass
    through the decoder holds at most `points_per_pass` (sample, image) pairs: batched over images and
    samples alike, never a Python loop over images. With `index` (each image's position in its data set),
    the samples are common random numbers keyed by (seed, index): reproducible across batchings and DDP."""
    chunks = importance_chunks(k, points_per_pass, x.shape[0], sum(model.latent_dims), index, seed, x.device)
    return torch.cat([model.log_importance_weights(x, n, noise=None if noise is None else noise.to(x.dtype))
                      for n, noise in chunks])


def importance_chunks(k: int, points_per_pass: int | str, batch: int, dim: int, index: Tensor | None, seed: int,
                      device: torch.device) -> list[tuple[int, Tensor | None]]:
    """The k samples of a batch of `batch` images cut into decoder passes of at most points_per_pass (sample,
    image) pairs: (samples in the pass, their common random numbers [n, B, dim], or None without `index`)."""
    points_per_pass = points_per_pass_for(points_per_pass, torch.device(device))
    chunk = max(1, min(k, points_per_pass // max(1, batch)))
    return [(min(chunk, k - s), None if index is None else counter_normal(seed, index.to(device), s,
                                                                            min(chunk, k - s), dim))
            for s in range(0, k, chunk)]


def evaluation_outputs(model, x: Tensor, noise: Tensor, chunks: list[tuple[int, Tensor | None]] | None):
    """The one evaluation function: what every evaluation metric is computed from, for images x [B, C, H, W]:
    -ELBO's terms at the draws `noise` [B, sum D] (recon [B], kl_layers [L, B]), the posterior means per layer, and
    the importance log-weights [K, B] over `chunks`, one (samples, their draws [n, B, sum D] or None for fresh
    ones) per decoder pass (importance_chunks; None: no NLL). With every draw given it is a pure function of the
    weights, which a stacked sweep runs under vmap."""
    terms = model.elbo_terms(x, noise)
    log_w = None if chunks is None else torch.cat([
        model.log_importance_weights(x, n, noise=None if c is None else c.to(x.dtype)) for n, c in chunks])
    return terms.recon, terms.kl_layers, model.posterior_means(x), log_w


def compute_restored(metric: Metric):
    """metric.compute(), also for a run resumed at an epoch's end: its sums come from the checkpoint (persistent
    states), and torchmetrics, which counts only this start's updates, would warn that there were none."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=rf"The ``compute`` method of metric {type(metric).__name__} was "
                                                  "called before")
        return metric.compute()


class ElboMeans(Metric):
    """Running means of -ELBO's terms over an epoch: recon and each layer's KL, as summed states.
    One cheap on-device update per step, one log per epoch: no per-step logging cost, right under DDP."""

    full_state_update = False

    def __init__(self, num_layers: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.add_state("total", default=torch.zeros(1 + num_layers, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.offset = 0.0  # nats added to the reconstruction term: D ln 256 on dequantised pixels (pixels.py)

    def update(self, recon: Tensor, kl_layers: Tensor, count: int | None = None) -> None:
        """recon: [B]; kl_layers: [L, B], one value per example. With `count`, they are instead sums over
        `count` examples in all, one per optimiser step (the step engine's rows): recon [n], kl_layers [L, n]."""
        self.total += torch.cat([recon.detach().sum(0, keepdim=True), kl_layers.detach().sum(1)]).double()
        self.count += recon.shape[0] if count is None else count

    def compute_restored(self) -> dict[str, Tensor]:
        return compute_restored(self)

    def compute(self) -> dict[str, Tensor]:
        mean = (self.total / self.count).float()
        recon, kl_layers = mean[0] + self.offset, mean[1:]
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
    """nats per example -> bits per dimension: -log2 P(x) / D, when nll_nats is -ln P(x) of the discrete images
    (vaelab/pixels.py says which NLLs are)."""
    return nll_nats / (num_dims * math.log(2.0))


class EvalMetrics(nn.Module):
    """Every metric of an evaluation pass, as one bundle: the means of -ELBO's terms ({stage}/loss, /elbo, /recon,
    /kl, /kl_l), active units ({stage}/active_units, /active_units_l) and, with `importance_samples`, the
    importance-sampled NLL ({stage}/nll, /nll_mc_se) and bits/dim ({stage}/bpd). Validation, test and vaelab-eval
    all use it, so each metric is defined once. `pixels` (vaelab/pixels.py) says what the NLL is of: for a
    density on dequantised 8-bit pixels, D ln 256 is added (the bound on the 8-bit images' NLL); on grey pixels
    under a Bernoulli (not a likelihood) no bits/dim is reported."""

    def __init__(self, latent_dims: list[int], num_pixels: int, importance_samples: int | None = None,
                 points_per_pass: int | str = "auto", seed: int = 0) -> None:
        super().__init__()
        if importance_samples is not None:
            check_args(IMPORTANCE_ARGS, {"importance_samples": importance_samples, "points_per_pass": points_per_pass})
        self.num_pixels, self.importance_samples, self.dim = num_pixels, importance_samples, sum(latent_dims)
        self.points_per_pass, self.seed = points_per_pass, seed
        self._pixels = "binary"
        self.means = ElboMeans(len(latent_dims))
        self.active = nn.ModuleList(ActiveUnits(d) for d in latent_dims)
        self.nll = ImportanceSampledNLL() if importance_samples is not None else None

    @property
    def pixels(self) -> str:
        """What the images are (vaelab/pixels.py), set by VAEModule and evaluate() from the data: every figure in
        nats per image is then of the 8-bit images (a density's -ELBO and NLL + D ln 256)."""
        return self._pixels

    @pixels.setter
    def pixels(self, value: str) -> None:
        self._pixels = value
        self.means.offset = nll_offset(value, self.num_pixels)

    @torch.no_grad()
    def update(self, model, x: Tensor, index: Tensor | None = None) -> None:
        """One batch: x [B, C, H, W]; index, the images' positions in their data set, keys the NLL's common random
        numbers (without it, fresh draws)."""
        noise = model.draw_noise(x.shape[0], x.device)
        chunks = None if self.nll is None else importance_chunks(self.importance_samples, self.points_per_pass,
                                                                 x.shape[0], self.dim, index, self.seed, x.device)
        self.record(*evaluation_outputs(model, x, noise, chunks))

    def record(self, recon: Tensor, kl_layers: Tensor, means: list[Tensor], log_w: Tensor | None) -> None:
        """One batch's outputs, however they were computed (update's, or a stacked sweep's vmapped pass): recon
        [B], kl_layers [L, B], the posterior means [B, D_l] per layer, the importance log-weights [K, B]."""
        self.means.update(recon, kl_layers)
        for metric, mu in zip(self.active, means):
            metric.update(mu)
        if self.nll is not None:
            self.nll.update(log_w)

    def importance_noise(self, batch: int, index: Tensor, device: torch.device) -> list[Tensor]:
        """The common random numbers importance_log_weights uses for these images, chunk by chunk: [n, B, D]."""
        return [chunk for _, chunk in importance_chunks(self.importance_samples, self.points_per_pass, batch,
                                                         self.dim, index, self.seed, device)]

    def compute(self, stage: str) -> dict[str, Tensor]:
        out = {f"{stage}/{k}": v for k, v in self.means.compute().items()}
        if self.nll is not None:
            nll = self.nll.compute() + nll_offset(self.pixels, self.num_pixels)
            out.update({f"{stage}/nll": nll, f"{stage}/nll_mc_se": self.nll.standard_error()})
            if has_bpd(self.pixels):
                out[f"{stage}/bpd"] = bits_per_dim(nll, self.num_pixels)
        counts = [m.compute() for m in self.active]
        out[f"{stage}/active_units"] = torch.as_tensor(sum(counts), dtype=torch.float32)
        if len(counts) > 1:
            out.update({f"{stage}/active_units_{i + 1}": c.float() for i, c in enumerate(counts)})
        return out

    def reset(self) -> None:
        for metric in (self.means, *self.active, *([self.nll] if self.nll is not None else [])):
            metric.reset()


def evaluate(model, loader, importance_samples: int, points_per_pass: int | str, device: torch.device,
             seed: int = 0, progress: bool = True, pixels: str = "binary") -> dict[str, float]:
    """Every test metric of `model` over a loader of images or (images, indices), as plain floats; `pixels`: what
    the images are (vaelab/pixels.py)."""
    from tqdm.auto import tqdm

    metrics = EvalMetrics(model.latent_dims, model.num_pixels, importance_samples, points_per_pass, seed).to(device)
    metrics.pixels = pixels
    model = model.to(device)
    for batch in tqdm(loader, desc=f"test NLL, K={importance_samples}", disable=not progress, unit="batch"):
        x, index = batch if isinstance(batch, (tuple, list)) else (batch, None)
        metrics.update(model, x.to(device), index)
    return {k: float(v) for k, v in metrics.compute("test").items()}
