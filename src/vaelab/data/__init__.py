"""Data: the registry of sources (sources.py), the in-memory loader (loader.py) and the LightningDataModule
that splits, binarises and serves them (module.py)."""

from vaelab.data.loader import InMemoryImages, InMemoryLoader, bernoulli_draw
from vaelab.data.module import ImageDataModule
from vaelab.data.sources import SOURCES, Source, load_images

__all__ = ["SOURCES", "ImageDataModule", "InMemoryImages", "InMemoryLoader", "Source", "bernoulli_draw",
           "load_images"]
