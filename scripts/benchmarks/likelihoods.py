"""Likelihoods for 8-bit images, in one run: each likelihood's test bits/dim on 8-bit Fashion-MNIST at a budget
this 2-core CPU affords (experiment=compare_likelihoods, the real app, every seed), and its training images/s
against Bernoulli's (the same model and optimiser step, timed on real images).

    python scripts/benchmarks/likelihoods.py [--seeds 1,2] [--subset 20000] [--epochs 5] [--k 100]
        [--test-images 2000] [--steps 60] [--skip-sweep]

The budget (defaults): 20,000 training images (data.subset, which also caps validation), 5 epochs, the test NLL
at K=100 on the first 2,000 test images. Far from converged (the VampPrior paper trains for hundreds of epochs):
the figures compare the likelihoods at one short budget, not the field's converged numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, OUT, run_budget_sweep, save, table

from vaelab.data import ImageDataModule
from vaelab.models import (
    VAE,
    Bernoulli,
    ContinuousBernoulli,
    DiscretizedGaussian,
    DiscretizedLogistic,
    DiscretizedMixtureOfLogistics,
    Gaussian,
)

LIKELIHOODS = {  # name: (likelihood, binarised data?)
    "bernoulli": (Bernoulli, True),
    "gaussian": (Gaussian, False),
    "continuous_bernoulli": (ContinuousBernoulli, False),
    "discretized_gaussian_fixed": (partial(DiscretizedGaussian, variance="fixed"), False),
    "discretized_gaussian": (DiscretizedGaussian, False),
    "discretized_gaussian_per_pixel": (partial(DiscretizedGaussian, variance="per_pixel"), False),
    "discretized_logistic": (DiscretizedLogistic, False),
    "dmol": (partial(DiscretizedMixtureOfLogistics, num_mixtures=5), False),
}


def images_per_second(likelihood, binarised: bool, steps: int, batch: int = 100) -> float:
    """Training images/s of the default vanilla VAE with this likelihood: forward, backward, Adam, on real images
    (dynamically binarised for Bernoulli; 8-bit values otherwise), after 10 warm-up steps."""
    torch.manual_seed(0)
    data = ImageDataModule("fashion_mnist", root=str(DATA), binarize="dynamic" if binarised else "none",
                           subset=5000, device=None)
    data.setup("fit")
    model = VAE((1, 28, 28), likelihood=likelihood())
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    x = data.train_set.__getitems__(list(range(batch)))
    if binarised:
        x = torch.bernoulli(x)
    for i in range(steps + 10):
        if i == 10:
            t0 = time.perf_counter()
        loss = model.elbo_terms(x).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--subset", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip-sweep", action="store_true", help="images/s only")
    args = parser.parse_args()

    speed = {name: images_per_second(lik, binarised, args.steps) for name, (lik, binarised) in LIKELIHOODS.items()}
    rows = [{"likelihood": n, "train img/s": f"{s:,.0f}", "vs bernoulli": f"{s / speed['bernoulli']:.2f}"}
            for n, s in speed.items()]
    print(f"\ntraining images/s, default vanilla VAE, batch 100, {torch.get_num_threads()} threads:")
    table(rows, ["likelihood", "train img/s", "vs bernoulli"])
    figures: dict = {"images_per_s": speed}
    if not args.skip_sweep:
        sweep_dir = OUT / "likelihoods_sweep"
        wall = run_budget_sweep(args, sweep_dir, "experiment=compare_likelihoods")
        results = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]
        by: dict[str, list[dict]] = {}
        for r in results:
            by.setdefault(r["likelihood"], []).append(r)
        bpd_rows = []
        for name, runs in by.items():
            bpd = [r["metrics"]["test/bpd"] for r in runs]
            bpd_rows.append({"likelihood": name, "seeds": len(runs), "pixels": runs[0]["pixels"],
                             "test bits/dim": f"{statistics.fmean(bpd):.3f} ± {statistics.stdev(bpd) if len(bpd) > 1 else 0:.3f}",
                             "train s": f"{statistics.fmean(r['train_time_s'] for r in runs):.0f}"})
        print(f"\ntest bits/dim of 8-bit Fashion-MNIST: {args.subset:,} training images, {args.epochs} epochs, "
              f"K={args.k} on {args.test_images:,} test images; sweep wall time {wall:.0f} s ({sweep_dir}):")
        table(bpd_rows, ["likelihood", "seeds", "pixels", "test bits/dim", "train s"])
        figures.update(budget=vars(args), sweep_wall_s=wall, bits_per_dim={r["likelihood"]: r for r in bpd_rows})
    save("likelihoods", figures)


if __name__ == "__main__":
    main()
