"""N models of one shape trained as one: every parameter with a leading member axis, the N forward passes as one
vmapped call (torch.func's model-ensembling recipe), and Adam over the stacked tensors with per-member
hyper-parameters as tensors. Plain PyTorch; what a sweep's stack server (stack_server.py) runs.

Each member's step is the solo step (engine.StepEngine): -ELBO's terms at the member's own images and noise, its
objective (objective.Loss, with the member's KL weight and free bits), its gradient, its clipping, its Adam step.
The members' objectives are summed, not averaged, so no member's gradient depends on N; clipping and
AdamNormGrad's normalisation are per member. A member whose objective is not finite at a step is not updated at
that step (its draws, not its weights, carry the NaN), as the solo engine stops before such a step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.func import functional_call, vmap

from vaelab.models.base import VAEBase

# the optimisers a stack implements, by the torch class a member's config instantiates (conf/optim/)
STACKED_OPTIMIZERS = {"torch.optim.adam.Adam": "adam", "torch.optim.adamw.AdamW": "adamw",
                      "vaelab.training.optim.AdamNormGrad": "adam_normgrad"}
# per-member hyper-parameters, one row each: [lr, weight_decay, beta1, beta2, eps, max_grad_norm, free_bits]
HYPER = ("lr", "weight_decay", "beta1", "beta2", "eps", "max_grad_norm", "free_bits")


class Stack:
    """N members of `template`'s shape. params: name -> [N, *shape] (the members' weights); exp_avg, exp_avg_sq:
    Adam's moments, likewise; step: [N] Adam step counts. All of them may live in shared memory, where each
    member's process views its own slice."""

    def __init__(self, template: VAEBase, n: int, kind: str, share: bool = False) -> None:
        self.template, self.n, self.kind = template, n, kind
        device = next(template.parameters()).device

        def zeros(shape) -> Tensor:
            t = torch.zeros(shape, device=device)
            return t.share_memory_() if share and device.type == "cpu" else t

        names = [name for name, _ in template.named_parameters()]
        self.params = {name: zeros((n, *p.shape)) for name, p in template.named_parameters()}
        self.exp_avg = {name: zeros((n, *p.shape)) for name, p in template.named_parameters()}
        self.exp_avg_sq = {name: zeros((n, *p.shape)) for name, p in template.named_parameters()}
        self.step = zeros((n,))
        self.names = names
        self._terms = vmap(self._member_terms)

    def _member_terms(self, params: dict[str, Tensor], x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        terms = functional_call(self.template, params, (x, noise))
        return terms.recon, terms.kl_layers

    def terms(self, x: Tensor, noise: Tensor, params: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The members' -ELBO terms: x [N, B, C, H, W], noise [N, B, sum D] -> recon [N, B], kl_layers [N, L, B]."""
        return self._terms(self.params if params is None else params, x, noise)

    def objective(self, recon: Tensor, kl_layers: Tensor, weight: Tensor, free_bits: Tensor) -> Tensor:
        """objective.Loss per member: recon mean + weight * sum_l max(free_bits, KL_l mean) (no floor at 0)."""
        kl = kl_layers.mean(-1)  # [N, L]
        floored = torch.where(free_bits[:, None] > 0, torch.maximum(kl, free_bits[:, None]), kl)
        return recon.mean(-1) + weight * floored.sum(-1)

    def train_step(self, x: Tensor, noise: Tensor, weight: Tensor, hyper: Tensor, members: list[int]) -> Tensor:
        """One optimiser step of the `members` (indices). weight [N] (KL weights), hyper [N, len(HYPER)] on the
        host. Returns the statistics [N, L + 2]: recon and each layer's KL summed over the batch, the objective
        (rows of other members: whatever their stale slots give)."""
        active = torch.zeros(self.n, dtype=torch.bool, device=weight.device)
        active[members] = True
        params = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
        recon, kl_layers = self.terms(x, noise, params)
        objective = self.objective(recon, kl_layers, weight, hyper[:, HYPER.index("free_bits")].to(weight.device))
        stats = torch.cat([recon.detach().sum(-1, keepdim=True), kl_layers.detach().sum(-1),
                           objective.detach()[:, None]], 1)
        update = active & torch.isfinite(objective.detach())
        # summed, not averaged: member i's gradient is its own objective's
        grads = torch.autograd.grad(torch.where(update, objective, 0.0).sum(), list(params.values()))
        # vmap's weight gradients come transposed; the fused kernel reads memory in order
        self._adam({name: g.contiguous() for name, g in zip(params, grads)}, hyper, update, members)
        return stats

    @torch.no_grad()
    def _adam(self, grads: dict[str, Tensor], hyper: Tensor, update: Tensor, members: list[int]) -> None:
        """torch's fused Adam / AdamW kernel (and vaelab's AdamNormGrad on it) run on each member's slices, with
        the member's own hyper-parameters and gradient clipping: per member, the solo step's arithmetic. Members
        outside `members` are not touched; a member whose objective was not finite (`update` false) is skipped by
        the kernel's found_inf flag, on the device, with no host sync."""
        rows = hyper.tolist()  # the hyper-parameters live on the host (server.Slots)
        names = list(grads)
        norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), dim=1) for g in grads.values()], 1)  # [N, P]
        total = torch.linalg.vector_norm(norms, dim=1)
        max_norm = hyper[:, HYPER.index("max_grad_norm")].to(total.device)
        clip = torch.where(torch.isfinite(max_norm), (max_norm / (total + 1e-6)).clamp(max=1.0), 1.0)
        skip = (~update).float()
        kernel = torch._fused_adamw_ if self.kind == "adamw" else torch._fused_adam_
        for i in members:
            lr, wd, b1, b2, eps, _, _ = rows[i]
            member_grads = [grads[n][i] for n in names]
            if self.kind == "adam_normgrad":  # AdamNormGrad: each tensor's clipped gradient to unit norm
                torch._foreach_mul_(member_grads, list((clip[i] / (norms[i] * clip[i] + 1e-7)).unbind()))
            else:
                torch._foreach_mul_(member_grads, clip[i])
            step = self.step[i : i + 1]
            step.add_(1 - skip[i])
            kernel([self.params[n][i] for n in names], member_grads, [self.exp_avg[n][i] for n in names],
                   [self.exp_avg_sq[n][i] for n in names], [], [step] * len(names), lr=lr, beta1=b1, beta2=b2,
                   weight_decay=wd, eps=eps, amsgrad=False, maximize=False, grad_scale=None,
                   found_inf=skip[i : i + 1])


def hyper_row(group: dict, kind: str, max_grad_norm: float | None, free_bits: float) -> list[float]:
    """A member's HYPER row from its optimiser's param group (what its scheduler set this epoch)."""
    b1, b2 = group.get("betas", (0.9, 0.999))
    return [float(group["lr"]), float(group.get("weight_decay", 0.0)), float(b1), float(b2),
            float(group.get("eps", 1e-8)), math.inf if max_grad_norm is None else float(max_grad_norm),
            float(free_bits)]
