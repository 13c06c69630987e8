"""Evaluation: Inception-v3 features (TF-FID graph), statistics and metrics."""

from jaxgen.metrics.cmmd import cmmd
from jaxgen.metrics.evaluate import METRICS, evaluate, score_features
from jaxgen.metrics.features import FeatureExtractor, extract_features
from jaxgen.metrics.fid import frechet_distance
from jaxgen.metrics.fid_infinity import Extrapolation, fid_infinity, is_infinity
from jaxgen.metrics.inception import InceptionV3
from jaxgen.metrics.inception_score import inception_score
from jaxgen.metrics.kid import kid
from jaxgen.metrics.prdc import density_coverage, prdc, precision_recall
from jaxgen.metrics.qmc import sobol_normal
from jaxgen.metrics.stats import GaussianStats, MomentAccumulator, read_npz, save_stats
from jaxgen.metrics.weights import load_inception

__all__ = [
    "METRICS",
    "Extrapolation",
    "FeatureExtractor",
    "GaussianStats",
    "InceptionV3",
    "MomentAccumulator",
    "cmmd",
    "density_coverage",
    "evaluate",
    "extract_features",
    "fid_infinity",
    "frechet_distance",
    "inception_score",
    "is_infinity",
    "kid",
    "load_inception",
    "prdc",
    "precision_recall",
    "read_npz",
    "save_stats",
    "score_features",
    "sobol_normal",
]
