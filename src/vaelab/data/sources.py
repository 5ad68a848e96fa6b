"""Where images come from: one registry of sources, and the search for their files.

A data set is found, in order: in an existing torchvision root (`data.root`); in a Debian package's IDX files
(dataset-fashion-mnist ships them in /usr/share/datasets/fashion-mnist), decompressed into torchvision's
`raw/` layout; by torchvision's download when online. Adding a data set is one `SOURCES` entry and one
conf/data/<name>.yaml that inherits conf/data/common.yaml.
"""

from __future__ import annotations

import gzip
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vaelab.errors import DataError

log = logging.getLogger(__name__)

IDX_FILES = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class Source:
    """One data set: its shape, where torchvision keeps it, and where a Debian package puts it."""

    title: str
    image_shape: tuple[int, int, int] | None  # [C, H, W]; None: as the user's images are (data=folder, arrays)
    torchvision_class: str | None = None  # class name in torchvision.datasets; None: generated images
    folder: str = ""  # torchvision's folder under the root
    idx: bool = False  # kept as IDX files in <root>/<folder>/raw/, checked for damage before reading
    debian_dir: str | None = None  # where a Debian package puts the IDX .gz files
    debian_package: str | None = None
    reader: str | None = None  # "folder" | "arrays": the user's own images at data.path (data/own.py)

    @property
    def channels(self) -> int | None:
        return self.image_shape[0] if self.image_shape else None

    @property
    def generated(self) -> bool:
        return self.torchvision_class is None and self.reader is None


SOURCES = {
    "fashion_mnist": Source("Fashion-MNIST", (1, 28, 28), "FashionMNIST", "FashionMNIST", idx=True,
                            debian_dir="/usr/share/datasets/fashion-mnist", debian_package="dataset-fashion-mnist"),
    "mnist": Source("MNIST", (1, 28, 28), "MNIST", "MNIST", idx=True),
    "cifar10": Source("CIFAR-10", (3, 32, 32), "CIFAR10", "cifar-10-batches-py"),
    "synthetic": Source("synthetic shapes (unit tests only)", (1, 28, 28)),
    "folder": Source("your images (a folder of PNG/JPEG files)", None, reader="folder"),
    "arrays": Source("your images (uint8 arrays in a .npz file)", None, reader="arrays"),
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


def is_checkout(folder: Path) -> bool:
    """Whether `folder` is a vaelab source checkout (its pyproject.toml names the project vaelab)."""
    try:
        return 'name = "vaelab"' in (folder / "pyproject.toml").read_text()
    except OSError:
        return False


_SAID_WHERE = False


def default_data_dir() -> str:
    """Where data sets go when neither VAELAB_DATA_DIR nor data.root says: ./data in a vaelab checkout (README's
    `make data` puts Fashion-MNIST there); anywhere else a per-user cache ($XDG_CACHE_HOME/vaelab/data, by
    default ~/.cache/vaelab/data), said once per process, rather than a new data/ folder wherever one launches."""
    if is_checkout(Path.cwd()):
        return "data"
    return str(_cache_dir())


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vaelab" / "data"


def _say_if_cache(root: Path) -> None:
    """Once per process, when a data set is read from the per-user cache (not for data.root, VAELAB_DATA_DIR or
    a checkout's data/, nor for data that no root holds: arrays, folders, synthetic)."""
    global _SAID_WHERE
    if not _SAID_WHERE and Path(root).resolve() == _cache_dir().resolve():
        _SAID_WHERE = True
        log.info("vaelab keeps data sets in %s (VAELAB_DATA_DIR or data.root choose another place)", root)


def _new_folders(root: Path, src: Source) -> list[Path]:
    """The folders a download into `root` would create that do not exist yet (to remove after a failed one)."""
    chain = [root / src.folder / "raw", root / src.folder, root, *root.parents]
    return [p for p in chain if not p.exists()]


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            pass


def _download(src: Source, root: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """torchvision's download, quietly: its progress and error prints never reach the console; after a failure no
    folder it created is left behind. None when it fails."""
    import contextlib
    import io

    created = _new_folders(root, src)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            return _torchvision_split(src, root, True, True), _torchvision_split(src, root, False, True)
    except Exception as exc:  # noqa: BLE001 - any network failure means the same thing here
        log.debug("download of %s failed: %s", src.title, exc)
        for folder in created[:3]:  # what the attempt left: partial files of this data set, then empty folders
            if folder.is_dir() and folder.name == "raw":
                for part in folder.iterdir():
                    if part.is_file() and not part.name.endswith(tuple(IDX_FILES)):
                        part.unlink(missing_ok=True)
        _remove_if_empty(created)
        return None


def load_images(name: str, root: str | os.PathLike, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(official train images, official test images) as uint8 [N, C, H, W], from the first source that works."""
    src = SOURCES[name]
    root = Path(root)
    _say_if_cache(root)
    damaged = _damaged_idx(src, root) if src.idx else []
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
    if download and (found := _download(src, root)) is not None:  # 3. torchvision's download
        return found
    ways = [f"point data.root (or VAELAB_DATA_DIR) at the folder that holds torchvision's {src.folder}/"]
    if src.debian_package:
        ways.insert(0, f"install Debian's package ({src.debian_package}, e.g. `make data` as root)")
    ways.append("run once with network access and data.download=true" if not download
                else "run once with network access so torchvision can download it")
    raise DataError(f"{src.title} was not found under data.root={root}: {', '.join(ways[:-1])}, or {ways[-1]}.")


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


def main() -> None:
    """`python -m vaelab.data [name] [root]`: make a data set available (used by `make data`)."""
    import sys

    name = sys.argv[1] if len(sys.argv) > 1 else "fashion_mnist"
    root = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("VAELAB_DATA_DIR") or default_data_dir()
    try:
        train, test = load_images(name, root, download=True)
    except DataError as exc:
        sys.exit(f"error: {exc}")
    print(f"{SOURCES[name].title}: {len(train)} training and {len(test)} test images under {root}")

