"""vaelab-eval ckpt_path=...: test NLL by importance sampling (any K), ELBO, bits/dim and active units
for any checkpoint, the model rebuilt from the config saved with it. Results go to a JSON file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from vaelab.checks import Arg, one_of, positive_int
from vaelab.cli.config import CONF_DIR, check_keys, refuse_unknown_keys, restore
from vaelab.devices import MATMUL_PRECISION, matmul_precision, pick_device
from vaelab.errors import run_or_explain
from vaelab.evaluation.metrics import IMPORTANCE_ARGS, evaluate
from vaelab.pixels import MEANING

# conf/eval.yaml's keys with rules of their own; the importance sampler's are its own rules
EVAL_ARGS: dict[str, Arg] = {
    "importance_samples": IMPORTANCE_ARGS["importance_samples"],
    "points_per_pass": IMPORTANCE_ARGS["points_per_pass"],
    "split": one_of("split", "test", "val"),
    "batch_size": positive_int("batch_size"),
    "subset": positive_int("subset", nullable=True),
    "matmul_precision": MATMUL_PRECISION,
}


def run(cfg: DictConfig) -> dict:
    check_keys(cfg, EVAL_ARGS.items())
    refuse_unknown_keys(cfg, "vaelab-eval", Path(CONF_DIR) / "eval.yaml")
    torch.manual_seed(cfg.seed)
    saved, datamodule, model = restore(cfg.ckpt_path, {"root": cfg.data_root, "subset": cfg.subset,
                                                          "eval_batch_size": cfg.batch_size})
    loader = datamodule.test_dataloader() if cfg.split == "test" else datamodule.val_dataloader()
    if cfg.split == "val":  # key the importance samples by image index on the validation set too
        loader.with_index = True
    device = pick_device(cfg.device)
    torch.set_float32_matmul_precision(matmul_precision(cfg.get("matmul_precision", "auto"), device.type))
    t0 = time.perf_counter()
    metrics = evaluate(model, loader, int(cfg.importance_samples), cfg.points_per_pass, device,
                       seed=int(cfg.importance_seed), pixels=saved["pixels"])
    results = {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        **saved, "split": cfg.split, "num_images": len(loader.dataset),
        "importance_samples": int(cfg.importance_samples), "seed": cfg.seed, "device": str(device),
        "time_s": round(time.perf_counter() - t0, 2), "metrics": metrics,
    }
    ckpt = Path(cfg.ckpt_path)
    out = Path(cfg.output) if cfg.output else ckpt.parent.parent / "eval" / (
        f"{ckpt.stem}_{cfg.split}_K{cfg.importance_samples}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\n{results['model']} / {results['prior']} on {results['data']} {cfg.split} "
          f"({results['num_images']} images, K={cfg.importance_samples}, {results['time_s']:.0f} s)")
    for key, value in metrics.items():
        print(f"  {key:<18} {value:.4f}")
    print(f"  pixels             {saved['pixels']}: {MEANING[saved['pixels']]}")
    print(f"  results            {out}")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_or_explain(run, cfg)


if __name__ == "__main__":
    main()
