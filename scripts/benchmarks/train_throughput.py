"""Training throughput: `vaelab-train` against a bare hand-written PyTorch loop of the same model, data,
batch size and precision, in this process.

    python scripts/benchmarks/train_throughput.py [--steps 400] [--models vanilla vamp deep] [--device cpu]

vaelab: the real app (`vaelab.train.train` on the composed config: Lightning, its loop and hooks, vaelab's
module, callbacks, CSV and offline W&B loggers) for 20 + S steps; its Throughput callback times the steps
after the first 20, the same window as the bare loop (start-up and the end-of-run checkpoint and grids
are outside both windows).
bare: the same model and in-memory images, a loop of index, binarise, elbo_terms, backward, Adam step,
timed over S steps after 20 warm-up steps. Ratio = vaelab / bare (the goal: at least 0.95). The two
alternate, best of --repeats each, so a slow moment of the machine hits both alike.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, save, sync, table

MODELS = {"vanilla": ["model=vanilla", "prior=standard"], "vamp": ["model=vanilla", "prior=vamp"],
          "deep": ["model=deep", "prior=standard"], "deep_vamp": ["model=deep", "prior=vamp"]}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def app_images_per_s(model_overrides: list[str], steps: int, device: str, extra: list[str]) -> float:
    from vaelab.train import train

    out = tempfile.mkdtemp(prefix="vaelab-bench-")
    accel = "gpu" if device == "cuda" else "cpu"
    cfg = compose([*model_overrides, f"paths.output_dir={out}", f"trainer.max_steps={20 + steps}", "test=false",
                   "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", f"trainer.accelerator={accel}",
                   "callbacks.throughput.skip=20", *extra])
    return train(cfg)["metrics"]["perf/train_images_per_s"]


def bare_images_per_s(model_overrides: list[str], steps: int, device: str) -> float:
    from vaelab.data import ImageDataModule
    from vaelab.runs import build_model

    cfg = compose(model_overrides)
    torch.manual_seed(0)
    dm = ImageDataModule(root=str(ROOT / "data"))
    dm.setup()
    dev = torch.device(device)
    images = dm.train_set.images  # uint8 [N, 1, 28, 28], in memory as vaelab holds them
    model = build_model(cfg, dm.image_shape).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    batch = cfg.data.batch_size
    order = torch.randperm(images.shape[0])
    warmup = 20
    for i in range(warmup + steps):
        if i == warmup:
            sync(dev)
            t0 = time.perf_counter()
        idx = order[(i * batch) % (images.shape[0] - batch):][:batch]
        x = torch.bernoulli(images[idx].float().div_(255.0)).to(dev)
        loss = model.elbo_terms(x).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(dev)
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")  # W&B logs as in any run here, without the network
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--models", nargs="+", default=["vanilla", "vamp", "deep"], choices=list(MODELS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many measurements of each")
    parser.add_argument("extra", nargs="*", help="more app overrides, e.g. trainer.precision=bf16-mixed")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        ov = MODELS[name]
        bare, app = [], []
        for _ in range(args.repeats):
            bare.append(bare_images_per_s(ov, args.steps, args.device))
            app.append(app_images_per_s(ov, args.steps, args.device, args.extra))
        rows.append({"model": name, "bare images/s": round(max(bare)), "vaelab images/s": round(max(app)),
                     "ratio vaelab/bare": round(max(app) / max(bare), 3),
                     "all bare": [round(b) for b in bare], "all vaelab": [round(a) for a in app]})
        print(rows[-1], flush=True)
    print()
    table(rows, ["model", "bare images/s", "vaelab images/s", "ratio vaelab/bare"])
    save("train_throughput", {"steps": args.steps, "device": args.device, "extra_overrides": args.extra,
                              "rows": rows})


if __name__ == "__main__":
    main()
