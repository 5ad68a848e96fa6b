"""Sweep throughput: aggregate training images/s of N runs of the default model (gated MLP 300-300, latent 40,
batch 100, dynamically binarised Fashion-MNIST), trained

  bare, one after another   N models, each its own fused-Adam loop (the ceiling of one-after-another)
  bare, stacked             the N models as one stacked model (vaelab.stacking.stack: vmap + stacked Adam), the
                            ceiling of stacking; with the ATen ops and host syncs one stacked step dispatches
  app, one after another    vaelab-train -m (Hydra's basic launcher: one job after another, in one process)
  app, stacked              vaelab-train -m hydra/launcher=stacked hydra.launcher.stack=true (one process: the
                            members are threads taking turns, their steps stacked)

for N = 1, 2, 4, 8, 16, 32 (--ns). The app rows count every image each run trained over the sweep's wall time,
start-up included (test=false: training only); the bare rows time the optimiser steps alone. Each measurement runs
in a fresh process, whose peak resident memory is its row's peak_rss_mb. Run from the repo root:

    python scripts/benchmarks/sweep_throughput.py [--ns 1,2,4,8,16,32] [--steps 30] [--no-app]

It prints a table and writes outputs/benchmarks/sweep_throughput.json (VAELAB_BENCH_DIR: elsewhere): a list
`rows`, one per (kind: app | bare, device, n), with stacked_img_s, sequential_img_s, ops_per_step,
host_syncs_per_step (aten._local_scalar_dense and device-to-host copies; the app's stacked step is the bare one)
and peak_rss_mb (the stacked run's; sequential_rss_mb the one-after-another's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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
from vaelab.stacking.stack import Stack, hyper_row  # noqa: E402
from vaelab.training.objective import Loss  # noqa: E402

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


def bare_stacked(data, n: int, steps: int, device) -> tuple[float, int, int]:
    """The N models as one stacked model: images/s, and the ATen ops and host syncs one step dispatches."""
    members = []
    for i in range(n):
        torch.manual_seed(i)
        members.append(VAE((1, 28, 28)).to(device))
    stack = Stack(members[0], n, "adam")
    with torch.no_grad():
        for i, m in enumerate(members):
            for name, p in m.named_parameters():
                stack.params[name][i].copy_(p)
    hyper = torch.tensor([hyper_row({"lr": 5e-4}, "adam", None)] * n, device=device)
    weight, active = torch.ones(n, device=device), torch.ones(n, dtype=torch.bool, device=device)
    free_bits = torch.zeros(n, device=device)
    idx = torch.empty(n, BATCH, dtype=torch.long, device=device)
    noise = torch.empty(n, BATCH, 40, device=device)

    def draw():  # what the members hand over: their batches and noise (the app draws them per member)
        idx.random_(0, len(data))
        noise.normal_()
        return bernoulli_draw(data[idx].float().div_(255.0))

    def step():
        stack.train_step(draw(), noise, weight, free_bits, hyper, active, clip=False, decay=False)

    rate = n * steps * BATCH / timed(step, steps, device)
    x = draw()
    with OpCount() as ops:
        stack.train_step(x, noise, weight, free_bits, hyper, active, clip=False, decay=False)
    return rate, ops.count, ops.syncs


class OpCount(TorchDispatchMode):
    """Counts the ATen ops dispatched (views included): the host's work per step; and the host syncs among them
    (a tensor's value read on the host, or a copy from the device to the host)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device")
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst is not None and \
                    torch.device(dst).type == "cpu":
                self.syncs += 1
        return func(*args, **kwargs)


RSS_WRAPPER = ("import atexit, os, resource, runpy, sys\n"
               "atexit.register(lambda: open(os.environ['VAELAB_RSS_FILE'], 'w').write("
               "str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))\n"
               "sys.argv = ['vaelab-train', *sys.argv[1:]]\n"
               "runpy.run_module('vaelab.cli.train', run_name='__main__')\n")


def app(launcher: list[str], n: int, subset: int, device: str) -> tuple[float, float]:
    """A real sweep of n seeds, one epoch each on `subset` training images: images trained / wall seconds, and the
    sweep process's peak resident memory in MB."""
    with tempfile.TemporaryDirectory() as tmp:
        seeds = ",".join(str(s) for s in range(1, n + 1))
        args = [sys.executable, "-c", RSS_WRAPPER, "-m", *launcher, f"seed={seeds}", f"hydra.sweep.dir={tmp}/sweep",
                f"data.subset={subset}", "trainer.max_epochs=1", "test=false", "logger=csv", "extras.print_config=false",
                "trainer.enable_progress_bar=false", "callbacks.image_grids.every_n_epochs=100",
                f"trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}"]
        env = dict(os.environ, WANDB_MODE="disabled", VAELAB_DATA_DIR=str(DATA), VAELAB_RSS_FILE=f"{tmp}/rss",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
        t0 = time.perf_counter()
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"sweep failed: {' '.join(launcher)}\n{proc.stderr[-3000:]}")
        trained = 0
        for results in Path(tmp, "sweep").glob("*/results.json"):
            r = json.loads(results.read_text())
            trained += r["global_step"] * BATCH
        return trained / wall, int(Path(tmp, "rss").read_text()) / 1024


def bare_row(n: int, steps: int, device: str) -> dict:
    """The bare rows' figures for one N, in this (fresh) process: its peak memory is the stacked loop's."""
    dev = torch.device(device)
    data = images(dev)
    stacked, ops, syncs = bare_stacked(data, n, steps, dev)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"stacked_img_s": stacked, "sequential_img_s": bare_sequential(data, n, steps, dev), "ops_per_step": ops,
            "host_syncs_per_step": syncs, "peak_rss_mb": peak}


def fresh(what: str, n: int, steps: int, device: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", what, "--ns", str(n), "--steps", str(steps),
                          "--device", device], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", default="1,2,4,8,16,32")
    parser.add_argument("--steps", type=int, default=30, help="optimiser steps per member in the bare loops")
    parser.add_argument("--subset", type=int, default=5000, help="training images per app run (one epoch)")
    parser.add_argument("--no-app", action="store_true", help="only the bare loops")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # one bare measurement, in a fresh process
    args = parser.parse_args()
    ns = [int(n) for n in args.ns.split(",")]
    if args.one:
        print(json.dumps(bare_row(ns[0], args.steps, args.device)))
        return
    device = torch.device(args.device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    rows = []
    print(f"sweep throughput on {card}, torch {torch.__version__}: aggregate training images/s (stacked / one after "
          "another)")
    print(f"{'kind':<5} {'N':>3} {'stacked':>9} {'sequential':>10} {'ratio':>6} {'ops/step':>8} {'syncs/step':>10} "
          f"{'peak MB':>8}")
    for n in ns:
        kinds = [("bare", None)] + ([] if args.no_app else [("app", None)])
        for kind, _ in kinds:
            if kind == "bare":
                row = {"kind": "bare", "device": card, "n": n, **fresh("bare", n, args.steps, args.device)}
            else:
                stacked, rss = app(["hydra/launcher=stacked", "hydra.launcher.stack=true"], n, args.subset,
                                   device.type)
                sequential, seq_rss = app([], n, args.subset, device.type)
                bare = next(r for r in rows if r["kind"] == "bare" and r["n"] == n)
                row = {"kind": "app", "device": card, "n": n, "stacked_img_s": stacked, "sequential_img_s": sequential,
                       "ops_per_step": bare["ops_per_step"], "host_syncs_per_step": bare["host_syncs_per_step"],
                       "peak_rss_mb": rss, "sequential_rss_mb": seq_rss}
            rows.append(row)
            print(f"{kind:<5} {n:>3} {row['stacked_img_s']:>9,.0f} {row['sequential_img_s']:>10,.0f} "
                  f"{row['stacked_img_s'] / row['sequential_img_s']:>6.2f} {row['ops_per_step']:>8} "
                  f"{row['host_syncs_per_step']:>10} {row['peak_rss_mb']:>8,.0f}", flush=True)
    save("sweep_throughput", {"device": card, "torch": torch.__version__, "steps": args.steps, "subset": args.subset,
                              "rows": rows})


if __name__ == "__main__":
    main()
