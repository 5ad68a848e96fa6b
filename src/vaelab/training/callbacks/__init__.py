"""Lightning callbacks, one file per purpose: image grids (grids.py), stop signals and requeues
(preemption.py), progress lines and throughput (progress.py)."""

from vaelab.training.callbacks.grids import ImageGrids, log_image
from vaelab.training.callbacks.preemption import Preempted, Preemption
from vaelab.training.callbacks.progress import LineProgress, ThrottledProgressBar, Throughput

__all__ = ["ImageGrids", "LineProgress", "Preempted", "Preemption", "ThrottledProgressBar", "Throughput", "log_image"]
