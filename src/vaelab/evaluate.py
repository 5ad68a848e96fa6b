"""vaelab-eval ckpt_path=...: test NLL by importance sampling (any K), ELBO, bits/dim and active units
for any checkpoint, the model rebuilt from the config saved with it. Results go to a JSON file."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from vaelab.engine import matmul_precision
from vaelab.errors import ConfigError, run_or_explain
from vaelab.metrics import ActiveUnits, ElboMeans, ImportanceSampledNLL, bits_per_dim, importance_log_weights
from vaelab.runs import refuse_unknown_keys, restore
from vaelab.train import CONF_DIR

log = logging.getLogger("vaelab")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.no_grad()
def evaluate(model, loader, importance_samples: int, points_per_pass: int | str, device: torch.device,
             seed: int = 0, progress: bool = True) -> dict[str, float]:
    """Every test metric over a loader, as sums that a DDP run would reduce the same way."""
    nll, means = ImportanceSampledNLL().to(device), ElboMeans(len(model.latent_dims)).to(device)
    active = [ActiveUnits(d).to(device) for d in model.latent_dims]
    model = model.to(device)
    for batch in tqdm(loader, desc=f"test NLL, K={importance_samples}", disable=not progress, unit="batch"):
        x, index = batch if isinstance(batch, (tuple, list)) else (batch, None)
        x = x.to(device)
        terms = model.elbo_terms(x)
        means.update(terms.recon, terms.kl_layers)
        for metric, mu in zip(active, model.posterior_means(x)):
            metric.update(mu)
        nll.update(importance_log_weights(model, x, importance_samples, points_per_pass, index=index, seed=seed))
    value = float(nll.compute())
    out = {f"test/{k}": float(v) for k, v in means.compute().items()}
    out.update({"test/nll": value, "test/nll_mc_se": float(nll.standard_error()), "test/bpd": float(bits_per_dim(value, model.num_pixels)),
                "test/active_units": float(sum(int(a.compute()) for a in active))})
    return out


def run(cfg: DictConfig) -> dict:
    if cfg.importance_samples is None or int(cfg.importance_samples) <= 0:
        raise ConfigError(f"importance_samples must be a positive integer, got {cfg.importance_samples}")
    if cfg.split not in ("test", "val"):
        raise ConfigError(f"split must be test or val, got {cfg.split!r}")
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
                       seed=int(cfg.importance_seed))
    results = {
        "checkpoint": str(Path(cfg.ckpt_path).resolve()),
        "model": saved.model.name, "prior": saved.prior.name, "likelihood": saved.likelihood.name,
        "data": saved.data.name, "split": cfg.split, "num_images": len(loader.dataset),
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
    print(f"  results            {out}")
    return results


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_or_explain(run, cfg)


if __name__ == "__main__":
    main()
