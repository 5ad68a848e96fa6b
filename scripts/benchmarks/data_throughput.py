"""Data path: batches per second of vaelab's in-memory loader against torchvision's per-image Dataset +
DataLoader with ToTensor, both yielding dynamically binarised Fashion-MNIST training batches of 100.

    python scripts/benchmarks/data_throughput.py [--batches 500]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import DATA, save, table

from vaelab.data import ImageDataModule, InMemoryLoader


def rate(iterable, batches: int, binarize=None) -> float:
    it = iter(iterable)
    next(it)  # start-up (worker spawn, first index) is not throughput
    t0 = time.perf_counter()
    for _ in range(batches):
        x = next(it)
        x = x[0] if isinstance(x, (list, tuple)) else x
        if binarize:
            x = torch.bernoulli(x)
    return batches / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args()
    import torchvision
    from torchvision.transforms import ToTensor

    dm = ImageDataModule(root=str(DATA), batch_size=args.batch_size)
    dm.setup()
    ours = rate(InMemoryLoader(dm.train_set, args.batch_size, shuffle=True, dynamic_binarize=True), args.batches)
    tv = torchvision.datasets.FashionMNIST(str(DATA), train=True, download=False, transform=ToTensor())
    rows = [{"loader": "vaelab InMemoryLoader", "batches/s": round(ours, 1),
             "images/s": round(ours * args.batch_size)}]
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(tv, batch_size=args.batch_size, shuffle=True, num_workers=workers,
                                             persistent_workers=workers > 0)
        r = rate(loader, args.batches, binarize=True)
        rows.append({"loader": f"torchvision Dataset+DataLoader+ToTensor, {workers} workers",
                     "batches/s": round(r, 1), "images/s": round(r * args.batch_size)})
    for row in rows[1:]:
        row["vaelab speed-up"] = round(ours / row["batches/s"], 1)
    table(rows, ["loader", "batches/s", "images/s", "vaelab speed-up"])
    save("data_throughput", {"batch_size": args.batch_size, "batches": args.batches, "rows": rows})


if __name__ == "__main__":
    main()
