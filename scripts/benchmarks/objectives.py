"""Training objectives, in one run: the ELBO against the IWAE bound (loss=iwae, k samples) on dynamically
binarised Fashion-MNIST at a budget this 2-core CPU affords (the real app, every seed), their training
images/s (the one step function, timed on real images), and what measuring the gradient's norm every step
(train/grad_norm) costs.

    python scripts/benchmarks/objectives.py [--seeds 1,2] [--subset 20000] [--epochs 5] [--k 100]
        [--test-images 2000] [--samples 5,20] [--steps 60] [--skip-sweep]

The budget (defaults): the default vanilla VAE, 20,000 training images (data.subset), 5 epochs (the default KL
warm-up shortened to 1 epoch for both objectives), the test NLL at K=100 on the first 2,000 test images. Far from
converged: the figures compare the objectives at one short budget. Burda et al. (2016) report the IWAE bound
giving a better test NLL and a worse ELBO than training the ELBO; this measures whether it does here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, OUT, run_budget_sweep, save, table

from vaelab.data import ImageDataModule
from vaelab.models import VAE
from vaelab.training.objective import Loss
from vaelab.training.step import grad_norm, step_objective


def images_per_second(loss: Loss, steps: int, measure_norm: bool = True, batch: int = 100) -> float:
    """Training images/s of the default vanilla VAE under this objective: the step's noise, the one step function,
    backward, the gradient's norm (unless measure_norm=False), Adam; after 10 warm-up steps."""
    torch.manual_seed(0)
    data = ImageDataModule("fashion_mnist", root=str(DATA), subset=5000, device=None)
    data.setup("fit")
    model = VAE((1, 28, 28))
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=5e-4, fused=True)
    x = torch.bernoulli(data.train_set.__getitems__(list(range(batch))))
    for i in range(steps + 10):
        if i == 10:
            t0 = time.perf_counter()
        objective, _ = step_objective(model, x, loss.draw_noise(model, batch, x.device), loss, 1.0)
        opt.zero_grad(set_to_none=True)
        objective.backward()
        if measure_norm:
            grad_norm(params)
        opt.step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--subset", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--test-images", type=int, default=2000)
    parser.add_argument("--samples", default="5,20", help="the IWAE bound's k values to train")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--skip-sweep", action="store_true", help="images/s only")
    args = parser.parse_args()
    ks = [int(k) for k in args.samples.split(",")]
    objectives = {"elbo": Loss(), **{f"iwae k={k}": Loss(objective="iwae", samples=k) for k in ks}}

    speed = {name: images_per_second(loss, args.steps) for name, loss in objectives.items()}
    bare = images_per_second(Loss(), args.steps, measure_norm=False)
    rows = [{"objective": n, "train img/s": f"{s:,.0f}", "vs elbo": f"{s / speed['elbo']:.2f}"}
            for n, s in speed.items()]
    print(f"\ntraining images/s, default vanilla VAE, batch 100, {torch.get_num_threads()} threads:")
    table(rows, ["objective", "train img/s", "vs elbo"])
    print(f"the gradient's norm every step (train/grad_norm): {speed['elbo']:,.0f} images/s with it, {bare:,.0f} "
          f"without: {speed['elbo'] / bare:.3f}")
    figures: dict = {"images_per_s": speed, "elbo_without_grad_norm": bare}
    if not args.skip_sweep:
        runs, walls = {}, {}
        for name, loss in objectives.items():
            sweep_dir = OUT / f"objectives_{name.replace(' k=', '_k')}"
            extra = [] if loss.objective == "elbo" else ["loss.objective=iwae", f"loss.samples={loss.samples}"]
            walls[name] = run_budget_sweep(args, sweep_dir, "loss.warmup_epochs=1", *extra)
            runs[name] = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/results.json"))]
        out_rows = []
        for name, rs in runs.items():
            def stat(key, rs=rs):
                v = [r["metrics"][key] for r in rs]
                return f"{statistics.fmean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0:.2f}"
            out_rows.append({"objective": name, "seeds": len(rs), "test NLL": stat("test/nll"),
                             "test ELBO": stat("test/elbo"), "test KL": stat("test/kl"),
                             "active units": stat("test/active_units"),
                             "train s": f"{statistics.fmean(r['train_time_s'] for r in rs):.0f}"})
        print(f"\ndynamically binarised Fashion-MNIST, vanilla VAE: {args.subset:,} training images, {args.epochs} "
              f"epochs, K={args.k} on {args.test_images:,} test images (nats):")
        table(out_rows, ["objective", "seeds", "test NLL", "test ELBO", "test KL", "active units", "train s"])
        figures.update(budget=vars(args), sweep_wall_s=walls, results={r["objective"]: r for r in out_rows})
    save("objectives", figures)


if __name__ == "__main__":
    main()
