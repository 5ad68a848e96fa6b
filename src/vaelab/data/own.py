"""Your own images: a folder of PNG/JPEG files (data=folder) or a .npz file of uint8 arrays (data=arrays), read into
the same uint8 [N, C, H, W] arrays as the built-in sets, so that every option those have (binarisation, subset,
validation split, the GPU-resident fast path) works on them. A folder is decoded once and cached beside it, keyed
by its files (names, sizes, modification times) and the options; the cache is rebuilt when either changes."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from vaelab.errors import ConfigError, DataError
from vaelab.files import atomic_write

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CACHE_PREFIX = ".vaelab-cache-"
MODES = {1: "L", 3: "RGB"}
TOLERATED_UNREADABLE = 0.01  # up to 1% of a folder's images may be unreadable: skipped, with a warning


def _size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = (int(v) for v in image_size)
    return h, w


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith(CACHE_PREFIX))


def _splits(root: Path, test_fraction: float, split_seed: int) -> tuple[list[Path], list[Path]]:
    """(train files, test files): the train/ and test/ subfolders, or one folder cut by test_fraction."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        train, test = _image_files(root / "train"), _image_files(root / "test")
        for name, files in (("train", train), ("test", test)):
            if not files:
                raise DataError(f"{root / name} holds no PNG or JPEG images; put the {name} images there")
        return train, test
    files = _image_files(root)
    if not files:
        others = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(CACHE_PREFIX)]
        what = f"{len(others)} files but no PNG or JPEG images" if others else "no files"
        raise DataError(f"data.path={root} holds {what}; put images in it (or in train/ and test/ subfolders)")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"data.test_fraction={test_fraction} must be between 0 and 1 (the share of {root}'s images "
                          "kept for testing), or give the folder train/ and test/ subfolders")
    order = np.random.default_rng(split_seed).permutation(len(files))
    n_test = max(1, round(len(files) * test_fraction))
    if n_test >= len(files):
        raise DataError(f"data.path={root} holds {len(files)} image(s): too few to keep {n_test} for testing; "
                        "add images or lower data.test_fraction")
    test = sorted(files[i] for i in order[:n_test])
    train = sorted(files[i] for i in order[n_test:])
    return train, test


def _decode(path: Path, channels: int | None, size: tuple[int, int] | None):
    """(array [C, H, W] uint8, mode, (H, W)) of one image, converted and resized as asked; None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            mode, shape = img.mode, (img.height, img.width)
            if channels is not None or mode not in ("L", "RGB"):
                target = MODES.get(channels or (1 if mode in ("1", "L", "LA", "I", "I;16", "F") else 3))
                img = img.convert(target)
            if size is not None and (img.height, img.width) != size:
                img = img.resize((size[1], size[0]), Image.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError):
        return None
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return array, mode, shape


def _read(files: list[Path], channels: int | None, size: tuple[int, int] | None, root: Path) -> np.ndarray:
    images, bad, first = [], [], None
    for path in files:
        decoded = _decode(path, channels, size)
        if decoded is None:
            bad.append(path)
            continue
        array, mode, shape = decoded
        if first is None:
            first = (path, array.shape, mode)
        elif array.shape != first[1]:
            key = "data.image_size" if array.shape[1:] != first[1][1:] else "data.channels"
            raise DataError(f"{path} is {mode} {shape[1]}x{shape[0]} but {first[0]} is {first[2]} "
                            f"{first[1][2]}x{first[1][1]}: images of one data set must match; set {key} to convert "
                            "them all")
        images.append(array)
    if bad:
        names = ", ".join(str(p.relative_to(root)) for p in bad[:3])
        if len(bad) > TOLERATED_UNREADABLE * len(files) or not images:
            raise DataError(f"{bad[0]} cannot be read as an image (unreadable or truncated; {len(bad)} of "
                            f"{len(files)} files in all); replace or remove it")
        log.warning("%d of %d images in %s cannot be read and are left out: %s%s", len(bad), len(files), root, names,
                    " ..." if len(bad) > 3 else "")
    return np.stack(images)


def _cache_key(train: list[Path], test: list[Path], options: dict) -> str:
    h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
    for split, files in (("train", train), ("test", test)):
        for p in files:
            st = p.stat()
            h.update(f"{split}\0{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def folder_images(path, channels: int | None = None, image_size=None, test_fraction: float = 0.1,
                  split_seed: int = 0, cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 [N, C, H, W] from a folder of images (data=folder)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise DataError(f"data.path={path} is not a folder; give data=folder the folder of your images")
    if channels is not None and channels not in MODES:
        raise ConfigError(f"data.channels={channels} must be 1 (grey) or 3 (RGB)")
    size = _size(image_size)
    train_files, test_files = _splits(root, test_fraction, split_seed)
    options = {"channels": channels, "image_size": size, "test_fraction": test_fraction, "split_seed": split_seed}
    key = _cache_key(train_files, test_files, options)
    cached = root / f"{CACHE_PREFIX}{key}.npz"
    if cache and cached.is_file():
        try:
            with np.load(cached) as saved:
                return saved["train"], saved["test"]
        except (OSError, ValueError, KeyError):
            log.warning("%s is damaged; decoding %s again", cached, root)
    train, test = _read(train_files, channels, size, root), _read(test_files, channels, size, root)
    if train.shape[1:] != test.shape[1:]:
        raise DataError(f"the train images are {train.shape[1:]} but the test images {test.shape[1:]} ([C, H, W]); "
                        "set data.channels and data.image_size to convert them all")
    if cache:
        _write_cache(root, cached, train, test)
    return train, test


def _write_cache(root: Path, cached: Path, train: np.ndarray, test: np.ndarray) -> None:
    try:
        with atomic_write(cached, "wb") as f:
            np.savez(f, train=train, test=test)
    except OSError as exc:
        log.info("could not cache the decoded images beside %s (%s); they are decoded at every start", root,
                 exc.strerror)
        return
    for old in root.glob(f"{CACHE_PREFIX}*.npz"):  # the images or options changed: older caches are stale
        if old != cached:
            old.unlink(missing_ok=True)
    log.info("decoded %d + %d images from %s; cached in %s", len(train), len(test), root, cached.name)


def array_images(path) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) uint8 [N, C, H, W] from a .npz file's arrays `train` and `test`, [N, H, W] or [N, C, H, W]
    (data=arrays)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.path={path} is not a file; give data=arrays a .npz file with uint8 arrays train and test")
    try:
        with np.load(file, allow_pickle=False) as arrays:
            found = {name: arrays[name] for name in ("train", "test") if name in arrays.files}
            names = list(arrays.files)
    except (OSError, ValueError) as exc:
        raise DataError(f"{file} cannot be read as a .npz file ({str(exc).splitlines()[0]}); save it with "
                        "numpy.savez(path, train=..., test=...)") from None
    out = []
    for name in ("train", "test"):
        if name not in found:
            raise DataError(f"{file} has no array '{name}' (it has {', '.join(names) or 'none'}); save it with "
                            "numpy.savez(path, train=..., test=...)")
        a = found[name]
        if a.dtype != np.uint8:
            raise DataError(f"{file}'s '{name}' array is {a.dtype}; vaelab takes uint8 grey levels 0-255: save "
                            "(images * 255).round().astype('uint8')")
        if a.ndim not in (3, 4) or a.shape[0] == 0:
            raise DataError(f"{file}'s '{name}' array has shape {a.shape}; vaelab takes [N, H, W] or [N, C, H, W]")
        a = a[:, None] if a.ndim == 3 else a
        if a.shape[1] not in MODES:
            raise DataError(f"{file}'s '{name}' array has {a.shape[1]} channels (shape {a.shape}); vaelab takes "
                            "[N, C, H, W] with C = 1 or 3 (a channels-last array: move its last axis to 1)")
        out.append(np.ascontiguousarray(a))
    if out[0].shape[1:] != out[1].shape[1:]:
        raise DataError(f"{file}'s train images are {out[0].shape[1:]} but its test images {out[1].shape[1:]} "
                        "([C, H, W]); they must match")
    return out[0], out[1]
