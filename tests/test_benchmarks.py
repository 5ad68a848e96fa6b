"""Each benchmark runs from a clone with one command and writes its JSON (tiny sizes here: the figures
themselves come from full runs, never from tests)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, app_env

SMALL = {
    "train_throughput": ["--models", "vanilla", "iaf", "--blocks", "2", "--block", "10"],
    "eval_throughput": ["--k", "20", "--images", "4"],
    "data_throughput": ["--batches", "5"],
    "scaling": ["--steps", "1"],
    "sweep_throughput": ["--ns", "1,2", "--steps", "2", "--no-app"],
    "objectives": ["--seeds", "1", "--subset", "200", "--epochs", "1", "--k", "4", "--test-images", "500",
                   "--samples", "2", "--steps", "2"],
    "ladder": ["--epochs", "1", "--subset", "300", "--k", "2", "--lrs", "5e-4", "--blocks", "2", "--block", "10",
               "--speed-overrides", "model.width=8", "model.cell_width=4", "model.latent_channels=2"],
}


@pytest.mark.parametrize("name", list(SMALL))
def test_benchmark_runs_and_writes_its_figures(fashion_mnist, tmp_path, name):
    env = dict(app_env(), VAELAB_BENCH_DIR=str(tmp_path), VAELAB_DATA_DIR=str(fashion_mnist))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmarks" / f"{name}.py"), *SMALL[name]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / f"{name}.json").read_text())
    assert figures["benchmark"] == name and figures["environment"]["torch"]
    rows = figures.get("rows") or figures.get("results")
    assert rows, figures
    if name == "sweep_throughput":  # issue 31's schema: one row per (kind, device, n)
        assert [(r["kind"], r["n"]) for r in rows] == [("bare", 1), ("bare", 2)]
        for r in rows:
            assert r["stacked_img_s"] > 0 and r["sequential_img_s"] > 0 and r["peak_rss_mb"] > 0 and r["device"]
            assert r["host_syncs_per_step"] == 0  # the stacked step never waits for the host
        assert rows[0]["ops_per_step"] == rows[1]["ops_per_step"] > 0  # flat in N
    if name == "ladder":  # the three families trained at one budget, the ladder timed and sampled at two temperatures
        assert sorted(r["model"] for r in rows) == ["deep", "ladder", "vanilla"]
        ladder = next(r for r in rows if r["model"] == "ladder")
        assert ladder["active layers"].endswith("/7") and len(ladder["KL per layer"].split()) == 7
        assert figures["speed"]["vaelab images/s"] > 0 and figures["speed"]["ratio"] > 0
        assert set(figures["samples"]) == {"1", "0.7"} and all(Path(p).is_file() for p in figures["samples"].values())
    if name == "objectives":  # the ELBO and the IWAE bound trained by the app, and their steps timed
        assert set(rows) == {"elbo", "iwae k=2"} and all(r["seeds"] == 1 for r in rows.values())
        assert figures["images_per_s"]["iwae k=2"] > 0 and figures["elbo_without_grad_norm"] > 0
    if name == "train_throughput":
        (flow,) = figures["flow_cost"]  # posterior=iaf against the Gaussian, measured in the same run
        assert flow["flow"] == "iaf" and flow["step time ratio"] > 0
        assert [r["model"] for r in rows] == ["vanilla", "iaf"]
        assert flow["step time ratio"] == round(rows[0]["vaelab images/s"] / rows[1]["vaelab images/s"], 3)
        row = rows[0]
        assert row["vaelab images/s"] > 0 and row["hand-written images/s"] > 0 and row["same-ops images/s"] > 0
        assert 0 < row["ratio vs same ops"] < 10
        # Lightning's floor, from its own run: the ratio and vaelab's cost over it are both real numbers
        assert 0 < row["lightning floor vs same ops"] < 10 and 0 < row["vaelab vs floor"] < 10
        expected = row["ratio vs same ops"] / row["lightning floor vs same ops"]
        assert abs(row["vaelab vs floor"] - expected) < 0.01 * expected + 0.002  # the rounded figures agree
