"""vaelab-sample ckpt_path=...: prior samples, reconstructions, latent interpolations and traversals (and a
VampPrior's pseudo-inputs) of any checkpoint, as PNG grids; with sampler=gmm also samples from a Gaussian mixture
fitted to the training set's posterior means (evaluation/samplers.py), and the test codes' log-likelihood under it."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torchvision.utils import save_image

from vaelab.checks import Arg, one_of, positive
from vaelab.cli.config import CONF_DIR, check_keys, refuse_unknown_keys, restore
from vaelab.devices import pick_device
from vaelab.errors import ConfigError, run_or_explain
from vaelab.evaluation.grids import all_grids, grid_note
from vaelab.evaluation.samplers import draw_gmm

# vaelab-sample's counts, with upper bounds that keep a grid in memory (4,096 images of 32x32x3 floats: 50 MB)
ARGS = [Arg("num_samples", "int", 1, high=4096), Arg("num_reconstructions", "int", 1, high=1024),
        Arg("steps", "int", 2, high=64), Arg("seed", "int", 0), one_of("sampler", "prior", "gmm"),
        Arg("gmm_components", "int", 1, high=1000), positive("temperature")]


def run(cfg: DictConfig) -> dict[str, Path]:
    refuse_unknown_keys(cfg, "vaelab-sample", Path(CONF_DIR) / "sample.yaml")
    check_keys(cfg, [(arg.key, arg) for arg in ARGS])
    torch.manual_seed(cfg.seed)
    _, datamodule, model = restore(cfg.ckpt_path, {"root": cfg.data_root})
    device = pick_device(cfg.device)
    model = model.to(device)
    x = datamodule.test_set.__getitems__(list(range(cfg.num_reconstructions))).to(device)
    grids = all_grids(model, x, num_samples=cfg.num_samples, steps=cfg.steps, temperature=cfg.temperature)
    ckpt = Path(cfg.ckpt_path)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else ckpt.parent.parent / "samples" / ckpt.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, grid in grids.items():
        paths[name] = out_dir / f"{name}.png"
        save_image(grid, paths[name])
        note = grid_note(name, model, cfg.num_samples, cfg.temperature)
        print(f"  {name:<16} {paths[name]}" + (f" ({note})" if note else ""))
    if cfg.sampler == "gmm":
        paths.update(gmm_samples(cfg, model, datamodule, out_dir))
    return paths


def gmm_samples(cfg: DictConfig, model, datamodule, out_dir: Path) -> dict[str, Path]:
    """sampler=gmm: gmm_samples.png and gmm.json (evaluation/samplers.py: draw_gmm)."""
    if len(datamodule.train_set) < cfg.gmm_components:
        raise ConfigError(f"gmm_components={cfg.gmm_components} is more than the {len(datamodule.train_set)} "
                          "training images; lower gmm_components")
    paths, ll = draw_gmm(model, datamodule, out_dir, cfg.gmm_components, cfg.num_samples, cfg.seed)
    print(f"  {'gmm_samples':<16} {paths['gmm_samples']}")
    print(f"  {'gmm':<16} {paths['gmm']}: test codes' log-likelihood {ll['gmm']:.2f} nats per code under the "
          f"mixture, {ll['prior']:.2f} under the prior")
    return paths


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    run_or_explain(run, cfg)


if __name__ == "__main__":
    main()
