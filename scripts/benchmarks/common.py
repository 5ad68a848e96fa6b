"""Shared helpers for the benchmarks: the environment they ran in, and where their JSON goes."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(os.environ.get("VAELAB_BENCH_DIR", ROOT / "outputs" / "benchmarks"))
DATA = Path(os.environ.get("VAELAB_DATA_DIR", ROOT / "data"))  # as conf/paths: the data root


def environment() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"python": sys.version.split()[0], "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "device": device, "cuda": torch.cuda.is_available(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def save(name: str, figures: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(), **figures}, indent=2))
    print(f"\nwrote {path}")
    return path


def table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))


def run_budget_sweep(args, sweep_dir: Path, *overrides: str) -> float:
    """A sweep of the real app at a benchmark's budget (args: seeds, subset, epochs, k, test_images), offline, into
    sweep_dir, with `overrides`; its wall time in seconds. Run again, it continues its sweep (resume=auto): finished
    jobs are kept, stopped ones continue."""
    import subprocess

    cmd = [sys.executable, "-m", "vaelab.cli.train", "-m", f"seed={args.seeds}", f"data.subset={args.subset}",
           f"trainer.max_epochs={args.epochs}", f"eval.importance_samples={args.k}",
           f"trainer.limit_test_batches={args.test_images // 500}", "logger=csv", "extras.print_config=false",
           "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep_dir}", *overrides, "resume=auto"]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, WANDB_MODE="offline", VAELAB_DATA_DIR=str(DATA))
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
