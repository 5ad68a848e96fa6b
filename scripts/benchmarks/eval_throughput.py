"""Evaluation throughput: the importance-sampled NLL (images x samples per second), vaelab's batched
estimator against the naive per-image loop (one image and its K samples per pass, a Python loop over images),
and the projected time for the full 10,000-image test set at K=5,000.

    python scripts/benchmarks/eval_throughput.py [--k 5000] [--images 200] [--naive-images N] [--device cpu]
        [--points-per-pass auto] [--matmul-precision highest]

The batched estimator runs on --images test images (10000: the whole test set, timed, not projected) in
batches of 500 as vaelab-eval does; the naive loop on --naive-images (default: the same) and is projected.

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
from vaelab.evaluation.metrics import importance_log_weights
from vaelab.models import VAE, HierarchicalVAE, IAFPosterior, MixtureOfGaussians, StandardNormal, VampPrior

MODELS = {
    "vanilla": lambda: VAE((1, 28, 28), prior=StandardNormal),
    "vamp": lambda: VAE((1, 28, 28), prior=partial(VampPrior, num_components=500)),
    "deep": lambda: HierarchicalVAE((1, 28, 28), prior=StandardNormal),
    "mog": lambda: VAE((1, 28, 28), prior=partial(MixtureOfGaussians, num_components=50)),
    "iaf": lambda: VAE((1, 28, 28), prior=StandardNormal, posterior=partial(IAFPosterior, num_flows=2)),
}


@torch.inference_mode()
def batched(model, x, k, points_per_pass, dev) -> float:
    sync(dev)
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], 500):  # vaelab-eval's and the test loader's batch of 500 images
        chunk = x[i : i + 500]
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
    parser.add_argument("--naive-images", type=int, default=None, help="images for the naive loop (default --images)")
    parser.add_argument("--points-per-pass", default="auto", help="auto (by device) or a number")
    parser.add_argument("--matmul-precision", default="highest", help="highest (fp32) or high (TF32 on a GPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dev = torch.device(args.device)
    torch.set_float32_matmul_precision(args.matmul_precision)
    ppp = args.points_per_pass if args.points_per_pass == "auto" else int(args.points_per_pass)
    naive_images = args.naive_images or args.images
    dm = ImageDataModule(root=str(DATA))
    dm.setup()
    x = dm.test_set.images[: args.images].to(dev)
    rows = []
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model = make().to(dev).eval()
        encoder = model.encoder if hasattr(model, "encoder") else model.top_encoder
        batched(model, x[:500], min(args.k, 50), ppp, dev)  # warm-up: kernels, allocator
        calls = {"encoder": 0, "decoder": 0}
        hooks = [part.register_forward_hook(lambda m, i, o, key=key: calls.__setitem__(key, calls[key] + 1))
                 for key, part in (("encoder", encoder), ("decoder", model.decoder))]
        t_batched = batched(model, x, args.k, ppp, dev)
        for hook in hooks:
            hook.remove()
        t_naive = naive(model, x[:naive_images], args.k, dev)
        batched_rate, naive_rate = args.images * args.k / t_batched, naive_images * args.k / t_naive
        row = {"model": name, "K": args.k, "images": args.images,
               "batched points/s": round(batched_rate), "naive points/s": round(naive_rate),
               "speed-up": round(batched_rate / naive_rate, 2),
               "full test set at K (s)": round(t_batched * 10_000 / args.images, 2)}
        if name == "vamp":
            # a pass encodes its images once and decodes once; the rest of the encoder's calls are pseudo-inputs
            row["pseudo-input encodings per pass"] = calls["encoder"] / max(1, calls["decoder"]) - 1
        rows.append(row)
        print(row, flush=True)
    print()
    table(rows, ["model", "K", "batched points/s", "naive points/s", "speed-up", "full test set at K (s)"])
    print(f"(full test set time from {args.images} images; naive loop on {naive_images} images; "
          f"points per pass {ppp}, matmul precision {args.matmul_precision})")
    save("eval_throughput", {"device": args.device, "points_per_pass": ppp, "matmul_precision": args.matmul_precision,
                             "rows": rows})


if __name__ == "__main__":
    main()
