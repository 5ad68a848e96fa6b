import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.data import SOURCES, ImageDataModule, InMemoryLoader, bernoulli_draw, load_images
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
    # dynamic: a fresh Bernoulli draw for every epoch, reproducible from (seed, epoch, batch)
    epoch = {"e": 0}
    loader = InMemoryLoader(dm.train_set, 64, shuffle=True, dynamic_binarize=True, seed=3, epoch_fn=lambda: epoch["e"])
    first = [b for _, b in zip(range(3), loader)]
    again = [b for _, b in zip(range(3), loader)]
    epoch["e"] = 1
    other = next(iter(loader))
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], other)
    # evaluation sets are drawn once, with a fixed seed: the same in a second data module
    dm2 = ImageDataModule(root=str(fashion_mnist), binarize="dynamic")
    dm2.setup()
    assert torch.equal(dm.test_set.images[:100], dm2.test_set.images[:100])
    assert torch.equal(dm.val_set.images, dm2.val_set.images)
    x, index = next(iter(dm.test_dataloader()))
    assert index.tolist() == list(range(500)) and torch.equal(x, dm.test_set.images[:500])


def test_loader_resumes_mid_epoch_and_shards_without_overlap(fashion_mnist):
    dm = ImageDataModule(root=str(fashion_mnist), subset=1000, batch_size=100)
    dm.setup()
    full = list(InMemoryLoader(dm.train_set, 100, shuffle=True, dynamic_binarize=True, seed=1))
    resumed = InMemoryLoader(dm.train_set, 100, shuffle=True, dynamic_binarize=True, seed=1)
    resumed.load_state_dict({"epoch": 0, "position": 4})
    rest = list(resumed)
    assert len(rest) == 6 and all(torch.equal(a, b) for a, b in zip(full[4:], rest))
    shards = [InMemoryLoader(dm.test_set, 64, with_index=True, rank=r, world_size=3) for r in range(3)]
    seen = torch.cat([idx for loader in shards for _, idx in loader])
    assert sorted(seen.tolist()) == list(range(1000))  # every test image once: no padding, no overlap


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


def test_bernoulli_draw_has_the_bernoulli_distribution():
    p = torch.tensor([0.0, 0.05, 0.3, 0.5, 0.9, 1.0]).expand(40_000, 6).contiguous()
    x = bernoulli_draw(p, torch.Generator().manual_seed(0))
    assert x.dtype == p.dtype and set(x.unique().tolist()) <= {0.0, 1.0}
    freq, se = x.mean(0), (p[0] * (1 - p[0]) / p.shape[0]).sqrt()
    assert freq[0] == 0 and freq[-1] == 1  # never above p=0, always below p=1
    assert ((freq - p[0]).abs() <= 4 * se + 1e-6).all(), freq
    again = bernoulli_draw(p, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)  # reproducible from the generator's seed


def test_bernoulli_draw_matches_torch_bernoulli_draw_for_draw_on_cpu():
    """Runs made before vaelab drew this way (with torch.bernoulli) are reproduced exactly."""
    p = torch.rand(100, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    ours = bernoulli_draw(p, torch.Generator().manual_seed(11))
    assert torch.equal(ours, torch.bernoulli(p, generator=torch.Generator().manual_seed(11)))


def test_a_damaged_idx_file_is_rebuilt_from_debian_or_named_in_one_sentence(fashion_mnist, tmp_path, caplog):
    import shutil

    from vaelab.data import load_images
    from vaelab.errors import DataError

    shutil.copytree(fashion_mnist / "FashionMNIST" / "raw", tmp_path / "FashionMNIST" / "raw")
    images = tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100_000])  # a truncated copy
    if Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        train, _ = load_images("fashion_mnist", tmp_path, download=False)
        assert train.shape == (60000, 1, 28, 28) and "is damaged (100,000 bytes" in caplog.text
    raw = tmp_path / "MNIST" / "raw"  # no Debian package for MNIST: the damaged file is named, with the fix
    shutil.copytree(fashion_mnist / "FashionMNIST" / "raw", raw)
    (raw / "t10k-labels-idx1-ubyte").write_bytes((raw / "t10k-labels-idx1-ubyte").read_bytes()[:58])
    with pytest.raises(DataError) as err:
        load_images("mnist", tmp_path, download=False)
    assert str(err.value) == (f"{raw / 't10k-labels-idx1-ubyte'} is damaged (58 bytes where its header promises "
                              "10,008); delete it and run once online with data.download=true, to fetch it again")


def test_runs_of_one_process_share_one_copy_of_their_split():
    """A stacked sweep's members (threads of one process) hold one copy of their images: data modules that differ
    only in their training order (data.seed) or batch sizes share the split's tensors; another split is built
    afresh; and a module that moves its sets to a device gets new sets, leaving the shared ones where they were."""
    from vaelab.data import ImageDataModule

    a = ImageDataModule("synthetic", subset=300, val_size=100, seed=1, batch_size=50)
    b = ImageDataModule("synthetic", subset=300, val_size=100, seed=2, batch_size=20)
    a.setup("fit")
    b.setup("fit")
    assert a.train_set.images is b.train_set.images and a.test_set.images is b.test_set.images
    shared = a.train_set
    d = ImageDataModule("synthetic", subset=300, val_size=100, device="cpu")
    d.setup("fit")  # the shared split, moved: new sets for d, a's untouched
    assert d.train_set is not shared and a.train_set is shared and torch.equal(d.train_set.images, shared.images)
    c = ImageDataModule("synthetic", subset=300, val_size=50, seed=1)
    c.setup("fit")
    assert c.train_set.images is not a.train_set.images and len(c.val_set) == 50
