"""Scaling: how one training step's cost (forward, backward, fused Adam as vaelab uses it; no framework) grows with
batch size, latent size, the VampPrior's K pseudo-inputs and the number of stochastic layers.

    python scripts/benchmarks/scaling.py [--steps 30]
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import save, sync, table

from vaelab.models import VAE, HierarchicalVAE, StandardNormal, VampPrior
from vaelab.training.optim import adam


def step_ms(model, batch: int, steps: int, dev) -> float:
    model = model.to(dev)
    opt = adam(list(model.parameters()), 5e-4)  # as vaelab trains: fused where the device has it
    x = torch.bernoulli(torch.full((batch, 1, 28, 28), 0.3, device=dev))
    for i in range(steps + 5):
        if i == 5:
            sync(dev)
            t0 = time.perf_counter()
        loss = model.elbo_terms(x).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(dev)
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    rows = []

    def add(axis, value, model, batch=100):
        torch.manual_seed(0)
        ms = step_ms(model, batch, args.steps, dev)
        rows.append({"axis": axis, "value": value, "ms/step": round(ms, 2), "images/s": round(batch / ms * 1000)})
        print(rows[-1], flush=True)

    for b in (25, 50, 100, 200, 400):
        add("batch size (vanilla)", b, VAE((1, 28, 28)), batch=b)
    for d in (2, 10, 40, 100, 200):
        add("latent size (vanilla)", d, VAE((1, 28, 28), latent_dim=d))
    for k in (1, 50, 100, 250, 500, 1000):
        add("VampPrior K (vanilla)", k, VAE((1, 28, 28), prior=partial(VampPrior, num_components=k)))
    for n in (1, 2, 3, 4):
        add("stochastic layers (deep)", n, HierarchicalVAE((1, 28, 28), num_layers=n, prior=StandardNormal))
    for axis in dict.fromkeys(r["axis"] for r in rows):
        group = [r for r in rows if r["axis"] == axis]
        for r in group:
            r["cost vs first"] = round(r["ms/step"] / group[0]["ms/step"], 2)
    table(rows, ["axis", "value", "ms/step", "images/s", "cost vs first"])
    save("scaling", {"device": args.device, "steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
