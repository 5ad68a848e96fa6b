"""Evaluation throughput: the importance-sampled NLL (images x samples per second), vaelab's batched
estimator against the naive per-image loop (one image and its K samples per pass, a Python loop over images),
and the projected time for the full 10,000-image test set at K=5,000.

    python scripts/benchmarks/eval_throughput.py [--k 5000] [--images 200] [--device cpu]

Both use the same untrained-but-real model on real Fashion-MNIST test images, in inference mode. The
VampPrior row shows that its K=500 pseudo-input encodings are computed once per pass, not per sample.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, save, sync, table

from vaelab.data import ImageDataModule
from vaelab.metrics import importance_log_weights
from vaelab.models import VAE, HierarchicalVAE, StandardNormal, VampPrior

MODELS = {
    "vanilla": lambda: VAE((1, 28, 28), prior=StandardNormal),
    "vamp": lambda: VAE((1, 28, 28), prior=partial(VampPrior, num_components=500)),
    "deep": lambda: HierarchicalVAE((1, 28, 28), prior=StandardNormal),
}


@torch.inference_mode()
def batched(model, x, k, points_per_pass, dev) -> float:
    sync(dev)
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], 100):
        chunk = x[i : i + 100]
        importance_log_weights(model, chunk, k, points_per_pass, index=torch.arange(i, i + chunk.shape[0], device=dev))
    sync(dev)
    return time.perf_counter() - t0


@torch.inference_mode()
def naive(model, x, k, dev) -> float:
    sync(dev)
    t0 = time.perf_counter()
    for i in range(x.shape[0]):  # the per-image loop of the paper's code: one image, its K samples at once
        log_w = model.log_importance_weights(x[i : i + 1], k)
        torch.logsumexp(log_w, 0)
    sync(dev)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=5000)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--points-per-pass", type=int, default=5000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    dm = ImageDataModule(root=str(DATA))
    dm.setup()
    x = dm.test_set.images[: args.images].to(dev)
    rows = []
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make().to(dev).eval()
        encoder = model.encoder if hasattr(model, "encoder") else model.top_encoder
        calls = []
        hook = encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
        t_batched = batched(model, x, args.k, args.points_per_pass, dev)
        hook.remove()
        t_naive = naive(model, x, args.k, dev)
        points = args.images * args.k
        row = {"model": name, "K": args.k, "images": args.images,
               "batched points/s": round(points / t_batched), "naive points/s": round(points / t_naive),
               "speed-up": round(t_naive / t_batched, 2),
               "full test set at K (s)": round(t_batched * 10_000 / args.images, 1)}
        if name == "vamp":
            passes = sum(1 for c in calls if c != 500)
            row["pseudo-input encodings per pass"] = sum(1 for c in calls if c == 500) / max(1, passes)
        rows.append(row)
        print(row, flush=True)
    print()
    table(rows, ["model", "K", "batched points/s", "naive points/s", "speed-up", "full test set at K (s)"])
    print("(full test set time projected from the measured rate on", args.images, "images)")
    save("eval_throughput", {"device": args.device, "points_per_pass": args.points_per_pass, "rows": rows})


if __name__ == "__main__":
    main()
