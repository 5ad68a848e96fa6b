"""Training throughput: `vaelab-train` against a bare hand-written PyTorch loop of the same model, data,
batch size and precision, in this process.

    python scripts/benchmarks/train_throughput.py [--steps 400] [--models vanilla vamp deep] [--device cpu]

vaelab: the real app (`vaelab.train.train` on the composed config: Lightning, callbacks, CSV and offline
W&B loggers, checkpointing), run twice, for S and 2S steps; images/s = S * batch / (t(2S) - t(S)), so
start-up (data loading, W&B start, model build) cancels and only the per-step cost remains.
bare: the same model and in-memory images, a loop of index, binarise, elbo_terms, backward, Adam step,
timed over S steps after 20 warm-up steps. Ratio = vaelab / bare (the goal: at least 0.95).
"""

from __future__ import annotations

import argparse
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


def app_seconds(model_overrides: list[str], steps: int, device: str, extra: list[str]) -> float:
    from vaelab.train import train

    out = tempfile.mkdtemp(prefix="vaelab-bench-")
    accel = "gpu" if device == "cuda" else "cpu"
    cfg = compose([*model_overrides, f"paths.output_dir={out}", f"trainer.max_steps={steps}", "test=false",
                   "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false", f"trainer.accelerator={accel}",
                   "logger.wandb.mode=offline", *extra])
    t0 = time.perf_counter()
    train(cfg)
    return time.perf_counter() - t0


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
        bare = max(bare_images_per_s(ov, args.steps, args.device) for _ in range(args.repeats))
        app = []
        for _ in range(args.repeats):
            short, long = app_seconds(ov, args.steps, args.device, args.extra), \
                app_seconds(ov, 2 * args.steps, args.device, args.extra)
            app.append(args.steps * 100 / max(long - short, 1e-9))
        rows.append({"model": name, "bare images/s": round(bare), "vaelab images/s": round(max(app)),
                     "ratio vaelab/bare": round(max(app) / bare, 3)})
        print(rows[-1], flush=True)
    print()
    table(rows, ["model", "bare images/s", "vaelab images/s", "ratio vaelab/bare"])
    save("train_throughput", {"steps": args.steps, "device": args.device, "extra_overrides": args.extra,
                              "rows": rows})


if __name__ == "__main__":
    main()
