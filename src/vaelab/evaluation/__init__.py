"""Evaluation: one bundle of metrics for validation, test and vaelab-eval alike (metrics.py: -ELBO's terms,
the importance-sampled NLL with common random numbers from noise.py, bits/dim, active units), and the image
grids that show what a model learned (grids.py)."""

from vaelab.evaluation.metrics import EvalMetrics, evaluate, importance_log_weights

__all__ = ["EvalMetrics", "evaluate", "importance_log_weights"]
