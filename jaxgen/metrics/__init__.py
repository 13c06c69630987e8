"""Evaluation: Inception-v3 features (TF-FID graph), statistics and metrics."""

from jaxgen.metrics.fid import frechet_distance
from jaxgen.metrics.fid_infinity import Extrapolation, fid_infinity, is_infinity
from jaxgen.metrics.inception_score import inception_score
from jaxgen.metrics.kid import kid
from jaxgen.metrics.prdc import density_coverage, prdc, precision_recall
from jaxgen.metrics.qmc import sobol_normal
from jaxgen.metrics.stats import GaussianStats, MomentAccumulator, read_npz, save_stats

__all__ = ["GaussianStats", "MomentAccumulator", "frechet_distance", "read_npz", "save_stats"]
__all__ += ["Extrapolation", "fid_infinity", "inception_score", "is_infinity", "kid"]
__all__ += ["density_coverage", "prdc", "precision_recall", "sobol_normal"]
