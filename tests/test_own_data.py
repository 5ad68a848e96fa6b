"""Your own images (data=folder, data=arrays), tested on real images: Fashion-MNIST written out as PNG files and as a
.npz file must serve the same pixels as data=fashion_mnist, train the same run from either, be decoded once and
cached, and every bad input is one sentence naming the file or key."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import TINY, run_app

from vaelab.data import ImageDataModule, load_images, own
from vaelab.errors import ConfigError, DataError

N_TRAIN, N_TEST = 300, 100


@pytest.fixture(scope="module")
def real(tmp_path_factory, fashion_mnist):
    """Fashion-MNIST's first 300 training and 100 test images as PNG files (train/, test/) and as a .npz file."""
    from PIL import Image

    train, test = load_images("fashion_mnist", fashion_mnist, download=False)
    root = tmp_path_factory.mktemp("own")
    for split, images, n in (("train", train, N_TRAIN), ("test", test, N_TEST)):
        (root / "pngs" / split).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(images[i, 0]).save(root / "pngs" / split / f"{i:05d}.png")
    np.savez(root / "images.npz", train=train[:N_TRAIN, 0], test=test[:N_TEST])  # [N, H, W] and [N, C, H, W]
    return root, train[:N_TRAIN], test[:N_TEST]


def module(**kwargs) -> ImageDataModule:
    m = ImageDataModule(val_size=50, binarize="none", **kwargs)
    m.setup("fit")
    return m


def test_a_folder_and_arrays_serve_fashion_mnists_own_pixels(real):
    root, train, test = real
    got_train, got_test = own.folder_images(root / "pngs")
    assert np.array_equal(got_train, train) and np.array_equal(got_test, test)
    folder, arrays = module(name="folder", path=str(root / "pngs")), module(name="arrays", path=str(root / "images.npz"))
    assert folder.image_shape == arrays.image_shape == (1, 28, 28)
    for split in ("train_set", "val_set", "test_set"):
        assert torch.equal(getattr(folder, split).images, getattr(arrays, split).images), split
    # the same split and validation cut as the built-in set makes from the same images
    perm = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(0))
    assert torch.equal(folder.train_set.images, torch.from_numpy(train)[perm[50:]])
    binarised = ImageDataModule(name="folder", path=str(root / "pngs"), val_size=50, binarize="dynamic")
    binarised.setup("fit")
    assert set(binarised.test_set.images.unique().tolist()) == {0.0, 1.0}  # every option of the built-in sets


def test_a_folder_is_decoded_once_and_decoded_again_when_it_changes(real, tmp_path, monkeypatch):
    import shutil

    root, train, _ = real
    folder = tmp_path / "imgs"
    shutil.copytree(root / "pngs" / "train", folder)  # one folder: cut by test_fraction
    first_train, first_test = own.folder_images(folder, test_fraction=0.2)
    assert len(first_test) == round(N_TRAIN * 0.2) and len(first_train) + len(first_test) == N_TRAIN
    (cache,) = folder.glob(".vaelab-cache-*.npz")
    monkeypatch.setattr(own, "_decode", lambda *a: pytest.fail("decoded again although nothing changed"))
    again = own.folder_images(folder, test_fraction=0.2)
    assert np.array_equal(again[0], first_train)
    monkeypatch.undo()
    (folder / "00000.png").unlink()  # the folder changed: decoded again, the stale cache removed
    changed_train, changed_test = own.folder_images(folder, test_fraction=0.2)
    assert len(changed_train) + len(changed_test) == N_TRAIN - 1
    assert not cache.exists() and len(list(folder.glob(".vaelab-cache-*.npz"))) == 1
    own.folder_images(folder, test_fraction=0.2, image_size=14)  # new options: a cache of their own
    assert len(list(folder.glob(".vaelab-cache-*.npz"))) == 1


def test_colour_images_of_mixed_sizes_are_converted_as_asked(tmp_path):
    from PIL import Image

    g = np.random.default_rng(0)
    for i, size in enumerate([(32, 32), (40, 36)] * 5):
        Image.fromarray(g.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    with pytest.raises(DataError, match=r"1\.png is RGB 36x40 but .*0\.png is RGB 32x32.*set data\.image_size"):
        own.folder_images(tmp_path, cache=False)
    train, test = own.folder_images(tmp_path, channels=1, image_size=[28, 24], cache=False)
    assert train.shape[1:] == (1, 28, 24) and len(train) + len(test) == 10
    rgb, _ = own.folder_images(tmp_path, image_size=16, cache=False)
    assert rgb.shape[1:] == (3, 16, 16)


def test_bad_images_and_arrays_are_one_sentence_each(real, tmp_path, caplog):
    root, train, test = real
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data.path=.*empty holds no files; put images in it"):
        own.folder_images(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"holds 1 files but no PNG or JPEG images"):
        own.folder_images(tmp_path / "text")
    with pytest.raises(DataError, match=r"is not a folder"):
        own.folder_images(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"data=folder reads your images: give it data.path="):
        ImageDataModule(name="folder")

    few = tmp_path / "few"
    few.mkdir()
    for i in range(5):
        (few / f"{i}.png").write_bytes((root / "pngs" / "train" / f"{i:05d}.png").read_bytes())
    (few / "3.png").write_bytes((few / "3.png").read_bytes()[:40])  # truncated
    with pytest.raises(DataError, match=r"3\.png cannot be read as an image \(unreadable or truncated; 1 of 4"):
        own.folder_images(few, test_fraction=0.2)
    many = tmp_path / "many"
    import shutil

    shutil.copytree(root / "pngs" / "train", many)
    (many / "00007.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING):
        got, held = own.folder_images(many, test_fraction=0.1, cache=False)
    assert "1 of" in caplog.text and "00007.png" in caplog.text and len(got) + len(held) == N_TRAIN - 1

    cases = {"float": dict(train=train.astype(np.float32), test=test), "rank": dict(train=train[0, 0], test=test),
             "missing": dict(train=train)}
    expected = {"float": r"'train' array is float32; vaelab takes uint8", "rank": r"shape \(28, 28\); vaelab takes",
                "missing": r"has no array 'test' \(it has train\)"}
    for name, arrays in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(DataError, match=expected[name]):
            own.array_images(tmp_path / f"{name}.npz")
    (tmp_path / "junk.npz").write_text("junk")
    with pytest.raises(DataError, match=r"cannot be read as a \.npz file"):
        own.array_images(tmp_path / "junk.npz")


def test_the_app_trains_the_same_run_from_a_folder_and_from_arrays(real, tmp_path):
    root, _, _ = real
    base = [*TINY, "extras.print_config=false", "trainer.max_epochs=1", "logger=csv", "data.val_size=50",
            "data.subset=null"]
    results = []
    for name, path in (("folder", root / "pngs"), ("arrays", root / "images.npz")):
        proc = run_app(*base, f"data={name}", f"data.path={path}", f"hydra.run.dir={tmp_path / name}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(json.loads((tmp_path / name / "results.json").read_text()))
    assert results[0]["data"] == "folder" and results[1]["data"] == "arrays"
    a, b = (r["metrics"] for r in results)
    assert math.isfinite(a["test/nll"]) and {k for k in a if not k.startswith("perf/")} <= set(b)
    for key in (k for k in a if not k.startswith("perf/")):
        assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), key
    refused = run_app(*base, "data=folder", f"hydra.run.dir={tmp_path / 'refused'}")
    assert refused.returncode != 0
    assert [line for line in refused.stderr.splitlines() if line.startswith("error:")] == [
        "error: data=folder reads your images: give it data.path=<a folder of PNG or JPEG images>"]
    assert not (tmp_path / "refused").exists()


def test_data_go_to_a_per_user_cache_outside_a_checkout(tmp_path, monkeypatch):
    from conftest import ROOT

    from vaelab.data.sources import default_data_dir

    monkeypatch.chdir(ROOT)
    assert default_data_dir() == "data"  # README's `make data` puts Fashion-MNIST there
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_data_dir() == str(tmp_path / "cache" / "vaelab" / "data")


def test_a_missing_data_set_is_one_message_and_leaves_no_folder(tmp_path):
    """data=mnist with no copy anywhere, launched outside a checkout, with the network closed: one error line that
    names data.root and VAELAB_DATA_DIR, no download trace, and no empty folder left in the per-user cache."""
    import subprocess
    import sys

    from conftest import app_env

    env = dict(app_env(), XDG_CACHE_HOME=str(tmp_path / "cache"), http_proxy="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9")
    env.pop("VAELAB_DATA_DIR")
    proc = subprocess.run([sys.executable, "-m", "vaelab.cli.train", "data=mnist", "extras.print_config=false",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    said = proc.stdout + proc.stderr
    errors = [line for line in said.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.root=" in errors[0] and "VAELAB_DATA_DIR" in errors[0], said[-2000:]
    assert str(tmp_path / "cache" / "vaelab" / "data") in errors[0]
    assert not any(word in said for word in ("Downloading", "urlopen", "Traceback", "Tried http"))
    assert said.count("vaelab keeps data sets in") == 1
    assert not (tmp_path / "cache" / "vaelab").exists() and not (tmp_path / "data").exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("val_size, n_val", [("auto", 400), (0.25, 1000), (300, 300)])
def test_val_size_is_a_count_a_fraction_or_auto_and_says_the_split(val_size, n_val, capsys):
    """data.val_size takes a number of images, a fraction of the training images, or auto (a tenth, at most
    1,000); a fraction or auto says the split it gave in one line. 4,000 synthetic training images here."""
    m = ImageDataModule(name="synthetic", val_size=val_size, binarize="none")
    m.setup("fit")
    assert len(m.val_set) == n_val and len(m.train_set) + n_val == (4000 if val_size != 300 else 2300)
    said = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("vaelab: ")]
    assert said == ([] if val_size == 300 else
                    [f"vaelab: 4,000 training images: {4000 - n_val:,} to train, {n_val:,} to validate "
                     f"(data.val_size={val_size})"])


def test_a_val_size_too_large_or_not_whole_says_what_would_fit():

    m = ImageDataModule(name="synthetic", subset=100, val_size=5000, binarize="none")
    with pytest.raises(ConfigError, match=r"^data.val_size=5000 leaves no training images out of 200; use fewer, "
                                          r"e.g. data.val_size=auto \(20 images\) or a fraction such as "
                                          r"data.val_size=0.1$"):
        m.setup("fit")
    with pytest.raises(ConfigError, match="a fraction of the training images below 1, or auto; got 2.5"):
        ImageDataModule(name="synthetic", val_size=2.5)


@pytest.mark.parametrize("n", [1, 5, 13])
def test_the_reconstruction_grid_keeps_its_row_pairs_with_any_validation_size(n):
    """Originals and their reconstructions alternate row by row whatever the number of validation images."""
    from vaelab.evaluation.grids import reconstruction_grid
    from vaelab.models import VAE

    torch.manual_seed(0)
    model = VAE((1, 8, 8), latent_dim=2, hidden_dim=16).eval()
    x = torch.rand(n, 1, 8, 8)
    x[:, 0, 0, 0] = torch.arange(n) / 16  # a mark per image, to find it in the grid
    grid = reconstruction_grid(model, x)
    cols, rows = (grid.shape[2] - 2) // 10, (grid.shape[1] - 2) // 10  # 8-pixel cells, 2-pixel padding
    assert cols == min(8, n) and rows == 2 * (n // cols if n > 8 else 1)
    for r in range(0, rows, 2):  # every other row: originals, in order
        for c in range(cols):
            assert grid[0, 2 + 10 * r, 2 + 10 * c] == pytest.approx(float(x[(r // 2) * cols + c, 0, 0, 0]))
