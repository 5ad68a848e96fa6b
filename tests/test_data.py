import os
import numpy as np
import pytest
import torch

from vaelab.data import SOURCES, ImageDataModule, load_images
from vaelab.errors import ConfigError, DataError


def test_debian_files_are_decompressed_into_torchvision_layout(tmp_path):
    src = SOURCES["fashion_mnist"]
    if not os.path.isdir(src.debian_dir):
        pytest.skip("Debian's dataset-fashion-mnist is not installed (run `make data` as root)")
    train, test = load_images("fashion_mnist", tmp_path, download=False)
    assert train.shape == (60_000, 1, 28, 28) and test.shape == (10_000, 1, 28, 28)
    assert train.dtype == np.uint8 and train.max() == 255
    assert (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file()
    assert not list((tmp_path / "FashionMNIST" / "raw").glob("*.part"))


def test_missing_data_set_names_the_ways_to_fix_it(tmp_path):
    with pytest.raises(DataError) as err:
        load_images("mnist", tmp_path, download=False)
    msg = str(err.value)
    assert msg.startswith("MNIST was not found") and "network access" in msg and str(tmp_path) in msg


def test_splits_binarisation_and_batches(fashion_mnist):
    dm = ImageDataModule(root=str(fashion_mnist), binarize="dynamic", batch_size=64)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (50_000, 10_000, 10_000)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (64, 1, 28, 28) and batch.dtype == torch.float32
    assert set(batch.unique().tolist()) == {0.0, 1.0}
    # dynamic: a fresh Bernoulli draw for the same images every time
    a, b = dm.train_set.__getitems__([0, 1, 2]), dm.train_set.__getitems__([0, 1, 2])
    assert not torch.equal(a, b)
    # evaluation sets are drawn once, with a fixed seed: the same in a second data module
    dm2 = ImageDataModule(root=str(fashion_mnist), binarize="dynamic")
    dm2.setup()
    assert torch.equal(dm.test_set.images[:100], dm2.test_set.images[:100])
    assert torch.equal(dm.val_set.images, dm2.val_set.images)


def test_grey_scale_and_subset(fashion_mnist):
    dm = ImageDataModule(root=str(fashion_mnist), binarize="none", subset=300, batch_size=100)
    dm.setup()
    assert len(dm.train_set) == len(dm.val_set) == len(dm.test_set) == 300
    x = next(iter(dm.val_dataloader()))
    assert 0.0 <= x.min() and x.max() <= 1.0 and len(x.unique()) > 2


def test_bad_data_options_are_config_errors(fashion_mnist):
    with pytest.raises(ConfigError, match="data.binarize must be one of none, static, dynamic"):
        ImageDataModule(binarize="sometimes")
    dm = ImageDataModule(root=str(fashion_mnist), subset=50, batch_size=100)
    with pytest.raises(ConfigError, match="data.batch_size=100 is larger than the 50 training images"):
        dm.setup()
