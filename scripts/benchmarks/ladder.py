"""The top-down ladder VAE against the bottom-up deep VAE and the vanilla VAE, in one run: the three trained by the
real app at one budget (experiment=compare_ladder: all 50,000 training images for 5 epochs each, one seed, KL
warm-up over the first epoch, test NLL at K=100 on the first 2,000 test images), at each learning rate of --lrs
(the VampPrior paper's 5e-4, and 2e-3), with each model's parameters, wall time, KL per layer and active layers;
the ladder's training images/s in the app against a bare PyTorch loop of the same model (train_throughput.py's
alternating blocks); and the best ladder's sample grids at temperatures 1.0 and 0.7.

    python scripts/benchmarks/ladder.py [--epochs 5] [--subset N] [--seed 1] [--k 100] [--lrs 5e-4,2e-3]
        [--blocks 8] [--block 20] [--skip-sweep] [--skip-speed]

A layer is counted active when its test KL is above 0.1 nats (it carries information about the image).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, OUT, ROOT, save, table

ACTIVE_NATS = 0.1


def sweep(args, lr: str) -> tuple[Path, float]:
    """experiment=compare_ladder at this learning rate by the real app, offline; run again, it continues
    (resume=auto)."""
    sweep_dir = OUT / f"ladder_compare_lr{lr}"
    cmd = [sys.executable, "-m", "vaelab.cli.train", "experiment=compare_ladder", f"seed={args.seed}", f"optim.lr={lr}",
           f"trainer.max_epochs={args.epochs}", "logger=csv", "extras.print_config=false",
           "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep_dir}", "resume=auto"]
    cmd += [f"data.subset={args.subset}"] if args.subset else []
    cmd += [f"eval.importance_samples={args.k}"] if args.k else []
    cmd += [f"loss.warmup_epochs={min(1, args.epochs)}"]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, WANDB_MODE="offline", VAELAB_DATA_DIR=str(DATA))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return sweep_dir, time.perf_counter() - t0


def samples(ckpt: Path, temperature: float) -> Path:
    """vaelab-sample's samples.png at this temperature, copied beside the JSON."""
    out = OUT / f"ladder_samples_t{temperature:g}"
    env = dict(os.environ, VAELAB_DATA_DIR=str(DATA))
    subprocess.run([sys.executable, "-m", "vaelab.cli.sample", f"ckpt_path={ckpt}", f"temperature={temperature}",
                    f"output_dir={out}", f"data_root={DATA}"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    png = OUT / f"ladder_samples_t{temperature:g}.png"
    shutil.copyfile(out / "samples.png", png)
    return png


def results_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(sweep_dir.glob("*/results.json")):
        r = json.loads(path.read_text())
        m = r["metrics"]
        layers = sorted(int(k.rsplit("_", 1)[1]) for k in m if k.startswith("test/kl_"))
        kls = [m[f"test/kl_{i}"] for i in layers] or [m["test/kl"]]
        rows.append({"model": r["model"], "test NLL": round(m["test/nll"], 2),
                     "K": r.get("importance_samples", ""),
                     "test ELBO": round(m["test/elbo"], 2), "params": f"{r['num_parameters']:,}",
                     "train s": round(r["train_time_s"]), "epochs": r["epochs"],
                     "active layers": f"{sum(k > ACTIVE_NATS for k in kls)}/{len(kls)}",
                     "KL per layer": " ".join(f"{k:.1f}" for k in kls),
                     "checkpoint": r["best_checkpoint"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--subset", type=int, default=None, help="cap every split (default: all the data)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--k", type=int, default=None, help="test/nll's K (default: the preset's, 100)")
    parser.add_argument("--lrs", default="5e-4,2e-3", help="learning rates, each a sweep of the three models")
    parser.add_argument("--blocks", type=int, default=8, help="counted blocks per side of the speed measurement")
    parser.add_argument("--block", type=int, default=20, help="steps per block")
    parser.add_argument("--skip-sweep", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--speed-overrides", nargs="*", default=[], help="app overrides for the speed measurement")
    args = parser.parse_args()
    figures: dict = {"budget": vars(args)}
    if not args.skip_speed:
        import train_throughput

        os.environ.setdefault("WANDB_MODE", "offline")
        r = train_throughput.measure(train_throughput.MODELS["ladder"], args.blocks, args.block, "cpu",
                                     ["compile=false", *args.speed_overrides])
        speed = {"vaelab images/s": round(r["vaelab"]), "bare loop images/s": round(r["same ops"]),
                 "ratio": round(r["vaelab"] / r["same ops"], 3)}
        print(f"\nmodel=ladder training, batch 100, {torch.get_num_threads()} threads: {speed['vaelab images/s']:,} "
              f"images/s in vaelab-train, {speed['bare loop images/s']:,} in a bare loop of the same model and Adam: "
              f"{speed['ratio']:.3f} (goal 0.95)", flush=True)
        figures["speed"] = speed
    if not args.skip_sweep:
        rows, walls = [], {}
        for lr in args.lrs.split(","):
            sweep_dir, walls[lr] = sweep(args, lr)
            rows += [{**r, "lr": lr} for r in results_rows(sweep_dir)]
        print(f"\ndynamically binarised Fashion-MNIST, {args.epochs} epochs of "
              f"{'all the' if not args.subset else f'{args.subset:,}'} training images each, seed {args.seed} "
              f"(nats; a layer is active above {ACTIVE_NATS} nats of KL):")
        table(rows, ["model", "lr", "test NLL", "K", "test ELBO", "params", "train s", "active layers",
                     "KL per layer"])
        ladder = min((r for r in rows if r["model"] == "ladder"), key=lambda r: r["test NLL"])
        grids = {f"{t:g}": str(samples(Path(ladder["checkpoint"]), t)) for t in (1.0, 0.7)}
        print(f"\nthe best ladder's (lr {ladder['lr']}) samples: " + ", ".join(f"T={t}: {p}" for t, p in grids.items()))
        other = min((r for r in rows if r["model"] != "ladder"), key=lambda r: r["test NLL"])
        print(f"the best ladder's test NLL {ladder['test NLL']:.2f} against the best other model's, {other['model']} at "
              f"lr {other['lr']}: {other['test NLL']:.2f}: {ladder['test NLL'] - other['test NLL']:+.2f} nats")
        figures.update(rows=rows, sweep_wall_s={lr: round(w) for lr, w in walls.items()}, samples=grids)
    save("ladder", figures)


if __name__ == "__main__":
    main()
