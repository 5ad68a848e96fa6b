"""Training throughput: `vaelab-train` against a bare hand-written PyTorch loop of the same model, data,
batch size and precision, in this process, measured in alternating blocks.

    python scripts/benchmarks/train_throughput.py [--models vanilla vamp deep] [--blocks 8] [--block 50] [--compile]

vaelab: the real app (`vaelab.cli.train.train` on the composed config: Lightning's Trainer, its loop and hooks,
vaelab's module and data module, callbacks, and the CSV and offline W&B loggers).
bare: a copy of the same model (same initial weights), its own Adam, the same in-memory uint8 images, and a
loop of index, binarise, elbo_terms, zero_grad, backward, step. Two bare loops take turns:
  - "hand-written": torch.bernoulli and torch.optim.Adam(params, lr), as a researcher's own script does;
  - "same ops": vaelab's own binarisation and Adam settings (fused), so vaelab/bare is the cost of the
    framework alone (Lightning's loop, vaelab's module, callbacks and loggers).

The two are measured in alternating blocks inside one run: after every `--block` vaelab steps, a benchmark
callback runs `--block` steps of each bare loop, and each side's clock covers only its own steps (a vaelab
block runs from the end of the last bare block to the end of its `--block`-th training step: data fetch,
hooks, step, logging, all of it). A slow moment of this shared machine then hits both sides alike. The first
block of each side is warm-up and not counted. Ratio = vaelab images/s / bare images/s; the goal is 0.95.
A second run puts Lightning's own floor beside it: the same model, objective and Adam in a LightningModule that
does nothing else, in a Trainer with no loggers, callbacks, progress bar or checkpoints, timed the same way
against its own same-ops loop. Its ratio is what Lightning's Trainer loop alone costs; vaelab / floor (each
normalised by its own run's same-ops loop, so a drift of the machine between the two runs cancels out) is
what vaelab adds on top of it.
--compile repeats each measurement with compile=true (torch.compile of the training objective) and reports
its gain: (compiled vaelab / its run's same-ops loop) / (eager vaelab / its run's same-ops loop), so a drift of
the machine between the two runs cancels out.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import ROOT, save, sync, table

MODELS = {"vanilla": ["model=vanilla", "prior=standard"], "vamp": ["model=vanilla", "prior=vamp"],
          "deep": ["model=deep", "prior=standard"], "deep_vamp": ["model=deep", "prior=vamp"],
          "mog": ["model=vanilla", "prior=mog"], "iaf": ["model=vanilla", "prior=standard", "posterior=iaf"],
          "vamp_iaf": ["model=vanilla", "prior=vamp", "posterior=iaf"],
          "deep_iaf": ["model=deep", "prior=standard", "posterior=iaf"],
          "ladder": ["model=ladder", "prior=standard"], "ladder_gpu": ["model=ladder_gpu", "prior=standard"]}
# the flow's cost: each IAF configuration against the same model and prior with the Gaussian posterior
FLOW_PAIRS = {"iaf": "vanilla", "vamp_iaf": "vamp", "deep_iaf": "deep"}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


class BareLoop:
    """The hand-written loop: a copy of the model, its own Adam, batches cut from the uint8 images."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, batch: int, draw, opt) -> None:
        self.model, self.images, self.batch, self.draw, self.opt = model, images, batch, draw, opt
        self.order = torch.randperm(images.shape[0])
        self.i = 0

    def run(self, steps: int) -> tuple[float, int]:
        """(seconds, steps) for `steps` training steps."""
        dev = next(self.model.parameters()).device
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            start = (self.i * self.batch) % (self.images.shape[0] - self.batch)
            self.i += 1
            x = self.draw(self.images[self.order[start : start + self.batch]].float().div_(255.0)).to(dev)
            loss = self.model.elbo_terms(x).loss.mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        sync(dev)
        return time.perf_counter() - t0, steps


class GraphLoop:
    """The ceiling on CUDA: the whole step (batch gather from a device permutation, dynamic binarisation,
    forward, backward, fused capturable Adam) for `steps` optimiser steps captured as ONE CUDA graph and
    replayed, as in PyTorch's whole-network capture example. Nothing runs between replays but the replay."""

    def __init__(self, model: torch.nn.Module, images: torch.Tensor, batch: int, lr: float, steps: int = 10) -> None:
        dev = next(model.parameters()).device
        self.model, self.batch, self.steps = model, batch, steps
        self.images = images.to(dev)
        self.perm = torch.randperm(self.images.shape[0], device=dev)
        self.arange = torch.arange(batch, device=dev)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)
        self.opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=True)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up: Adam's state, cuBLAS handles
                self._steps()
        torch.cuda.current_stream().wait_stream(stream)
        self.opt.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._steps()

    def _steps(self) -> None:
        n = self.images.shape[0]
        for _ in range(self.steps):
            idx = self.perm[(self.pos * self.batch + self.arange) % n]
            x = self.images[idx].float().div_(255.0)
            x = torch.rand_like(x).lt_(x).float()
            loss = self.model.elbo_terms(x).loss.mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.pos += 1

    def run(self, steps: int) -> tuple[float, int]:
        """(seconds, steps) for about `steps` optimiser steps: whole replays of `self.steps` steps."""
        replays = max(1, round(steps / self.steps))
        sync(self.images.device)
        t0 = time.perf_counter()
        for _ in range(replays):
            self.graph.replay()
        sync(self.images.device)
        return time.perf_counter() - t0, replays * self.steps


class Alternate(L.Callback):
    """Runs inside `vaelab-train`: times blocks of the app's own steps, and after each block runs the bare
    loops for as many steps, timed apart."""

    def __init__(self, block: int = 50) -> None:
        self.block = block
        self.app: list[tuple[float, int]] = []  # (seconds, optimiser steps) of each block
        self.bare: dict[str, list[tuple[float, int]]] = {}
        self._mark: float | None = None
        self._steps = 0

    latest: Alternate | None = None  # the instance the app built, read back after the run

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from vaelab.data import bernoulli_draw
        from vaelab.training.optim import build_optimizer

        Alternate.latest = self
        images = trainer.datamodule.train_set.images
        lr, batch = pl_module.recipe.optimizer.keywords["lr"], trainer.datamodule.batch_size
        same, plain = copy.deepcopy(pl_module.model), copy.deepcopy(pl_module.model)
        for m in (same, plain):  # with compile=true the app's model holds a compiled elbo_terms bound to itself
            vars(m).pop("elbo_terms", None)
        self.loops = {  # both start from the app's initial weights
            "same ops": BareLoop(same, images, batch, bernoulli_draw,
                                 build_optimizer(pl_module.recipe.optimizer, list(same.parameters()))),
            "hand-written": BareLoop(plain, images, batch, torch.bernoulli, torch.optim.Adam(plain.parameters(), lr=lr)),
        }
        if pl_module.device.type == "cuda":  # the ceiling: the whole step as one replayed CUDA graph
            graph = copy.deepcopy(pl_module.model)
            vars(graph).pop("elbo_terms", None)
            self.loops["graph ceiling"] = GraphLoop(graph, images, batch, lr)
        self.bare = {name: [] for name in self.loops}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from vaelab.data.batches import batch_counts, execution_plan_of

        self._steps += batch_counts(batch, execution_plan_of(trainer))[0]  # optimiser steps: a batch may be an execution of several
        if self._steps < self.block:
            return
        sync(pl_module.device)
        now = time.perf_counter()
        if self._mark is not None:
            self.app.append((now - self._mark, self._steps))
        names = list(self.loops)
        if len(self.app) % 2:  # the bare loops swap places every block
            names.reverse()
        for name in names:  # as many steps as the app just took (a block ends at an execution's end)
            self.bare[name].append(self.loops[name].run(self._steps))
        self._steps = 0
        self._mark = time.perf_counter()

    def rates(self, batch: int) -> dict[str, float]:
        """Images/s of each side over its blocks after the first (warm-up)."""
        def rate(blocks: list[tuple[float, int]]) -> float:
            counted = blocks[1:]
            return sum(steps for _, steps in counted) * batch / sum(seconds for seconds, _ in counted)

        n = min(len(self.app), *(len(t) for t in self.bare.values()))
        return {"vaelab": rate(self.app[:n]), **{k: rate(v[:n]) for k, v in self.bare.items()}}


def _config(model_overrides: list[str], blocks: int, block: int, device: str, extra: list[str]):
    out = tempfile.mkdtemp(prefix="vaelab-bench-")
    accel = "gpu" if device == "cuda" else "cpu"
    steps = (blocks + 1) * block  # one more block than counted: the first is warm-up
    return compose([*model_overrides, f"paths.output_dir={out}", f"trainer.max_steps={steps}", "test=false",
                    "trainer.limit_val_batches=0", f"trainer.accelerator={accel}",
                    "+callbacks.alternate._target_=train_throughput.Alternate", f"+callbacks.alternate.block={block}",
                    *extra])


def measure(model_overrides: list[str], blocks: int, block: int, device: str, extra: list[str]) -> dict:
    """The real app, `vaelab.cli.train.train`, against the bare loops."""
    from vaelab.cli.train import train

    cfg = _config(model_overrides, blocks, block, device, extra)
    train(cfg)
    import train_throughput  # the module Hydra built the callback from (this file, also when run as a script)

    return train_throughput.Alternate.latest.rates(cfg.data.batch_size)


class FloorModule(L.LightningModule):
    """Lightning's floor: the model's -ELBO and vaelab's Adam in a LightningModule, and nothing else."""

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, fused: bool) -> None:
        from vaelab.training import TrainingRecipe
        from vaelab.training.optim import optimizer_factory

        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        # a recipe of the optimiser alone, as conf/optim/adam.yaml builds it (Alternate reads recipe.optimizer)
        self.recipe = TrainingRecipe(optimizer=optimizer_factory("adam", lr, weight_decay, fused))

    def training_step(self, x: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model.elbo_terms(x).loss.mean()

    def configure_optimizers(self):
        from vaelab.training.optim import build_optimizer

        return build_optimizer(self.recipe.optimizer, list(self.parameters()))


def measure_floor(model_overrides: list[str], blocks: int, block: int, device: str, extra: list[str]) -> dict:
    """FloorModule in a bare Trainer (same data module, model config, precision and steps) against the bare loops."""
    from vaelab.cli.config import build, build_model

    cfg = _config(model_overrides, blocks, block, device, extra)
    L.seed_everything(cfg.seed)
    datamodule = build(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = build_model(cfg, datamodule.image_shape)
    alternate = Alternate(block)
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision,
                        max_steps=cfg.trainer.max_steps, limit_val_batches=0, logger=False, callbacks=[alternate],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(FloorModule(model, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.fused), datamodule=datamodule)
    return alternate.rates(cfg.data.batch_size)


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")  # W&B logs as in any run here, without the network
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vanilla", "vamp", "deep"], choices=list(MODELS))
    parser.add_argument("--blocks", type=int, default=8, help="counted blocks per side")
    parser.add_argument("--block", type=int, default=50, help="steps per block")
    parser.add_argument("--compile", action="store_true", help="also measure compile=true and report its gain")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-floor", action="store_true", help="skip the Lightning-floor run")
    parser.add_argument("--tag", default="", help="suffix of the JSON file's name (several configurations)")
    parser.add_argument("extra", nargs="*", help="more app overrides, e.g. trainer.precision=bf16-mixed")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        r = measure(MODELS[name], args.blocks, args.block, args.device, [*args.extra, "compile=false"])
        row = {"model": name, "vaelab images/s": round(r["vaelab"]),
               "hand-written images/s": round(r["hand-written"]),
               "ratio vs hand-written": round(r["vaelab"] / r["hand-written"], 3),
               "same-ops images/s": round(r["same ops"]),
               "ratio vs same ops": round(r["vaelab"] / r["same ops"], 3)}
        if "graph ceiling" in r:
            row["graph ceiling images/s"] = round(r["graph ceiling"])
            row["ratio vs graph ceiling"] = round(r["vaelab"] / r["graph ceiling"], 3)
        if not args.no_floor:
            f = measure_floor(MODELS[name], args.blocks, args.block, args.device, args.extra)
            row["lightning floor vs same ops"] = round(f["vaelab"] / f["same ops"], 3)
            row["vaelab vs floor"] = round((r["vaelab"] / r["same ops"]) / (f["vaelab"] / f["same ops"]), 3)
        if args.compile:  # the same measurement with compile=true; the gain is judged against each run's bare loop
            c = measure(MODELS[name], args.blocks, args.block, args.device, [*args.extra, "compile=true"])
            row["compiled ratio vs same ops"] = round(c["vaelab"] / c["same ops"], 3)
            row["compile gain"] = round((c["vaelab"] / c["same ops"]) / (r["vaelab"] / r["same ops"]), 3)
        rows.append(row)
        print(rows[-1], flush=True)
    print()
    table(rows, list(rows[0]))
    speed = {r["model"]: r["vaelab images/s"] for r in rows}
    flows = [{"flow": f, "gaussian": g, "step time ratio": round(speed[g] / speed[f], 3)}
             for f, g in FLOW_PAIRS.items() if f in speed and g in speed]
    for row in flows:
        print(f"posterior=iaf: {row['flow']} takes {row['step time ratio']:.2f}x the step time of {row['gaussian']}")
    save("train_throughput" + (f"_{args.tag}" if args.tag else ""), {"blocks": args.blocks, "block": args.block, "device": args.device,
                              "extra_overrides": args.extra, "rows": rows, "flow_cost": flows})


if __name__ == "__main__":
    main()
