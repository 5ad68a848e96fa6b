"""The top-down hierarchical VAE as the field builds it since LVAE and IAF-VAE, in the style of VDVAE (Child, 2021;
openai/vdvae vae.py) and NVAE (Vahdat & Kautz, 2020): a bottom-up residual encoder, a top-down residual decoder
that holds L stochastic layers of spatial latents at several resolutions, and inference that shares the decoder's
top-down path:

    bottom-up   a_r = encoder activations at each latent resolution r (e.g. 14x14, 7x7, 1x1)
    top-down    h <- learned constant at the top; for each stochastic layer l, top first:
                    p(z_l | z_>l) = N(mu, sigma)(h)           (the top layer: the configured prior p(z_L))
                    q(z_l | x, z_>l) = N(mu, sigma)([h, a_r])
                    h <- cell(h + proj(z_l))                   (residual; upsampled at each new resolution)
                p(x | z) = the likelihood's parameters from h at the image's resolution

Each layer's KL is in closed form (two Gaussians), summed over its channels and pixels; the top layer's is the
prior's, as for every vaelab model, so the VampPrior and the mixture prior act on it (a vector where its resolution
is 1x1), as does an IAF posterior. Latents are flat vectors to the rest of vaelab ([n, C_l * r * r] per layer,
layer 1 nearest the data first), so metrics, grids, traversals, active units and checkpoints work unchanged.

The stabilisers are VDVAE's: residual cells whose last convolution is scaled by 1/sqrt(L) at initialisation, the
conditional priors' last convolution zero (every layer starts as N(0, I) with no KL), soft-bounded log-variances;
gradient skipping and an EMA of the weights are the trainer's, for every model (training/recipe.py).

Why it is long: one model whole (its cells, both passes, the protocol's eight methods on them, the size checks),
so that it reads top to bottom in one place, as hvae.py does for the bottom-up family.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vaelab.checks import check_args, positive_int
from vaelab.errors import ConfigError
from vaelab.models.base import ElboTerms, VAEBase
from vaelab.models.distributions import kl_normal_normal, log_normal_diag
from vaelab.models.priors import sample_prior
from vaelab.models.spec import constructor_args

LOGVAR_BOUND = 6.0  # log-variances soft-clamped to (-6, 6): sigma in (0.05, 20)


def soft_bound(logvar: Tensor) -> Tensor:
    return LOGVAR_BOUND * torch.tanh(logvar / LOGVAR_BOUND)


class Cell(nn.Module):
    """VDVAE's bottleneck block: GELU, 1x1 conv to the cell width, two 3x3 convs (1x1 at resolutions of 2 and below),
    1x1 conv out; residual when in and out widths agree. scale: the last conv's initial weights times this (VDVAE's
    1/sqrt(depth)); 0 makes the cell start as zero."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, resolution: int, residual: bool, scale: float = 1.0):
        super().__init__()
        k = 3 if resolution > 2 else 1
        self.convs = nn.ModuleList([nn.Conv2d(c_in, c_mid, 1), nn.Conv2d(c_mid, c_mid, k, padding=k // 2),
                                    nn.Conv2d(c_mid, c_mid, k, padding=k // 2), nn.Conv2d(c_mid, c_out, 1)])
        self.residual = residual
        with torch.no_grad():
            self.convs[-1].weight.mul_(scale)
            if scale == 0:
                self.convs[-1].bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        h = x
        for conv in self.convs:
            h = conv(F.gelu(h))
        return x + h if self.residual else h


def upsample(h: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour upsampling by an integer factor (vmap-safe)."""
    return h if factor == 1 else h.repeat_interleave(factor, -2).repeat_interleave(factor, -1)


class LatentLayer(nn.Module):
    """One stochastic layer of the top-down path at resolution r: q(z | x, z_>l) from [h, a_r], p(z | z_>l) and a
    feature added to h from h (absent on the top layer, whose prior is the model's), then h <- cell(h + proj(z))."""

    def __init__(self, width: int, cell_width: int, channels: int, resolution: int, depth: int, top: bool) -> None:
        super().__init__()
        self.channels, self.resolution, self.top = channels, resolution, top
        self.q = Cell(2 * width, cell_width, 2 * channels, resolution, residual=False)
        self.p = None if top else Cell(width, cell_width, 2 * channels + width, resolution, residual=False, scale=0.0)
        self.proj = nn.Conv2d(channels, width, 1)
        with torch.no_grad():
            self.proj.weight.mul_(math.sqrt(1.0 / depth))
        self.cell = Cell(width, cell_width, width, resolution, residual=True, scale=math.sqrt(1.0 / depth))

    @property
    def dim(self) -> int:
        return self.channels * self.resolution ** 2

    def _flat(self, t: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = t.chunk(2, 1)
        return mu.flatten(1), soft_bound(logvar).flatten(1)

    def posterior(self, h: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """q's (mu, logvar), [N, dim] each."""
        return self._flat(self.q(torch.cat([h, a], 1)))

    def prior(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """p's (mu, logvar) [N, dim] and h with p's feature added."""
        out = self.p(h)
        c = 2 * self.channels
        mu, logvar = self._flat(out[:, :c])
        return mu, logvar, h + out[:, c:]

    def update(self, h: Tensor, z: Tensor) -> Tensor:
        """h after z [N, dim]: h + proj(z), through the residual cell."""
        z = z.reshape(-1, self.channels, self.resolution, self.resolution)
        return self.cell(h + self.proj(z))


class LadderVAE(VAEBase):
    """The top-down hierarchical VAE (VDVAE / NVAE style): spatial latents at several resolutions, inference sharing
    the top-down path, residual cells.

    image_shape: [C, H, W], square. resolutions: the latents' resolutions from the data up, each dividing the one
    before (the first the image size), e.g. [14, 7, 1]. latent_layers: stochastic layers at each resolution
    (L = their sum). encoder_blocks: residual cells of the bottom-up encoder at each resolution. width: channels of
    the residual streams; cell_width: of the cells' bottlenecks; latent_channels: of each latent layer.
    likelihood, prior, posterior: as for VAE; the prior and a flow posterior act on the top layer.

    vae(x) returns the ELBO's terms, one closed-form KL per stochastic layer (the top layer's: the prior's)."""

    ARGS = {
        "width": positive_int("model.width"),
        "cell_width": positive_int("model.cell_width"),
        "latent_channels": positive_int("model.latent_channels"),
    }

    def __init__(
        self,
        image_shape: tuple[int, ...],
        resolutions: list[int] = (14, 7, 1),
        latent_layers: list[int] = (2, 3, 2),
        encoder_blocks: list[int] = (2, 2, 2),
        width: int = 32,
        cell_width: int = 16,
        latent_channels: int = 4,
        likelihood=None,
        prior=None,
        posterior=None,
    ) -> None:
        check_args(self.ARGS, locals())
        super().__init__(image_shape, likelihood, prior, posterior)
        resolutions, latent_layers, encoder_blocks = (_ints(v, k) for v, k in (
            (resolutions, "model.resolutions"), (latent_layers, "model.latent_layers"),
            (encoder_blocks, "model.encoder_blocks")))
        _check_shape(self.image_shape, resolutions, latent_layers, encoder_blocks)
        self.init_args = constructor_args(LadderVAE.__init__, locals(), ("likelihood", "prior", "posterior"))
        self.resolutions, self.latent_layers = resolutions, latent_layers
        c, size, _ = self.image_shape
        depth = sum(latent_layers)
        # bottom-up: a 3x3 conv at the image's size, a strided conv down to the first latent resolution, then cells
        down = size // resolutions[0]
        self.stem = nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.GELU(),
                                  *([nn.Conv2d(width, width, down, stride=down)] if down > 1 else []))
        self.encoder = nn.ModuleList(
            nn.ModuleList(Cell(width, cell_width, width, r, residual=True, scale=math.sqrt(1.0 / max(1, sum(encoder_blocks))))
                          for _ in range(n)) for r, n in zip(resolutions, encoder_blocks))
        # top-down: a learned start at each resolution (zero: the upsampled state alone at first), the layers top first
        self.starts = nn.ParameterList(nn.Parameter(torch.zeros(1, width, r, r)) for r in resolutions[::-1])
        self.layers = nn.ModuleList()
        for i, (r, n) in enumerate(zip(resolutions[::-1], latent_layers[::-1])):
            for j in range(n):
                top = i == 0 and j == 0
                self.layers.append(LatentLayer(width, cell_width, latent_channels, r, depth, top))
        up = size // resolutions[0]
        self.head = nn.Sequential(*([nn.ConvTranspose2d(width, width, up, stride=up), nn.GELU()] if up > 1 else []),
                                  nn.Conv2d(width, c * self.likelihood.num_params, 3, padding=1))
        top = self.layers[0]
        self.prior = self._build_prior(top.dim, self.encode_top)
        self.posterior = self._build_posterior(top.dim, width * top.resolution ** 2)

    @property
    def latent_dims(self) -> list[int]:
        return [layer.dim for layer in reversed(self.layers)]

    # -- the bottom-up pass ----------------------------------------------------------------------------------
    def _bottom_up(self, x: Tensor) -> dict[int, Tensor]:
        """The encoder's activation at each latent resolution, [B, width, r, r]."""
        h = self.stem(x)
        acts = {}
        for i, (r, cells) in enumerate(zip(self.resolutions, self.encoder)):
            if i:
                h = F.avg_pool2d(h, h.shape[-1] // r)
            for cell in cells:
                h = cell(h)
            acts[r] = h
        return acts

    def _top_q(self, a_top: Tensor) -> tuple[Tensor, Tensor]:
        """q(z_L | x)'s (mu, logvar) from the top activation: the top layer reads the learned start, no z above."""
        start = self.starts[0].expand(a_top.shape[0], -1, -1, -1)
        return self.layers[0].posterior(start, a_top)

    def encode_top(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """q(z_L | x)'s (mu, logvar), [B, D_L]: the top layer's encoder, which a VampPrior evaluates at its
        pseudo-inputs."""
        return self._top_q(self._bottom_up(x)[self.resolutions[-1]])

    # -- the top-down pass -----------------------------------------------------------------------------------
    def _top_down(self, acts: dict[int, Tensor] | None, n: int, given: list[Tensor | None] | None = None,
                  eps: list[Tensor | None] | None = None, temperature: float = 1.0, mean: bool = False):
        """Walk the layers top first with n rows. Each layer's z: given[l] if given; else from q (acts: the
        bottom-up activations, with n rows) or, without acts, from p (at its mean with mean=True, else with its
        standard deviation times temperature), with draws eps[l] (None: fresh). Returns the decoder's output
        [n, C * params, H, W] and per layer, top first, (z, q_mu, q_logvar, p_mu, p_logvar, log_q_flow); the top
        layer's p is the model's prior (p_mu, p_logvar None) and log_q_flow its flow's log q (None without)."""
        layers = len(self.layers)
        given = given or [None] * layers
        eps = eps or [None] * layers
        h, res, i, out = None, None, 0, []
        for start, r in zip(self.starts, self.resolutions[::-1]):
            h = start.expand(n, -1, -1, -1) if h is None else upsample(h, r // res) + start
            res = r
            while i < layers and self.layers[i].resolution == r:
                layer = self.layers[i]
                p_mu = p_logvar = q_mu = q_logvar = log_q = None
                if not layer.top:
                    p_mu, p_logvar, h = layer.prior(h)
                if given[i] is not None:
                    z = given[i]
                elif acts is not None:
                    q_mu, q_logvar = layer.posterior(h, acts[r])
                    z, log_q = self._draw_q(layer, q_mu, q_logvar, acts[r], eps[i])
                elif layer.top:
                    z = sample_prior(self.prior, n, temperature)
                else:
                    z = p_mu if mean else _draw(p_mu, p_logvar, eps[i], temperature)
                out.append((z, q_mu, q_logvar, p_mu, p_logvar, log_q))
                h = layer.update(h, z)
                i += 1
        return self.head(h), out

    def _draw_q(self, layer: LatentLayer, mu: Tensor, logvar: Tensor, a: Tensor, eps: Tensor | None):
        """z ~ q with these draws; on the top layer with a flow posterior, the flow applied (its log q returned)."""
        z = _draw(mu, logvar, eps)
        if not (layer.top and self.posterior.is_flow):
            return z, None
        z_k, log_det = self.posterior(z, a.flatten(1))
        return z_k, log_normal_diag(z, mu, logvar) - log_det

    def _split(self, noise: Tensor | None, n: int) -> list[Tensor | None]:
        """noise [n, sum(latent_dims)] into the layers' draws, top first (draw_noise's order)."""
        if noise is None:
            return [None] * len(self.layers)
        return list(noise.reshape(n, -1).split([layer.dim for layer in self.layers], -1))

    def _terms(self, x: Tensor, noise: Tensor | None, k: int | None):
        """The decoder's output and the layers' draws for x [B, ...]; with k, k draws per image ([k * B] rows)."""
        acts = self._bottom_up(x)
        n = x.shape[0] * (k or 1)
        if k:
            acts = {r: a.expand(k, *a.shape).reshape(n, *a.shape[1:]) for r, a in acts.items()}
        if noise is None:
            noise = torch.randn(n, sum(self.latent_dims), device=x.device, dtype=x.dtype)
        return self._top_down(acts, n, eps=self._split(noise, n))

    def _kls(self, out) -> list[Tensor]:
        """Each layer's KL, top first: closed form below the top; the top's from the prior (or the flow's MC)."""
        kls = []
        for z, q_mu, q_logvar, p_mu, p_logvar, log_q in out:
            if p_mu is None:
                kls.append(self._kl_top(z, q_mu, q_logvar, log_q))
            else:
                kls.append(kl_normal_normal(q_mu, q_logvar, p_mu, p_logvar))
        return kls

    def elbo_terms(self, x: Tensor, noise: Tensor | None = None) -> ElboTerms:
        params, out = self._terms(x, noise, None)
        recon = -self.likelihood.log_prob(x, params)
        return ElboTerms(recon=recon, kl_layers=torch.stack(self._kls(out)[::-1]))

    def log_importance_weights(self, x: Tensor, k: int, noise: Tensor | None = None,
                               kl_weight: float | Tensor = 1.0) -> Tensor:
        b = x.shape[0]
        params, out = self._terms(x, noise, k)
        log_p_x = self.likelihood.log_prob(x, params.reshape(k, b, *params.shape[1:]))  # [k, B]
        latent = 0.0
        for z, q_mu, q_logvar, p_mu, p_logvar, log_q in out:
            log_p = self.prior.log_prob(z) if p_mu is None else log_normal_diag(z, p_mu, p_logvar)
            latent = latent + log_p - (log_normal_diag(z, q_mu, q_logvar) if log_q is None else log_q)
        latent = latent.reshape(k, b)
        if isinstance(kl_weight, Tensor) or kl_weight != 1:
            return log_p_x + kl_weight * latent
        return log_p_x + latent

    def draw_noise(self, batch: int, device: torch.device | str = "cpu") -> Tensor:
        return torch.randn(batch, sum(self.latent_dims), device=device)

    def sample_latents(self, n: int, temperature: float = 1.0) -> list[Tensor]:
        _, out = self._top_down(None, n, temperature=temperature)
        return [o[0] for o in reversed(out)]

    def latents_from_top(self, z_top: Tensor) -> list[Tensor]:
        given = [z_top] + [None] * (len(self.layers) - 1)
        _, out = self._top_down(None, z_top.shape[0], given=given, mean=True)
        return [o[0] for o in reversed(out)]

    def decode_mean(self, zs: list[Tensor]) -> Tensor:
        lead = zs[0].shape[:-1]
        flat = [z.reshape(-1, z.shape[-1]) for z in reversed(zs)]
        params, _ = self._top_down(None, flat[0].shape[0], given=flat)
        return self.likelihood.mean(params.reshape(*lead, *params.shape[1:]))

    @torch.no_grad()
    def posterior_means(self, x: Tensor) -> list[Tensor]:
        """Each layer's posterior mean given the means above (one deterministic pass: z = E_q at every layer; the
        top layer's with a flow: the flow at the base mean)."""
        acts = self._bottom_up(x)
        zeros = [torch.zeros(x.shape[0], d, device=x.device) for d in reversed(self.latent_dims)]
        _, out = self._top_down(acts, x.shape[0], eps=zeros)
        return [o[0] for o in reversed(out)]

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        params, _ = self._terms(x, None, None)
        return self.likelihood.mean(params)


def _draw(mu: Tensor, logvar: Tensor, eps: Tensor | None, temperature: float = 1.0) -> Tensor:
    if eps is None:
        eps = torch.randn_like(mu)
    return mu + temperature * torch.exp(0.5 * logvar) * eps


def _ints(value, key: str) -> list[int]:
    try:
        out = [int(v) for v in value]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be a list of whole numbers, e.g. [14, 7, 1]") from None
    if not out or any(v != w for v, w in zip(out, value)):
        raise ConfigError(f"{key}={value!r} must be a non-empty list of whole numbers, e.g. [14, 7, 1]")
    return out


def _check_shape(image_shape, resolutions: list[int], latent_layers: list[int], encoder_blocks: list[int]) -> None:
    """One sentence for a depth the images cannot hold."""
    _, h, w = image_shape
    if h != w:
        raise ConfigError(f"model=ladder needs square images, got {h}x{w}; crop or pad them (data/), or use "
                          "model=deep")
    if len(latent_layers) != len(resolutions) or len(encoder_blocks) != len(resolutions):
        raise ConfigError(f"model.latent_layers={latent_layers} and model.encoder_blocks={encoder_blocks} need one "
                          f"entry per resolution of model.resolutions={resolutions}")
    if min(latent_layers) < 1 or min(encoder_blocks) < 0 or min(resolutions) < 1:
        raise ConfigError(f"model.latent_layers={latent_layers} needs at least one layer per resolution and "
                          f"model.encoder_blocks={encoder_blocks} none below 0")
    chain = [h, *resolutions]
    if resolutions[0] > h or any(a % b for a, b in zip(chain, chain[1:])) or any(
            a <= b for a, b in zip(resolutions, resolutions[1:])):
        raise ConfigError(f"model.resolutions={resolutions} cannot hold these {h}x{w} images: each resolution must "
                          f"divide the one before it and be smaller, the first dividing {h} "
                          f"(e.g. [{h // 2}, {h // 4}, 1] when {h} is divisible by 4)")
