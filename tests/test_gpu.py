"""The GPU fast path: whole-step CUDA graphs and steps per execution on a CUDA device. Skipped without CUDA
(CI has none); scripts/benchmarks/gpu_check.sh runs these on a GPU machine."""

import json

import pytest
import torch
from conftest import TINY, run_app

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU = [*TINY, "trainer=gpu", "data.subset=2000", "trainer.max_epochs=2", "logger=csv"]


def _train(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    proc = run_app(*GPU, f"hydra.run.dir={run_dir}", *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((run_dir / "results.json").read_text()), proc.stdout + proc.stderr


@pytest.mark.parametrize("model", ["model=vanilla", "model=deep prior=vamp prior.num_components=50",
                                   "model=deep posterior=iaf loss=iwae loss.samples=3",
                                   # the ladder, with the EMA and gradient skipping (masked inside the graph)
                                   "model=ladder trainer.ema_rate=0.9 trainer.gradient_skip_threshold=260"])
def test_a_replayed_graph_takes_the_steps_eager_steps_take(tmp_path, model):
    """Static binarisation leaves the reparameterisation noise as the only draw, and a replayed graph draws
    from the same generator positions as eager steps: the two runs must agree to float rounding."""
    common = [*model.split(), "data.binarize=static", "trainer.precision=32-true", "matmul_precision=highest",
              "trainer.steps_per_execution=5"]
    graph, log = _train(tmp_path, "graph", *common, "cuda_graphs=true")
    eager, _ = _train(tmp_path, "eager", *common, "cuda_graphs=false")
    assert "cuda graphs: captured 5 optimiser steps" in log
    assert graph["global_step"] == eager["global_step"] == 2 * 40  # 2000 images / 50, two epochs
    for key in ("train/loss", "val/loss", "test/nll"):
        assert graph["metrics"][key] == pytest.approx(eager["metrics"][key], rel=1e-4), key


def test_graphs_draw_fresh_noise_and_binarisation_every_step(tmp_path):
    """Dynamic binarisation inside the graph: training must still learn (a frozen draw would overfit one
    binarisation and a frozen noise would stop the KL from moving); max_steps cuts the last execution short."""
    res, log = _train(tmp_path, "dyn", "cuda_graphs=true", "trainer.steps_per_execution=10",
                      "trainer.max_epochs=3", "trainer.max_steps=115")
    assert res["global_step"] == 115 and "runs eagerly" in log  # 115 = 11 graphs of 10 + 5 eager steps
    rows = [r.split(",") for r in (tmp_path / "dyn" / "metrics.csv").read_text().splitlines()]
    head = rows[0]
    recon = [float(r[head.index("train_step/recon")]) for r in rows[1:] if r[head.index("train_step/recon")]]
    assert len(set(recon)) == len(recon) > 10  # every logged step saw different data and noise
    assert recon[-1] < recon[0] - 50  # and learned
    assert res["metrics"]["val/loss"] < recon[0]


def test_graphs_fall_back_to_eager_with_one_line_when_they_cannot_be_used(tmp_path):
    res, log = _train(tmp_path, "host", "data.device=cpu", "trainer.steps_per_execution=auto")
    assert "cuda graphs: off (the training images are in host memory" in log
    assert res["global_step"] == 80
    run_dir = tmp_path / "forced"
    proc = run_app(*GPU, f"hydra.run.dir={run_dir}", "data.device=cpu", "cuda_graphs=true")
    assert proc.returncode == 1 and "error: cuda_graphs=true, but the training images are in host memory" in proc.stderr
