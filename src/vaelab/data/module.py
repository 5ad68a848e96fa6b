"""ImageDataModule: a data set from the registry (sources.py), split, binarised and held in memory as tensors.
Splits: the official training images cut into train / validation by a fixed permutation, and the official
test set.

Why it is long: it is one LightningDataModule, whose hooks (prepare, setup, the shared split, the loaders and the
execution plan they cut) share its state; the loaders themselves are loader.py, the sources sources.py."""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from vaelab.checks import Arg, check_args, one_of, positive_int
from vaelab.console import say
from vaelab.data.batches import ExecutionPlan
from vaelab.data.loader import (
    InMemoryImages,
    InMemoryLoader,
    bernoulli_draw,
    binarize_once,
    dequantize_draw,
    dequantize_once,
)
from vaelab.data.own import array_images, folder_images
from vaelab.data.sources import SOURCES, Source, load_images, synthetic_images
from vaelab.errors import ConfigError


def val_count(val_size, n: int) -> int:
    """How many of n training images data.val_size takes for validation: a count as it is; a fraction of n
    (at least 1); auto: a tenth of n, at most 1,000 (own data of any size keeps most of its images to train on)."""
    if val_size == "auto":
        return max(1, min(1000, round(0.1 * n)))
    if val_size < 1:
        return max(1, round(val_size * n))
    return int(val_size)


# the last split built in this process, by _split_key: a stacked sweep's members (threads of one process) share
# one copy of their images, in host memory or on the GPU (setup moves the shared sets once)
_BUILT: dict[str, tuple] = {}


_MOVED: dict[tuple, tuple] = {}


def _on_device(splits: tuple, device) -> tuple:
    """The splits' images on `device`, as new sets (the host sets may be shared with other runs of this process,
    which may train elsewhere); moved once per process and device, so a stacked sweep's members share one copy."""
    key = (tuple(id(s) for s in splits), str(device))
    if key not in _MOVED:
        _MOVED.clear()  # the newest only, as _BUILT
        _MOVED[key] = (splits, tuple(InMemoryImages(s.images.to(device)) for s in splits))  # the host sets kept: ids
    return _MOVED[key][1]


class ImageDataModule(L.LightningDataModule):
    """Fashion-MNIST (default), MNIST, CIFAR-10, your own images (name="folder" or "arrays" with `path`) or synthetic
    shapes, as in-memory tensors.

    binarize: none (grey-scale in [0, 1]) | static (one fixed Bernoulli draw) | dynamic (a fresh draw per
    training batch; validation and test are drawn once with a fixed seed so they stay comparable).
    subset: cap every split at this many images, for small fast runs.
    test_subset: cap the test split at its first this many images (the importance-sampled NLL's cost on a CPU).
    device: keep the images on this device (e.g. cuda: all of Fashion-MNIST is 47 MB) instead of host memory;
        auto: on the trainer's device when that is a GPU, else in host memory.
    path: your images: a folder of PNG/JPEG files (train/ and test/ subfolders, or one folder cut by
        test_fraction), or a .npz file with uint8 arrays train and test ([N, H, W] or [N, C, H, W]) (data/own.py).
    channels, image_size: convert a folder's images to 1 (grey) or 3 (RGB) channels and resize them to this
        size (an int, or [H, W]); None: as they are (they must then all match). cache: keep a folder's decoded
        images beside it (rebuilt when its files or these options change).
    """

    ARGS: dict[str, Arg] = {
        "name": one_of("data.name", *SOURCES),
        "binarize": one_of("data.binarize", "none", "static", "dynamic"),
        "batch_size": positive_int("data.batch_size"),
        "eval_batch_size": positive_int("data.eval_batch_size"),
        "val_size": Arg("data.val_size", "number", 0, strict=True, auto=True),  # a count, a fraction, or auto
        "subset": positive_int("data.subset", nullable=True),
        "test_subset": positive_int("data.test_subset", nullable=True),
    }

    def __init__(
        self,
        name: str = "fashion_mnist",
        root: str = "data",
        binarize: str = "dynamic",
        batch_size: int = 100,
        eval_batch_size: int = 500,
        val_size: int = 10_000,
        subset: int | None = None,
        test_subset: int | None = None,
        split_seed: int = 0,
        download: bool = True,
        seed: int = 0,
        device: str | None = "auto",
        path: str | None = None,
        channels: int | None = None,
        image_size: int | list[int] | None = None,
        test_fraction: float = 0.1,
        cache: bool = True,
    ) -> None:
        check_args(self.ARGS, locals())
        if val_size != "auto" and val_size >= 1 and val_size != int(val_size):
            raise ConfigError(f"data.val_size must be a number of images (a whole number), a fraction of the "
                              f"training images below 1, or auto; got {val_size!r}")
        super().__init__()
        self.save_hyperparameters(logger=False)  # for checkpoints: vaelab-eval and -sample rebuild the data from them
        self.name, self.root, self.binarize = name, root, binarize
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_size, self.subset, self.split_seed = val_size, subset, split_seed
        self.test_subset = test_subset
        self.download, self.seed, self.device = download, seed, device
        self.path, self.channels, self.image_size = path, channels, image_size
        self.test_fraction, self.cache = test_fraction, cache
        self.source: Source = SOURCES[name]
        if self.source.reader and not path:
            raise ConfigError(f"data={name} reads your images: give it data.path=<"
                              f"{'a folder of PNG or JPEG images' if name == 'folder' else 'a .npz file'}>")
        # [C, H, W]: the registry's, or (data=folder, arrays) known once the images are read (setup)
        self.image_shape: tuple[int, int, int] | None = self.source.image_shape
        self.train_set = self.val_set = self.test_set = None
        self.execution_plan: ExecutionPlan | None = None  # handed over by the training module (use_execution_plan)
        self.pixels: str | None = None  # what the likelihood is given (use_pixels; vaelab/pixels.py)
        self._dequantized = False

    def find_image_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of the images: the registry's, or read from the user's images (data=folder, arrays)."""
        if self.image_shape is None:
            self.image_shape = tuple(int(d) for d in self._raw()[0].shape[1:])
        return self.image_shape

    @property
    def is_binary(self) -> bool:
        return self.binarize != "none"

    def prepare_data(self) -> None:
        if not self.source.generated and not self.source.reader:
            load_images(self.name, self.root, self.download)

    def _raw(self) -> tuple[np.ndarray, np.ndarray]:
        if self.source.reader == "folder":
            return folder_images(self.path, self.channels, self.image_size, self.test_fraction, self.split_seed,
                                 self.cache)
        if self.source.reader == "arrays":
            return array_images(self.path)
        if self.source.generated:
            n = (self.subset or 2000)
            extra = min(self.val_size, n) if self.val_size != "auto" and self.val_size >= 1 else n
            return synthetic_images(n + int(extra), 1), synthetic_images(n, 2)
        return load_images(self.name, self.root, self.download)

    def use_pixels(self, pixels: str) -> None:
        """The pixel values the model's likelihood is given (vaelab/pixels.py), as the app decides them once the
        model is built: "dequantized" dequantises the validation and test sets once (fixed seeds) and each training
        batch afresh, as binarize=dynamic binarises them."""
        self.pixels = pixels
        self._dequantize_eval_sets()

    def _dequantize_eval_sets(self) -> None:
        if self.pixels == "dequantized" and not self._dequantized and self.val_set is not None:
            self.val_set = InMemoryImages(dequantize_once(self.val_set.images, self.split_seed + 2))
            self.test_set = InMemoryImages(dequantize_once(self.test_set.images, self.split_seed + 3))
            self._dequantized = True  # new sets: a split other members share (a stacked sweep's) is not touched

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self._build()
            self._dequantize_eval_sets()
        if stage in (None, "fit") and self.batch_size > len(self.train_set):  # (evaluation needs no training batch)
            raise ConfigError(
                f"data.batch_size={self.batch_size} is larger than the {len(self.train_set)} training images; "
                "lower data.batch_size or raise data.subset"
            )
        device = self.device
        if device == "auto":  # the trainer's GPU, once a trainer is attached; host memory otherwise
            trainer = getattr(self, "trainer", None)
            root = trainer.strategy.root_device if trainer is not None else None
            device = root if root is not None and root.type == "cuda" else None
        if device is not None:  # a GPU-resident data set: batches are cut where the model runs, nothing crosses the bus
            self.train_set, self.val_set, self.test_set = _on_device((self.train_set, self.val_set, self.test_set),
                                                                     device)

    def _build(self) -> None:
        key = self._split_key()
        if self.source.reader:  # your own files, which may change between two runs of one process: read each time
            self._split()
            return
        if key in _BUILT:  # the same split built in this process (a stacked sweep's members): one copy of the images
            self.image_shape, self.train_set, self.val_set, self.test_set, said = _BUILT[key]
            if said and rank_zero_only.rank == 0:
                say(said)
            return
        said = self._split()
        _BUILT.clear()  # the newest split only: a sweep run job after job holds one data set, not one per job
        _BUILT[key] = (self.image_shape, self.train_set, self.val_set, self.test_set, said)

    def _split_key(self) -> str:
        """What fixes the split's images (not data.seed, the training order, nor the batch sizes)."""
        import json

        hp = {k: v for k, v in self.hparams.items() if k not in ("seed", "batch_size", "eval_batch_size", "device",
                                                                   "download")}
        return json.dumps(hp, sort_keys=True, default=str)

    def _split(self) -> str | None:
        """Read, split, cut and binarise the images; return the line that says the split (auto or a fraction)."""
        train_all, test = (torch.from_numpy(np.ascontiguousarray(a)) for a in self._raw())
        self.image_shape = tuple(int(d) for d in train_all.shape[1:])
        n = train_all.shape[0]
        n_val = val_count(self.val_size, n)
        if n_val >= n:
            fits = val_count("auto", n)
            raise ConfigError(f"data.val_size={self.val_size} leaves no training images out of {n}; use fewer, "
                              f"e.g. data.val_size=auto ({fits:,} images) or a fraction such as data.val_size=0.1")
        said = None
        if self.val_size != n_val:  # auto or a fraction: the split it gave, said once
            said = (f"vaelab: {n:,} training images: {n - n_val:,} to train, {n_val:,} to validate "
                    f"(data.val_size={self.val_size})")
            if rank_zero_only.rank == 0:
                say(said)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        train, val = train_all[perm[n_val:]], train_all[perm[:n_val]]
        if self.subset:
            train, val, test = train[: self.subset], val[: self.subset], test[: self.subset]
        if self.test_subset:
            test = test[: self.test_subset]
        if self.binarize == "static":
            train = binarize_once(train, self.split_seed + 1)
        if self.is_binary:  # evaluation sets are binarised once, with a fixed seed
            val, test = binarize_once(val, self.split_seed + 2), binarize_once(test, self.split_seed + 3)
        self.train_set, self.val_set, self.test_set = InMemoryImages(train), InMemoryImages(val), InMemoryImages(test)
        return said

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

    def use_execution_plan(self, plan: ExecutionPlan | None) -> None:
        """Cut training batches as executions of `plan` (batches.py); the training module hands its plan over
        when it sets up its optimiser. None: one plain batch per step."""
        self.execution_plan = plan

    def train_dataloader(self) -> InMemoryLoader:
        """Executions of the `execution_plan` the training module handed over (steps per execution, and whether to
        hand over image indices on the device instead of images); one batch per step without one. With the
        trainer's overfit_batches, the same batches every epoch: no shuffling, the same binarisation draws."""
        rank, world = self._distributed()
        trainer = self.trainer
        plan = self.execution_plan
        overfit = trainer is not None and trainer.overfit_batches > 0
        return InMemoryLoader(
            self.train_set, self.batch_size, shuffle=not overfit, dynamic_binarize=self.binarize == "dynamic",
            dequantize=self.pixels == "dequantized",
            seed=self.seed, rank=rank, world_size=world,
            epoch_fn=(lambda: trainer.current_epoch) if trainer and not overfit else None,
            position_fn=(lambda: trainer.fit_loop.epoch_loop.batch_progress.current.ready) if trainer else None,
            steps_per_execution=getattr(plan, "steps", None), indices_on=getattr(plan, "indices_on", None),
        )

    def train_batch(self, indices: Tensor) -> Tensor:
        """Training images at these indices, as floats, binarised (binarize=dynamic) or dequantised afresh (default
        generator): what the step engine cuts on the device, inside a CUDA graph too."""
        x = self.train_set.__getitems__(indices)
        if self.binarize == "dynamic":
            return bernoulli_draw(x)
        return dequantize_draw(x) if self.pixels == "dequantized" else x

    def val_dataloader(self) -> InMemoryLoader:
        rank, world = self._distributed()
        return InMemoryLoader(self.val_set, self.eval_batch_size, rank=rank, world_size=world)

    def test_dataloader(self) -> InMemoryLoader:
        """Test batches are (images, their indices in the test set): the indices key the importance
        sampling noise, so test/nll does not depend on batching or on the number of processes."""
        rank, world = self._distributed()
        return InMemoryLoader(self.test_set, self.eval_batch_size, with_index=True, rank=rank, world_size=world)
