"""The real app, `vaelab-train` (vaelab.cli.train), on a real Fashion-MNIST subset with tiny overrides."""

import csv
import json
import math

import pytest
import wandb_files
from conftest import TINY, run_app


def test_train_writes_results_grids_csv_and_an_offline_wandb_run(train_run):
    run_dir, results, proc = train_run()
    m = results["metrics"]
    for key in ("test/nll", "test/elbo", "test/recon", "test/kl", "test/bpd", "test/active_units", "val/loss"):
        assert math.isfinite(m[key]), key
    assert m["test/nll"] <= -m["test/elbo"]  # the IWAE bound is at least as tight as the ELBO
    assert m["test/kl"] > 0 and m["test/recon"] > 0
    assert abs(m["test/bpd"] - m["test/nll"] / (784 * math.log(2))) < 1e-4
    assert results["epochs"] == 2 and results["model"] == "vanilla" and results["prior"] == "standard"
    assert results["likelihood"] == "bernoulli" and results["train_time_s"] > 0

    # run directory layout
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and results["best_checkpoint"].endswith(".ckpt")
    for name in ("samples_epoch_001.png", "samples_epoch_002.png", "reconstructions_final.png"):
        assert (run_dir / "samples" / name).stat().st_size > 1000, name
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    val_elbo = [float(r["val/elbo"]) for r in rows if r.get("val/elbo")]
    assert len(val_elbo) == 2 and all(math.isfinite(v) for v in val_elbo)

    # W&B, offline, read back from the files it wrote
    wb = results["wandb"]
    assert wb["mode"] == "offline" and f"wandb sync {wb['dir']}" in proc.stdout
    history = wandb_files.history(wb["dir"])
    train_elbo = [row["train/elbo"] for row in history if "train/elbo" in row]
    assert len(train_elbo) == 2 and train_elbo[-1] > train_elbo[0]  # two epochs, and it learned
    assert any("train_step/elbo" in row for row in history)
    image_rows = [row for row in history if "images/samples/_type" in row]
    assert image_rows and image_rows[0]["images/samples/_type"] == "images/separated"
    from pathlib import Path

    assert list((Path(wb["dir"]) / "files" / "media" / "images").glob("images/samples_*.png"))
    config = wandb_files.config(wb["dir"])
    assert config["model"]["latent_dim"] == 40 and "closed-form" in config["vaelab"]["kl_estimator"]
    # as dashboards expect: epoch metrics against the epoch, the summary keeps the best val/loss, a results table
    defined = {d["name"]: d for d in wandb_files.metric_definitions(wb["dir"])}
    assert defined["val/*"]["step_metric"] == "epoch" and defined["val/loss"]["summary"] == ["min"]
    best = min(float(r["val/loss"]) for r in rows if r.get("val/loss"))
    assert wandb_files.summary(wb["dir"])["val/loss"] == {"min": pytest.approx(best, rel=1e-6)}
    results_table = wandb_files.table(wb["dir"], "results")
    row = dict(zip(results_table["columns"], results_table["data"][0]))
    assert row["model"] == "vanilla" and row["test/nll"] == pytest.approx(results["metrics"]["test/nll"])
    # the resolved config, printed as a tree at start
    assert "config" in proc.stdout and "├── data" in proc.stdout and "name: fashion_mnist" in proc.stdout


def test_gaussian_likelihood_on_grey_scale_with_other_sizes(train_run):
    _, results, _ = train_run("likelihood=gaussian", "data.binarize=none", "model.latent_dim=16",
                              "trainer.max_epochs=1", "logger=csv")
    assert results["likelihood"] == "gaussian" and results["binarize"] == "none"
    assert math.isfinite(results["metrics"]["test/nll"])
    assert results["metrics"]["test/active_units"] <= 16


def test_multirun_gives_one_run_directory_per_value(tmp_path, fashion_mnist):
    sweep = tmp_path / "sweep"
    proc = run_app("-m", "model.latent_dim=2,5", *TINY, "trainer.max_epochs=1", "logger=csv",
                   f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(2)]
    assert [r["metrics"]["test/active_units"] <= d for r, d in zip(results, (2, 5))] == [True, True]
    assert [json.loads(json.dumps(r))["run_dir"] for r in results] == [str(sweep / "0"), str(sweep / "1")]


def _one_line_error(proc, expected: str) -> str:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
    return lines[0]


def test_bad_input_ends_with_one_clear_sentence(tmp_path, fashion_mnist):
    base = [*TINY, "logger=csv", f"hydra.run.dir={tmp_path / 'r'}"]
    _one_line_error(run_app(*base, "model.latent_dim=-3"), "model.latent_dim must be greater than 0, got -3")
    _one_line_error(run_app(*base, "eval.importance_samples=0"), "eval.importance_samples must be greater than 0")
    line = _one_line_error(run_app(*base, "data=mnist", f"data.root={tmp_path / 'empty'}", "data.download=false"),
                           "MNIST was not found")
    assert "network access" in line
    _one_line_error(run_app(*base, "likelihood=gaussian"), "likelihood=gaussian does not fit binarised data")


def test_the_same_seed_gives_the_same_run(train_in_process, tmp_path):
    overrides = ["logger=csv", "trainer.max_epochs=1", "data.subset=200", "trainer.deterministic=true"]
    _, first = train_in_process(*overrides, f"paths.output_dir={tmp_path / 'a'}")
    _, second = train_in_process(*overrides, f"paths.output_dir={tmp_path / 'b'}")
    _, other = train_in_process(*overrides, "seed=99", f"paths.output_dir={tmp_path / 'c'}")
    keys = ["test/nll", "test/elbo", "val/loss", "train/loss"]
    assert [first["metrics"][k] for k in keys] == [second["metrics"][k] for k in keys]
    assert first["metrics"]["test/nll"] != other["metrics"]["test/nll"]
