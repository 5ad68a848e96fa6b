"""Image data held in memory as tensors and batched by indexing.

Where the images come from, in order: an existing torchvision root (`data.root`); Debian's IDX files
(package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist), decompressed into torchvision's
`raw/` layout; torchvision's download when online. Splits: the official training images cut into
train / validation by a fixed permutation, and the official test set.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from vaelab.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BINARIZE = ("none", "static", "dynamic")
IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class Source:
    title: str
    torchvision_class: str | None  # class name in torchvision.datasets
    folder: str  # torchvision's folder under the root
    debian_dir: str | None  # where a Debian package puts the IDX .gz files
    debian_package: str | None
    image_shape: tuple[int, int, int]


SOURCES = {
    "fashion_mnist": Source("Fashion-MNIST", "FashionMNIST", "FashionMNIST",
                            "/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist", (1, 28, 28)),
    "mnist": Source("MNIST", "MNIST", "MNIST", None, None, (1, 28, 28)),
    "cifar10": Source("CIFAR-10", "CIFAR10", "cifar-10-batches-py", None, None, (3, 32, 32)),
    "synthetic": Source("synthetic shapes (unit tests only)", None, "", None, None, (1, 28, 28)),
}


def _torchvision_split(src: Source, root: Path, train: bool, download: bool) -> np.ndarray:
    import torchvision.datasets as tvd

    ds = getattr(tvd, src.torchvision_class)(str(root), train=train, download=download)
    data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
    return data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)  # -> [N, C, H, W] uint8


def idx_problem(path: Path) -> str | None:
    """Why an IDX file of bytes cannot be read, in a few words (None when it can): its magic number, and its
    size against the sizes its header promises."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    magic = int.from_bytes(head[:4], "big") if len(head) >= 4 else 0
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3) or len(head) < 4 + 4 * ndim:
        return f"not an IDX file of bytes ({size} bytes, magic number {magic:#010x})"
    dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = 4 + 4 * ndim + int(np.prod(dims))
    return None if size == expected else f"{size:,} bytes where its header promises {expected:,}"


def _damaged_idx(src: Source, root: Path) -> list[tuple[Path, str]]:
    raw = root / src.folder / "raw"
    found = [(raw / name, idx_problem(raw / name)) for name in IDX_FILES if (raw / name).is_file()]
    return [(path, problem) for path, problem in found if problem]


def _install_debian_files(src: Source, root: Path) -> bool:
    """Decompress Debian's IDX .gz files into <root>/<folder>/raw/ (again, for any damaged one there); True if
    all four are there after."""
    if not src.debian_dir or not all(Path(src.debian_dir, f + ".gz").is_file() for f in IDX_FILES):
        return False
    raw = root / src.folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for path, problem in _damaged_idx(src, root):
        log.warning("%s is damaged (%s); decompressing it again from %s", path, problem, src.debian_dir)
        path.unlink()
    written = []
    for name in IDX_FILES:
        target = raw / name
        if target.is_file():
            continue
        tmp = target.with_suffix(".part")
        gz = Path(src.debian_dir, name + ".gz")
        try:
            with gzip.open(gz, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        except (OSError, EOFError) as exc:
            tmp.unlink(missing_ok=True)
            raise DataError(f"Debian's {gz} is damaged ({exc}); reinstall it: apt-get install --reinstall "
                            f"{src.debian_package}") from None
        os.replace(tmp, target)  # atomic: a half-written file is never mistaken for data
        written.append(name)
    if written:
        log.info("Decompressed %s from %s into %s", ", ".join(written), src.debian_dir, raw)
    return not _damaged_idx(src, root)


def load_images(name: str, root: str | os.PathLike, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(official train images, official test images) as uint8 [N, C, H, W], from the first source that works."""
    src = SOURCES[name]
    root = Path(root)
    damaged = _damaged_idx(src, root) if src.folder and src.torchvision_class in ("MNIST", "FashionMNIST") else []
    if damaged and not _install_debian_files(src, root):  # Debian's package can replace a damaged file; else:
        path, problem = damaged[0]
        fetch = ("run `make data` (Debian's package), or run once online with data.download=true"
                 if src.debian_package else "run once online with data.download=true")
        raise DataError(f"{path} is damaged ({problem}); delete it and {fetch}, to fetch it again")
    try:  # 1. an existing torchvision root
        return _torchvision_split(src, root, True, False), _torchvision_split(src, root, False, False)
    except (RuntimeError, FileNotFoundError, OSError):
        pass
    if _install_debian_files(src, root):  # 2. Debian's package
        return _torchvision_split(src, root, True, False), _torchvision_split(src, root, False, False)
    if download:  # 3. torchvision's download
        try:
            return _torchvision_split(src, root, True, True), _torchvision_split(src, root, False, True)
        except Exception as exc:  # noqa: BLE001 - any network failure means the same thing here
            log.info("Download of %s failed: %s", src.title, exc)
    ways = [f"put torchvision's files under {root / src.folder}"]
    if src.debian_package:
        ways.insert(0, f"install Debian's package ({src.debian_package}, e.g. `make data` as root)")
    ways.append("run once with network access and data.download=true" if not download
                else "run once with network access so torchvision can download it")
    raise DataError(f"{src.title} was not found: {', '.join(ways[:-1])}, or {ways[-1]}.")


def synthetic_images(n: int, seed: int, shape=(1, 28, 28)) -> np.ndarray:
    """Random filled rectangles and discs as uint8 images: structure a VAE can learn, for unit tests only."""
    g = np.random.default_rng(seed)
    c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    out = np.zeros((n, c, h, w), dtype=np.uint8)
    for i in range(n):
        cy, cx = g.integers(6, h - 6), g.integers(6, w - 6)
        r = g.integers(3, 7)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) if g.random() < 0.5 else (
            (abs(yy - cy) <= r) & (abs(xx - cx) <= r))
        out[i, :, mask] = g.integers(150, 256)
    return out


class InMemoryImages(Dataset):
    """Images as one uint8 or float tensor; a batch is one indexing operation, not per-image transforms."""

    def __init__(self, images: Tensor) -> None:
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitems__(self, indices) -> Tensor:
        x = self.images[indices]
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x

    def __getitem__(self, index: int) -> Tensor:
        return self.__getitems__([index])[0]


class InMemoryLoader:
    """Batches of an in-memory data set, by indexing, that a run can stop and resume between any two of them.

    The order of epoch e is a permutation drawn from (seed, e), dynamic binarisation of batch b from
    (seed, e, b), and each DDP rank takes its own slice (evaluation sets are split without padding, so no
    image counts twice). Lightning saves `state_dict()` in checkpoints and hands it back on resume, so a
    resumed run sees exactly the batches an uninterrupted one would have.

    steps_per_execution: None (evaluation) yields one batch [B, C, H, W] at a time. A number (training) yields
    executions: up to that many consecutive batches stacked, [n, B, C, H, W], for the n optimiser steps of one
    Lightning step; a short last batch comes alone. With `indices_on`, an execution is the batches' image
    indices [n, B] on that device instead, and the step engine cuts and binarises the images there.
    """

    def __init__(self, dataset: InMemoryImages, batch_size: int, shuffle: bool = False,
                 dynamic_binarize: bool = False, seed: int = 0, with_index: bool = False,
                 rank: int = 0, world_size: int = 1, epoch_fn=None, position_fn=None,
                 steps_per_execution: int | None = None, indices_on: torch.device | None = None) -> None:
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.dynamic_binarize, self.seed, self.with_index = dynamic_binarize, seed, with_index
        self.rank, self.world_size = rank, world_size
        self.epoch_fn = epoch_fn or (lambda: 0)
        self.position_fn = position_fn  # items (batches or executions) of this epoch consumed, as the trainer counts
        self.steps, self.indices_on = steps_per_execution, indices_on
        self._resume: dict | None = None
        self._epoch, self._yielded = 0, 0

    def _indices(self, epoch: int) -> Tensor:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            return order[self.rank :: self.world_size][: n // self.world_size]  # equal shards, for DDP
        per_rank = -(-n // self.world_size)
        return torch.arange(n)[self.rank * per_rank : (self.rank + 1) * per_rank]  # contiguous, unpadded

    @property
    def num_batches(self) -> int:
        """Batches per epoch (optimiser steps, when training)."""
        return -(-len(self._indices(0)) // self.batch_size)

    def _groups(self) -> list[tuple[int, int]]:
        """(first batch, number of batches) of each item: single batches, or executions of `steps` full
        batches (the last one shorter) followed by a short last batch alone."""
        if self.steps is None:
            return [(b, 1) for b in range(self.num_batches)]
        full = len(self._indices(0)) // self.batch_size
        groups = [(b, min(self.steps, full - b)) for b in range(0, full, self.steps)]
        return groups + [(full, 1)] if full < self.num_batches else groups

    def __len__(self) -> int:
        return len(self._groups())

    def _batch(self, indices: Tensor, epoch: int, b: int) -> Tensor:
        x = self.dataset.__getitems__(indices[b * self.batch_size : (b + 1) * self.batch_size])
        if self.dynamic_binarize:  # a fresh draw per batch, reproducible from (seed, epoch, batch)
            g = torch.Generator(device=x.device).manual_seed(((self.seed * 100_003 + epoch) * 1_000_003 + b) % 2**63)
            x = bernoulli_draw(x, g)
        return x

    def __iter__(self):
        self._epoch = epoch = int(self.epoch_fn())
        start = 0
        if self._resume is not None and self._resume.get("epoch") == epoch:
            start = int(self._resume.get("position", 0))
            saved = self._resume.get("steps_per_execution", 1)
            if self.steps is not None and saved != self.steps:
                raise ConfigError(f"this run was trained with trainer.steps_per_execution={saved}; resume it with "
                                  f"that value (its checkpoint stopped inside an epoch), got {self.steps}")
        self._resume = None
        indices = self._indices(epoch)
        if self.indices_on is not None:
            indices = indices.to(self.indices_on)  # once per epoch; batches are then views of it
        groups = self._groups()
        for item in range(start, len(groups)):
            self._yielded = item + 1
            b, count = groups[item]
            if self.steps is None:
                idx = indices[b * self.batch_size : (b + 1) * self.batch_size]
                x = self._batch(indices, epoch, b)
                yield (x, idx) if self.with_index else x
            elif self.indices_on is not None:
                yield indices[b * self.batch_size : (b + count) * self.batch_size].view(count, -1)
            elif count == 1:
                yield self._batch(indices, epoch, b).unsqueeze(0)
            else:
                yield torch.stack([self._batch(indices, epoch, c) for c in range(b, b + count)])

    def state_dict(self) -> dict:
        position = self.position_fn() if self.position_fn is not None else self._yielded
        return {"epoch": self._epoch, "position": int(position), "steps_per_execution": self.steps or 1}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)


def bernoulli_draw(p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One Bernoulli(p) draw per pixel, as 0./1. in p's dtype: 1 where a uniform U[0, 1) falls below p.
    On a CPU this gives, draw for draw, the values torch.bernoulli gives with the same generator (it compares
    the same uniforms, one element at a time), at a quarter of its cost: 0.18 vs 0.75 ms for a batch of 100
    Fashion-MNIST images on this 2-core machine."""
    return torch.rand(p.shape, generator=generator, dtype=p.dtype, device=p.device).lt_(p)


def _binarize(x: Tensor, seed: int) -> Tensor:
    return torch.bernoulli(x.float() / 255.0, generator=torch.Generator().manual_seed(seed))


class ImageDataModule(L.LightningDataModule):
    """Fashion-MNIST (default), MNIST, CIFAR-10 or synthetic shapes, as in-memory tensors.

    binarize: none (grey-scale in [0, 1]) | static (one fixed Bernoulli draw) | dynamic (a fresh draw per
    training batch; validation and test are drawn once with a fixed seed so they stay comparable).
    subset: cap every split at this many images, for small fast runs.
    device: keep the images on this device (e.g. cuda: all of Fashion-MNIST is 47 MB) instead of host memory;
        auto: on the trainer's device when that is a GPU, else in host memory.
    """

    def __init__(
        self,
        name: str = "fashion_mnist",
        root: str = "data",
        binarize: str = "dynamic",
        batch_size: int = 100,
        eval_batch_size: int = 500,
        val_size: int = 10_000,
        subset: int | None = None,
        split_seed: int = 0,
        download: bool = True,
        seed: int = 0,
        device: str | None = "auto",
    ) -> None:
        super().__init__()
        if name not in SOURCES:
            raise ConfigError(f"data.name must be one of {', '.join(SOURCES)}, got {name!r} (conf/data/)")
        if binarize not in BINARIZE:
            raise ConfigError(f"data.binarize must be one of {', '.join(BINARIZE)}, got {binarize!r} (conf/data/)")
        for key, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                           ("val_size", val_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"data.{key} must be a positive integer, got {value!r} (conf/data/)")
        if subset is not None and (not isinstance(subset, int) or subset <= 0):
            raise ConfigError(f"data.subset must be a positive number of images or null, got {subset!r}")
        self.name, self.root, self.binarize = name, root, binarize
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.subset, self.split_seed = val_size, subset, split_seed
        self.download, self.seed, self.device = download, seed, device
        self.source = SOURCES[name]
        self.image_shape: tuple[int, int, int] = self.source.image_shape
        self.train_set = self.val_set = self.test_set = None

    @property
    def is_binary(self) -> bool:
        return self.binarize != "none"

    def prepare_data(self) -> None:
        if self.name != "synthetic":
            load_images(self.name, self.root, self.download)

    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        if self.name == "synthetic":
            n = (self.subset or 2000)
            return synthetic_images(n + min(self.val_size, n), 1), synthetic_images(n, 2)
        return load_images(self.name, self.root, self.download)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._build()
        device = self.device
        if device == "auto":  # the trainer's GPU, once a trainer is attached; host memory otherwise
            trainer = getattr(self, "trainer", None)
            root = trainer.strategy.root_device if trainer is not None else None
            device = root if root is not None and root.type == "cuda" else None
        if device is not None:  # a GPU-resident data set: batches are cut where the model runs, nothing crosses the bus
            for split in (self.train_set, self.val_set, self.test_set):
                split.images = split.images.to(device)

    def _build(self) -> None:
        train_all, test = (torch.from_numpy(np.ascontiguousarray(a)) for a in self._raw())
        if self.val_size >= train_all.shape[0]:
            raise ConfigError(
                f"data.val_size={self.val_size} leaves no training images out of {train_all.shape[0]}"
            )
        perm = torch.randperm(train_all.shape[0], generator=torch.Generator().manual_seed(self.split_seed))
        train, val = train_all[perm[self.val_size:]], train_all[perm[: self.val_size]]
        if self.subset:
            train, val, test = train[: self.subset], val[: self.subset], test[: self.subset]
        if self.batch_size > train.shape[0]:
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {train.shape[0]} training images; "
                "lower data.batch_size or raise data.subset"
            )
        if self.binarize == "static":
            train = _binarize(train, self.split_seed + 1)
        if self.is_binary:  # evaluation sets are binarised once, with a fixed seed
            val, test = _binarize(val, self.split_seed + 2), _binarize(test, self.split_seed + 3)
        self.train_set, self.val_set, self.test_set = InMemoryImages(train), InMemoryImages(val), InMemoryImages(test)

    def train_images(self) -> Tensor:
        """All training images as floats in [0, 1] (grey values, not binarised): for pseudo-input init."""
        x = self.train_set.images
        return x.float() / 255.0 if x.dtype == torch.uint8 else x

    def example_batch(self, n: int) -> Tensor:
        """The first n validation images: a fixed batch for reconstruction grids."""
        return self.val_set.__getitems__(list(range(min(n, len(self.val_set)))))

    def _distributed(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> InMemoryLoader:
        """Executions of the module's `execution_plan` (steps per execution, and whether to hand over image
        indices on the device instead of images); one batch per step when the module has no plan."""
        rank, world = self._distributed()
        trainer = self.trainer
        plan = getattr(trainer.lightning_module, "execution_plan", None) if trainer else None
        return InMemoryLoader(
            self.train_set, self.batch_size, shuffle=True, dynamic_binarize=self.binarize == "dynamic",
            seed=self.seed, rank=rank, world_size=world,
            epoch_fn=(lambda: trainer.current_epoch) if trainer else None,
            position_fn=(lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready) if trainer else None,
            steps_per_execution=getattr(plan, "steps", None), indices_on=getattr(plan, "indices_on", None),
        )

    def train_batch(self, indices: Tensor) -> Tensor:
        """Training images at these indices, as floats, binarised afresh (default generator) when
        binarize=dynamic: what the step engine cuts on the device, inside a CUDA graph too."""
        x = self.train_set.__getitems__(indices)
        return bernoulli_draw(x) if self.binarize == "dynamic" else x

    def val_dataloader(self) -> InMemoryLoader:
        rank, world = self._distributed()
        return InMemoryLoader(self.val_set, self.eval_batch_size, rank=rank, world_size=world)

    def test_dataloader(self) -> InMemoryLoader:
        """Test batches are (images, their indices in the test set): the indices key the importance
        sampling noise, so test/nll does not depend on batching or on the number of processes."""
        rank, world = self._distributed()
        return InMemoryLoader(self.test_set, self.eval_batch_size, with_index=True, rank=rank, world_size=world)


def main() -> None:
    """`python -m vaelab.data [name] [root]`: make a data set available (used by `make data`)."""
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else "fashion_mnist"
    root = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("VAELAB_DATA_DIR", "data")
    try:
        train, test = load_images(name, root, download=True)
    except DataError as exc:
        sys.exit(f"error: {exc}")
    print(f"{SOURCES[name].title}: {len(train)} training and {len(test)} test images under {root}")


if __name__ == "__main__":
    main()
