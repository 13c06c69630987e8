"""Evaluation: Inception-v3 features (TF-FID graph), statistics and metrics."""

from jaxgen.metrics.fid import frechet_distance
from jaxgen.metrics.stats import GaussianStats, MomentAccumulator, read_npz, save_stats

__all__ = ["GaussianStats", "MomentAccumulator", "frechet_distance", "read_npz", "save_stats"]
