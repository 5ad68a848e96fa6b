"""Sweep throughput: aggregate training images/s of N runs of the default model (gated MLP 300-300, latent 40,
batch 100, dynamically binarised Fashion-MNIST), trained

  bare, one after another   N models, each its own fused-Adam loop (the ceiling of one-after-another)
  bare, stacked             the N models as one stacked model (vaelab.training.stack: vmap + stacked Adam), the
                            ceiling of stacking; with the torch ops one stacked step dispatches (flat in N)
  app, basic                vaelab-train -m (Hydra's basic launcher: one job after another, in one process)
  app, joblib               vaelab-train -m hydra/launcher=joblib (parallel processes, each cores/n threads)
  app, stacked              vaelab-train -m hydra/launcher=stacked hydra.launcher.stack=true

for N = 1, 2, 4, 8 (--ns). The app rows count every image each run trained over the sweep's wall time, start-up
included (test=false: training only); the bare rows time the optimiser steps alone. Run from the repo root:

    python scripts/benchmarks/sweep_throughput.py [--ns 1,2,4,8] [--steps 100] [--no-app]

It prints a table with the ratios to one-after-another and to the stacked ceiling, and writes
outputs/benchmarks/sweep_throughput.json (VAELAB_BENCH_DIR: elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

from common import DATA, save, sync  # noqa: E402

from vaelab.data import load_images  # noqa: E402
from vaelab.data.loader import bernoulli_draw  # noqa: E402
from vaelab.models.vae import VAE  # noqa: E402
from vaelab.training.objective import Loss  # noqa: E402
from vaelab.training.stack import Stack, hyper_row  # noqa: E402

BATCH = 100


def images(device) -> torch.Tensor:
    train, _ = load_images("fashion_mnist", DATA, download=False)
    return torch.from_numpy(train[:50_000]).to(device)


def timed(step, steps: int, device, warmup: int = 5) -> float:
    """Seconds for `steps` calls of step() after `warmup` untimed ones, the device drained before and after."""
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - t0


def bare_sequential(data, n: int, steps: int, device) -> float:
    """N models trained one after another, each with its own fused Adam: images/s over all of them."""
    loss = Loss()
    total = 0.0
    for i in range(n):
        torch.manual_seed(i)
        model = VAE((1, 28, 28)).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=5e-4, fused=True)
        g = torch.Generator(device=device).manual_seed(i)

        def step():
            idx = torch.randint(len(data), (BATCH,), device=device, generator=g)
            x = bernoulli_draw(data[idx].float().div_(255.0))
            objective = loss(model(x), 1.0)
            opt.zero_grad(set_to_none=True)
            objective.backward()
            opt.step()

        total += timed(step, steps, device)
    return n * steps * BATCH / total


def bare_stacked(data, n: int, steps: int, device) -> tuple[float, int]:
    """The N models as one stacked model: images/s, and the torch ops one step dispatches."""
    members = []
    for i in range(n):
        torch.manual_seed(i)
        members.append(VAE((1, 28, 28)).to(device))
    stack = Stack(members[0], n, "adam")
    with torch.no_grad():
        for i, m in enumerate(members):
            for name, p in m.named_parameters():
                stack.params[name][i].copy_(p)
    hyper = torch.tensor([hyper_row({"lr": 5e-4}, "adam", None, 0.0)] * n)
    weight, active = torch.ones(n, device=device), torch.ones(n, dtype=torch.bool, device=device)

    def step():
        idx = torch.randint(len(data), (n, BATCH), device=device)
        x = bernoulli_draw(data[idx].float().div_(255.0))
        noise = torch.randn(n, BATCH, 40, device=device)
        stack.train_step(x, noise, weight, hyper, active)

    rate = n * steps * BATCH / timed(step, steps, device)
    with OpCount() as ops:
        step()
    return rate, ops.count


class OpCount(TorchDispatchMode):
    """Counts the ATen ops dispatched (views included): the host's work per step."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def app(launcher: list[str], n: int, subset: int, device: str) -> float:
    """A real sweep of n seeds, one epoch each on `subset` training images: images trained / wall seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        seeds = ",".join(str(s) for s in range(1, n + 1))
        args = [sys.executable, "-m", "vaelab.cli.train", "-m", *launcher, f"seed={seeds}", f"hydra.sweep.dir={tmp}",
                f"data.subset={subset}", "trainer.max_epochs=1", "test=false", "logger=csv", "extras.print_config=false",
                "trainer.enable_progress_bar=false", "callbacks.image_grids.every_n_epochs=100",
                f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}"]
        env = dict(os.environ, WANDB_MODE="disabled", VAELAB_DATA_DIR=str(DATA),
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        t0 = time.perf_counter()
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"sweep failed: {' '.join(launcher)}\n{proc.stderr[-3000:]}")
        trained = 0
        for results in Path(tmp).glob("*/results.json"):
            r = json.loads(results.read_text())
            trained += r["global_step"] * 100
        return trained / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", default="1,2,4,8")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per member in the bare loops")
    parser.add_argument("--subset", type=int, default=5000, help="training images per app run (one epoch)")
    parser.add_argument("--no-app", action="store_true", help="only the bare loops")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    ns = [int(n) for n in args.ns.split(",")]
    data = images(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    rows = []
    print(f"sweep throughput on {card}, torch {torch.__version__}: aggregate training images/s")
    print(f"{'N':>3} {'bare seq':>10} {'bare stack':>11} {'stack/seq':>9} {'ops/step':>8}" +
          ("" if args.no_app else f" {'app basic':>10} {'app joblib':>11} {'app stacked':>12} {'stacked/basic':>13}"
                                  f" {'stacked/ceiling':>15}"))
    for n in ns:
        row = {"n": n, "bare_sequential": bare_sequential(data, n, args.steps, device)}
        row["bare_stacked"], row["stacked_ops_per_step"] = bare_stacked(data, n, args.steps, device)
        line = f"{n:>3} {row['bare_sequential']:>10,.0f} {row['bare_stacked']:>11,.0f} " \
               f"{row['bare_stacked'] / row['bare_sequential']:>9.2f} {row['stacked_ops_per_step']:>8}"
        if not args.no_app:
            row["app_basic"] = app([], n, args.subset, device.type)
            row["app_joblib"] = app(["hydra/launcher=joblib"], n, args.subset, device.type)
            row["app_stacked"] = app(["hydra/launcher=stacked", "hydra.launcher.stack=true"], n, args.subset,
                                     device.type)
            line += f" {row['app_basic']:>10,.0f} {row['app_joblib']:>11,.0f} {row['app_stacked']:>12,.0f}" \
                    f" {row['app_stacked'] / row['app_basic']:>13.2f} {row['app_stacked'] / row['bare_stacked']:>15.2f}"
        print(line, flush=True)
        rows.append(row)
    save("sweep_throughput", {"device": card, "steps": args.steps, "subset": args.subset, "rows": rows})


if __name__ == "__main__":
    main()
