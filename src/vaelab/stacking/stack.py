"""N models of one shape trained as one: every parameter with a leading member axis, the N forward passes as one
vmapped call (torch.func's model-ensembling recipe), and Adam over the stacked tensors with per-member
hyper-parameters as tensors. Plain PyTorch; what a stacked sweep's group (group.py) runs.

Each member's step is the solo step: the one step function (training/step.py: the objective and statistics at the
member's own images and noise, with its KL weight and free bits), its gradient, its norm and clipping, its Adam step.
The members' objectives are summed, not averaged, so no member's gradient depends on N; clipping and
AdamNormGrad's normalisation are per member. A member whose objective is not finite at a step is not updated at
that step (its draws, not its weights, carry the NaN), as the solo engine stops before such a step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from vaelab.models.base import VAEBase
from vaelab.training.objective import Loss
from vaelab.training.step import StepStats, step_objective

# the optimisers a stack implements, by the torch class a member's config instantiates (conf/optim/)
STACKED_OPTIMIZERS = {"torch.optim.adam.Adam": "adam", "torch.optim.adamw.AdamW": "adamw",
                      "vaelab.training.optim.AdamNormGrad": "adam_normgrad"}
# per-member optimiser hyper-parameters, one row each: [lr, weight_decay, beta1, beta2, eps, max_grad_norm,
# skip_above, ema_rate] (inf: no clipping, no skipping; ema_rate 0: no average)
HYPER = ("lr", "weight_decay", "beta1", "beta2", "eps", "max_grad_norm", "skip_above", "ema_rate")


class _Step(nn.Module):
    """The one step function (training/step.py) as a module of the template, so that functional_call puts a
    member's weights in and vmap runs every member's at once."""

    def __init__(self, model: nn.Module, loss: Loss) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, x: Tensor, noise: Tensor, weight: Tensor, free_bits: Tensor):
        return step_objective(self.model, x, noise, self.loss, weight, free_bits)


class Stack:
    """N members of `template`'s shape. params: name -> [N, *shape] (the members' weights); exp_avg, exp_avg_sq:
    Adam's moments, likewise; step: [N] Adam step counts. The weights and each moment are views into one flat
    [N, total] buffer each (flat, flat_exp_avg, flat_exp_avg_sq; parameters in named_parameters' order), so that
    the optimiser runs a fixed number of kernels over all members whatever N (HFTA's layout). loss: the members'
    objective and its samples (objective.Loss.shape(), one for the stack); their KL weights and free bits are
    each member's own, given to every step."""

    def __init__(self, template: VAEBase, n: int, kind: str, loss: Loss | None = None) -> None:
        self.template, self.n, self.kind = template, n, kind
        device = next(template.parameters()).device
        shapes = {name: p.shape for name, p in template.named_parameters()}
        sizes = [math.prod(shape) for shape in shapes.values()]
        total = sum(sizes)

        def zeros(shape) -> Tensor:
            return torch.zeros(shape, device=device)

        def views(flat: Tensor) -> dict[str, Tensor]:
            out, start = {}, 0
            for (name, shape), size in zip(shapes.items(), sizes):
                out[name] = flat[:, start:start + size].view(n, *shape)
                start += size
            return out

        self.flat, self.flat_exp_avg, self.flat_exp_avg_sq = zeros((n, total)), zeros((n, total)), zeros((n, total))
        self.params, self.exp_avg, self.exp_avg_sq = views(self.flat), views(self.flat_exp_avg), views(self.flat_exp_avg_sq)
        self._views = views
        # the weights' moving averages (trainer.ema_rate), made when a member brings one (add_average)
        self.flat_ema: Tensor | None = None
        self.ema: dict[str, Tensor] = {}
        self.step = zeros((n,))
        self.names = list(shapes)
        self._work: Tensor | None = None  # the update's [N, total] buffer (gradients, then denominators), made once
        self.sizes = sizes
        self.loss = loss or Loss()
        module = _Step(template, self.loss)
        self._step = vmap(lambda p, x, noise, weight, free_bits: functional_call(module, p,
                                                                                 (x, noise, weight, free_bits)))

    def add_average(self) -> None:
        """Keep an average of every member's weights (a flat [N, total] buffer that ema views), updated after each
        applied step by each member's ema_rate (0: the average is the weights themselves, and unused)."""
        if self.flat_ema is None:
            self.flat_ema = self.flat.clone()
            self.ema = self._views(self.flat_ema)

    def train_step(self, x: Tensor, noise: Tensor, weight: Tensor, free_bits: Tensor, hyper: Tensor, active: Tensor,
                   clip: bool = True, decay: bool = True) -> Tensor:
        """One optimiser step of the members where `active` [N] (bool, on the device) is true. x [N, B, C, H, W];
        noise: each member's step draws (objective.Loss.noise_shape, a member axis first); weight, free_bits [N]
        (each member's KL weight and free bits); hyper [N, len(HYPER)]. clip, decay: whether any member clips its
        gradient or decays its weights (known on the host from the members' settings: False skips that pass over
        every member). Returns each member's StepStats row [N, width] (rows of inactive members: whatever their
        stale inputs give). No host sync and static shapes: an inactive or diverged member is masked, not indexed
        out."""
        hyper = hyper.to(weight.device, non_blocking=True)
        params = {f"model.{k}": v.detach().requires_grad_(True) for k, v in self.params.items()}
        objective, values = self._step(params, x, noise, weight, free_bits.to(weight.device, non_blocking=True))
        update = active & torch.isfinite(objective.detach())
        # summed, not averaged: member i's gradient is its own objective's
        grads = torch.autograd.grad(torch.where(update, objective, 0.0).sum(), list(params.values()))
        norm, skipped = self._adam(dict(zip(self.names, grads)), hyper, update, clip or self.kind == "adam_normgrad",
                                   decay)
        return StepStats.row(**values, grad_norm=norm, skipped_steps=skipped)

    @torch.no_grad()
    def _adam(self, grads: dict[str, Tensor], hyper: Tensor, update: Tensor, clip: bool, decay: bool) -> Tensor:
        """Adam / AdamW (and vaelab's AdamNormGrad) for all N members at once, over flat [N, total] buffers that
        the members' parameters and moments view: a fixed number of kernels whatever N (nine passes over the
        buffers, two more with clipping and weight decay), with each member's own hyper-parameters as [N] tensors
        on the device (no host sync), and a member outside `update` untouched (masked, not indexed out). Per
        member, the arithmetic of torch's fused kernel: the solo step's. The gradients are gathered into one
        persistent buffer, which then holds the denominators: no per-step allocation of [N, total] tensors. Returns
        each member's gradient norm before clipping [N] (a masked member's: 0), and 1 where a member skipped its
        update for a gradient norm above its skip_above (stabilisers.py's rule), else 0 [N]."""
        h = hyper.to(self.flat.device, non_blocking=True)
        lr, wd, b1, b2, eps, max_norm, skip_above, ema_rate = (c[:, None] for c in h.unbind(1))  # each [N, 1]
        if self._work is None:
            self._work = torch.empty_like(self.flat)
        g = torch.cat([grads[n].reshape(self.n, -1) for n in self.names], 1, out=self._work)  # buffers' order
        g.masked_fill_(~update[:, None], 0.0)  # a skipped member's NaN gradient reaches nothing
        segments = g.split(self.sizes, 1)  # each parameter tensor's columns
        norms = torch.stack([torch.linalg.vector_norm(s, dim=1) for s in segments], 1)  # [N, P], per member
        total = torch.linalg.vector_norm(norms, dim=1, keepdim=True)  # [N, 1]: train/grad_norm, before clipping
        skipped = update & ((total > skip_above) & torch.isfinite(total))[:, 0]
        update = update & ~skipped
        uf = update[:, None].float()
        if clip:
            scale = torch.where(torch.isfinite(max_norm), (max_norm / (total + 1e-6)).clamp(max=1.0), 1.0)  # [N, 1]
            if self.kind == "adam_normgrad":  # AdamNormGrad: each tensor's clipped gradient to unit norm
                scale = scale / (norms * scale + 1e-7)
                for j, s in enumerate(segments):
                    s.mul_(scale[:, j : j + 1])
            else:
                g.mul_(scale)
        self.step.add_(uf[:, 0])
        step = self.step[:, None].clamp(min=1.0)  # a member that never stepped: no 0/0 in its (unused) update
        p, m, v = self.flat, self.flat_exp_avg, self.flat_exp_avg_sq
        if decay and self.kind == "adamw":
            p.mul_(1 - lr * wd * uf)
        elif decay:
            g.addcmul_(p, wd)
        # in place over the flat buffers, one pass each; a member outside `update` has weight 0 in every line
        m.lerp_(g, (1 - b1) * uf)
        v.lerp_(g.square_(), (1 - b2) * uf)
        # p -= step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps), the fused kernel's update, as p -= m / denom with
        # denom = sqrt(v) * a + c in one pass; a member outside `update`: a = 0, c = inf, so m / inf = 0
        step_size = lr / (1 - b1.pow(step))
        a = torch.where(update[:, None], 1 / ((1 - b2.pow(step)).sqrt() * step_size), 0.0)
        c = torch.where(update[:, None], eps / step_size, math.inf)
        # sqrt of v's subnormal entries (gradients at rounding level, squared) is ~30x slower on a CPU: they are
        # raised to the smallest normal float, whose root (1e-19) is below any eps
        denom = torch.clamp(v, min=torch.finfo(v.dtype).tiny, out=g).sqrt_()
        torch.addcmul(c, denom, a, out=denom)
        p.addcdiv_(m, denom, value=-1.0)
        if self.flat_ema is not None:  # the averages, after an applied step only (stabilisers.WeightAverage's rule)
            self.flat_ema.lerp_(p, (1 - ema_rate) * uf)
        return total[:, 0], skipped.float()


def hyper_row(group: dict, kind: str, max_grad_norm: float | None, skip_above: float | None = None,
              ema_rate: float = 0.0) -> list[float]:
    """A member's HYPER row from its optimiser's param group (what its scheduler set this epoch)."""
    b1, b2 = group.get("betas", (0.9, 0.999))
    return [float(group["lr"]), float(group.get("weight_decay", 0.0)), float(b1), float(b2),
            float(group.get("eps", 1e-8)), math.inf if max_grad_norm is None else float(max_grad_norm),
            math.inf if skip_above is None else float(skip_above), float(ema_rate)]
