"""Data: the registry of sources (sources.py), the in-memory loader (loader.py), what its training batches hold
(batches.py) and the LightningDataModule that splits, binarises and serves them (module.py)."""

from vaelab.data.batches import ExecutionPlan, batch_counts, execution_plan_of, step_images
from vaelab.data.loader import InMemoryImages, InMemoryLoader, bernoulli_draw
from vaelab.data.module import ImageDataModule
from vaelab.data.sources import SOURCES, Source, load_images

__all__ = ["SOURCES", "ExecutionPlan", "ImageDataModule", "InMemoryImages", "InMemoryLoader", "Source", "batch_counts", "bernoulli_draw",
           "execution_plan_of", "load_images", "step_images"]
