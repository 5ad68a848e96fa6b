"""What a person watching a run sees: the images W&B and TensorBoard show are the PNGs on disk, pixel for pixel;
the W&B config is the run's config; the console holds vaelab's lines (with the time left) and no library noise;
train.log keeps the same lines."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import wandb_files
from conftest import DATA_DIR
from omegaconf import OmegaConf
from PIL import Image

# every message of the noisy release, each fixed at its cause or filtered narrowly (README, What a run prints)
NOISE = ["was configured so", "LeafSpec", "litlogger", "Total FLOPs", "weights_only` was not set",
         "Previous log files", "GPU available", "TPU available", "Test metric", "anonymous setting",
         "Run history", "Run summary", "Trainable params", "Traceback", "Warning", "warn("]


@pytest.fixture(scope="module")
def seen(tmp_path_factory, fashion_mnist):
    """One tiny run with W&B, CSV and TensorBoard loggers, top-level tags and the line progress on."""
    from conftest import TINY, run_app

    run_dir = tmp_path_factory.mktemp("seen") / "run"
    proc = run_app(*TINY, f"hydra.run.dir={run_dir}", "logger=[default,tensorboard]", "tags=[baseline,night]",
                   "trainer.enable_progress_bar=true", "callbacks.progress_bar.every_n_batches=4", "trainer.steps_per_execution=2",
                   "extras.print_config=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    return run_dir, wandb_dir, proc


def pixels(path_or_bytes) -> np.ndarray:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    return np.asarray(Image.open(source).convert("RGB"))


def logged_images(wandb_dir: Path) -> list[tuple[str, str, int, Path]]:
    """(grid name, tag, step, PNG file) of every image the W&B run logged, from its history and media files."""
    found = []
    for row in wandb_files.history(wandb_dir):
        for key, value in row.items():
            if key.startswith("images/") and key.endswith("/filenames"):
                name, tag, step = row[key[: -len("filenames")] + "captions"][0].split(", ")[:3]
                found.append((name, tag, int(step.split()[1]), wandb_dir / "files" / value[0]))
    return found


def test_wandb_images_are_the_pngs_on_disk_once_per_drawing(seen):
    run_dir, wandb_dir, _ = seen
    images = logged_images(wandb_dir)
    assert sorted((n, t) for n, t, _, _ in images) == sorted(
        (p.stem.rsplit("_", 2)[0], "epoch_" + p.stem.rsplit("_", 1)[1])
        for p in (run_dir / "samples").glob("*_epoch_*.png"))  # each drawing logged once; `final` is a copy
    for name, tag, _, path in images:
        on_disk = pixels(run_dir / "samples" / f"{name}_{tag}.png")
        logged = pixels(path)
        assert logged.shape == on_disk.shape and np.array_equal(logged, on_disk), (name, tag)
        assert logged.max() >= 128, f"{name} {tag} is black"  # the grey padding (0.5) alone is 128
        if name == "reconstructions":  # binarised originals: black and white pixels both
            assert logged.min() == 0 and logged.max() == 255
    for final in (run_dir / "samples").glob("*_final.png"):
        assert np.array_equal(pixels(final), pixels(run_dir / "samples" / final.name.replace("final", "epoch_002")))


def test_tensorboard_images_are_the_pngs_on_disk(seen):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, wandb_dir, _ = seen
    tag_at = {(name, step): tag for name, tag, step, _ in logged_images(wandb_dir)}
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    checked = 0
    for key in events.Tags()["images"]:
        name = key.split("/")[1]
        for event in events.Images(key):
            on_disk = run_dir / "samples" / f"{name}_{tag_at[(name, event.step)]}.png"
            assert np.array_equal(pixels(event.encoded_image_string), pixels(on_disk)), (key, event.step)
            checked += 1
    assert checked == len(tag_at) == 8  # four grids, two epochs


def test_tensorboards_hparams_tab_shows_the_runs_config_and_test_figures(seen):
    """hparams.yaml holds the run's config (it was {}), and the event file holds the HParams plugin's session with
    the config's values and the run's test figures as its metrics."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _, _ = seen
    results = json.loads((run_dir / "results.json").read_text())
    saved = yaml.safe_load((run_dir / "tensorboard" / "hparams.yaml").read_text())
    assert saved["model"]["name"] == "vanilla" and saved["data"]["subset"] == 400, saved
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["model/name"].string_value == "vanilla"
    assert start.hparams["data/batch_size"].number_value == 50
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {f"hp/{k}" for k in results["metrics"]
                                                             if k.startswith("test/")}
    (nll,) = events.Scalars("hp/test/nll")
    assert nll.value == pytest.approx(results["metrics"]["test/nll"], rel=1e-6)


def test_the_wandb_config_is_the_run_config_plus_vaelabs_own_key(seen, monkeypatch):
    import vaelab.cli.rundirs  # noqa: F401 - vaelab's resolvers (paths.data_dir's), as the run had them

    run_dir, wandb_dir, _ = seen
    hydra_cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    hydra_cfg.paths.output_dir = str(run_dir)  # ${hydra:runtime.output_dir}, resolved as the run resolved it
    monkeypatch.setenv("VAELAB_DATA_DIR", str(DATA_DIR))
    expected = json.loads(json.dumps(OmegaConf.to_container(hydra_cfg, resolve=True)))
    logged = {k: v for k, v in wandb_files.config(wandb_dir).items() if k != "_wandb"}
    assert logged.pop("vaelab").keys() == {"num_parameters", "kl_estimator", "device", "world_size", "version"}
    assert logged == expected
    assert logged["scheduler"] == {"name": "none"}
    assert wandb_files.run_info(wandb_dir)["tags"][-2:] == ["baseline", "night"]
    assert json.loads((run_dir / "results.json").read_text())["tags"] == ["baseline", "night"]


def test_the_console_shows_vaelabs_lines_with_time_left_and_no_noise(seen):
    run_dir, _, proc = seen
    out = proc.stdout + proc.stderr
    for noise in NOISE:
        assert noise not in out, f"{noise!r} in the output:\n{out}"
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) <= 32, "\n".join(lines)  # 3 W&B lines, 1 start, 4+2 training, 2+1+2 test, 12 results
    train = [ln for ln in lines if re.match(r"epoch \d/2: batch \d/8, ", ln)]
    assert len(train) == 4 and all(re.search(r"epoch left \d+ s, run left \d+ s$", ln) for ln in train), train
    assert len([ln for ln in lines if re.match(r"epoch \d/2 done in", ln)]) == 2
    test = [ln for ln in lines if ln.startswith("test: ")]
    assert test[0] == "test: 400 images" and test[-1].startswith("test: 400 images done in ")
    assert any(re.match(r"test: \d+/400 images, [\d,]+ images/s, left \d+ s$", ln) for ln in test), test
    log = (run_dir / "train.log").read_text()
    for line in train + test + [ln for ln in lines if ln.strip().startswith("test/nll ")]:
        assert line.strip() in log, line


def test_the_wide_config_tree_is_not_cut_in_a_log_file(train_run):
    long_name = "x" * 150
    _, _, proc = train_run("trainer.max_epochs=1", f"+note={long_name}")
    assert any(ln.rstrip().endswith(long_name) for ln in proc.stdout.splitlines())
    assert not any(ln != ln.rstrip() for ln in proc.stdout.splitlines())  # no padding to a width


def test_a_plain_run_says_each_thing_once_and_only_what_is_true(tmp_path, fashion_mnist):
    """As a user's terminal shows it (W&B not silenced), launched outside the checkout with VAELAB_DATA_DIR set and
    callbacks=none: no W&B advertisement or start lines but vaelab's one line saying where the W&B run is and how
    to upload it; no line claiming data are kept elsewhere; "1 epoch"; no samples folder announced that does not
    exist. Then debug=fdr: Lightning's lines once each, not once from its own handler and again from Hydra's."""
    import subprocess
    import sys

    from conftest import TINY, app_env

    env = {k: v for k, v in app_env().items() if k not in ("WANDB_SILENT", "WANDB_SHOW_INFO")}
    env["PYTHONPATH"] = f"{Path(__file__).parent}:{Path(__file__).parents[1] / 'src'}"
    base = [sys.executable, "-m", "vaelab.cli.train", "extras.print_config=false"]
    tiny = [o for o in TINY if not o.startswith("callbacks.")]
    proc = subprocess.run([*base, *tiny, "trainer.max_epochs=1", "callbacks=none", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert not [ln for ln in lines if ln.startswith("wandb:") or "leet" in ln], lines
    said = [ln for ln in lines if ln.startswith("vaelab: W&B run ")]
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    assert said == [f"vaelab: W&B run {offline.name.split('-')[-1]} logs offline to {offline}; upload it later with "
                    f"wandb sync {offline}"], lines
    assert not [ln for ln in lines if "keeps data sets in" in ln], lines
    assert any(ln.startswith("vaelab: vanilla / standard prior / bernoulli on fashion_mnist (dynamic), 1 epoch, ")
               for ln in lines), lines
    assert not (tmp_path / "run" / "samples").exists() and not [ln for ln in lines if "sample grids" in ln], lines

    fdr = subprocess.run([*base, "debug=fdr", "data.subset=400", f"hydra.run.dir={tmp_path / 'fdr'}"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert fdr.returncode == 0, fdr.stderr[-3000:]
    out = fdr.stdout + fdr.stderr
    assert out.count("Seed set to") == 1 and out.count("Running in `fast_dev_run` mode") == 1, out[-3000:]
    assert not [ln for ln in out.splitlines() if ln.startswith("INFO: ")], out[-3000:]
