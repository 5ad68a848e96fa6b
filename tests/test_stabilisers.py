"""The stabilisers, for every model: gradient skipping (counted and logged), an EMA of the weights (used for
validation, test, grids and the checkpoint's evaluation copy), and sampling temperature; one line for each bad value."""

import csv

import pytest
import torch
from conftest import TINY, run_app

from vaelab.models import VAE
from vaelab.training.stabilisers import WeightAverage, apply_unless_skipped, masked_step

LADDER = ["model=ladder", "model.width=8", "model.cell_width=4", "model.latent_channels=2",
          "model.encoder_blocks=[1,1,1]"]


def _steps(masked: bool, pattern: list[bool]):
    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent_dim=3, hidden_dim=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    average = WeightAverage(model, 0.9)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    for skip in pattern:
        x = torch.rand(8, 1, 8, 8, generator=gen).bernoulli(generator=gen)
        noise = torch.randn(8, 3, generator=gen)
        opt.zero_grad()
        model(x, noise).loss.mean().backward()

        def step():
            opt.step()
            average.update()

        (masked_step if masked else apply_unless_skipped)(step, torch.tensor(skip), opt, params, average)
    state = [t.clone() for p in params for t in opt.state.get(p, {}).values()]
    return [p.detach().clone() for p in params], [a.clone() for a, _ in average.pairs], state


def test_a_skipped_update_touches_nothing_and_the_masked_form_is_the_same():
    """The CUDA graph's masked skip (no host read) against the eager one (an if), including a skip at the very first
    step (before Adam has any state): the same weights, Adam state and average, bit for bit; and skipping changes
    them against never skipping."""
    pattern = [True, False, True, True, False, False]
    eager, masked = _steps(False, pattern), _steps(True, pattern)
    for a, b in zip(eager, masked):
        assert len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    never = _steps(False, [False] * 6)
    assert not all(torch.equal(x, y) for x, y in zip(eager[0], never[0]))
    assert int(eager[2][0]) == 3  # Adam's step count: the three updates applied


def test_the_average_is_the_recursion_of_the_weights():
    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent_dim=3, hidden_dim=16)
    average = WeightAverage(model, 0.8)
    want = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        model(torch.rand(4, 1, 8, 8).bernoulli()).loss.mean().backward()
        opt.step()
        average.update()
        want = [0.8 * w + 0.2 * p.detach() for w, p in zip(want, model.parameters())]
    for w, a in zip(want, average.model.parameters()):
        assert torch.allclose(w, a, atol=1e-6) and not a.requires_grad


def _csv(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_skipped_steps_are_counted_per_epoch(train_run, tmp_path):
    """A threshold below every gradient norm skips every update (Adam never steps: the checkpoint
    holds no optimiser state); one above them all skips none. train/skipped_steps says so, epoch by epoch."""
    run_dir, results, _ = train_run("logger=csv", "trainer.gradient_skip_threshold=1e-6", "trainer.max_epochs=2")
    epochs = [r for r in _csv(run_dir) if r.get("train/skipped_steps")]
    assert [float(r["train/skipped_steps"]) for r in epochs] == [8.0, 8.0]  # 400 images of 50: 8 steps an epoch
    assert all(float(r["train/grad_norm"]) > 1e-6 for r in epochs)
    from vaelab.training.checkpoints import load_checkpoint

    assert load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["optimizer_states"][0]["state"] == {}  # no update
    run_dir = tmp_path / "none_skipped"
    proc = run_app(*TINY, f"hydra.run.dir={run_dir}", "logger=csv", "trainer.gradient_skip_threshold=1e9",
                   "trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [float(r["train/skipped_steps"]) for r in _csv(run_dir) if r.get("train/skipped_steps")] == [0.0]


def test_the_average_is_what_is_evaluated_and_what_checkpoints_give_the_tools(train_run, tmp_path, fashion_mnist):
    """With trainer.ema_rate the checkpoint keeps both weights; the test phase, vaelab-eval and load_model use the
    average: vaelab-eval on the run's checkpoint gives the run's own test/nll, which the live weights would not."""
    import json

    from vaelab.training.checkpoints import load_checkpoint, load_model

    run_dir, results, _ = train_run("logger=csv", *LADDER, "trainer.ema_rate=0.9", "trainer.max_epochs=1",
                                    "data.test_subset=100")
    ckpt_path = run_dir / "checkpoints" / "last.ckpt"
    state = load_checkpoint(ckpt_path)["state_dict"]
    live = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    ema = {k[len("ema_model."):]: v for k, v in state.items() if k.startswith("ema_model.")}
    assert live.keys() == ema.keys() and any(not torch.equal(live[k], ema[k]) for k in live)
    model = load_model(ckpt_path)
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())
    figures = {}
    for name, path in (("ema", ckpt_path), ("live", tmp_path / "live.ckpt")):
        if name == "live":  # the same checkpoint without the average: the tools then take the live weights
            ckpt = load_checkpoint(ckpt_path)
            ckpt["state_dict"] = {k: v for k, v in state.items() if not k.startswith("ema_model.")}
            torch.save(ckpt, path)
        out = tmp_path / f"{name}.json"
        proc = run_app(f"ckpt_path={path}", f"output={out}", f"data_root={fashion_mnist}", "importance_samples=32",
                       module="vaelab.cli.eval")
        assert proc.returncode == 0, proc.stderr[-3000:]
        figures[name] = json.loads(out.read_text())["metrics"]
    # test/nll's importance samples are keyed by image (common random numbers): vaelab-eval reproduces it exactly
    assert figures["ema"]["test/nll"] == pytest.approx(results["metrics"]["test/nll"], rel=1e-6)
    assert figures["live"]["test/nll"] != pytest.approx(results["metrics"]["test/nll"], rel=1e-3)


@pytest.mark.parametrize("override,expected", [
    ("trainer.ema_rate=1.0", "error: trainer.ema_rate=1.0 must be in [0, 1): "),
    ("trainer.ema_rate=-0.1", "error: trainer.ema_rate must be at least 0.0, got -0.1"),
    ("trainer.gradient_skip_threshold=0", "error: trainer.gradient_skip_threshold must be greater than 0, got 0"),
    ("callbacks.image_grids.temperature=0", "error: callbacks.image_grids.temperature must be greater than 0, got 0"),
    ("model.latent_channels=0", "error: model.latent_channels must be greater than 0, got 0"),
    ("model.resolutions=[14,7,3]", "error: model.resolutions=[14, 7, 3] cannot hold these 28x28 images"),
])
def test_a_bad_stabiliser_or_ladder_value_is_one_line_before_anything_is_written(tmp_path, fashion_mnist, override,
                                                                                 expected):
    proc = run_app(*TINY, *LADDER, f"hydra.run.dir={tmp_path / 'run'}", override)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(expected), proc.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def _tiles(png) -> torch.Tensor:
    """The 64 images of an 8x8 grid PNG (28x28, 2-pixel padding), [64, 28, 28] in [0, 1]."""
    import numpy as np
    from PIL import Image

    grid = torch.from_numpy(np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255)
    return torch.stack([grid[2 + 30 * r: 30 * r + 30, 2 + 30 * c: 30 * c + 30] for r in range(8) for c in range(8)])


def test_a_lower_temperature_gives_samples_nearer_each_other_in_the_png(train_run, tmp_path, fashion_mnist):
    """vaelab-sample temperature=: samples.png at 0.3 against 1.0, read back by pixels: images, not a blank grid, and
    at the lower temperature nearer the prior's mode (less spread over the 64 samples, pixel by pixel)."""
    run_dir, _, proc = train_run("logger=csv", "trainer.max_epochs=3", "data.subset=3000", "loss.warmup_epochs=0",
                                 "trainer.enable_progress_bar=true")
    # the test phase says how long it will take after its first batch, and what sets that
    expected = [ln for ln in proc.stdout.splitlines() if ln.startswith("test: expected ")]
    assert len(expected) == 1 and expected[0].endswith(
        " for 3,000 images at K=32 (eval.importance_samples and data.test_subset set its cost)"), expected
    spread = {}
    for t in ("1.0", "0.3"):
        out = tmp_path / t
        proc = run_app(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"temperature={t}", f"output_dir={out}",
                       f"data_root={fashion_mnist}", module="vaelab.cli.sample")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("temperature 0.3" in proc.stdout) == (t == "0.3")  # the samples line says its temperature
        tiles = _tiles(out / "samples.png")
        assert 0.05 < tiles.mean() < 0.95 and tiles.std() > 0.1  # images, not a blank or a flat grid
        spread[t] = tiles.std(0).mean().item()
    assert spread["0.3"] < 0.8 * spread["1.0"], spread
    proc = run_app(f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "temperature=0", f"output_dir={tmp_path}",
                   module="vaelab.cli.sample")
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "error: temperature must be greater than 0, got 0"], proc.stderr[-2000:]
