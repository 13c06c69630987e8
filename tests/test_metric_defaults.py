"""The metric options' defaults live in jaxgen.metrics.defaults; API and CLI both read them."""

from __future__ import annotations

import inspect

import pytest

from jaxgen import evaluate as cli
from jaxgen import metrics
from jaxgen.metrics import defaults

# (function, argument) -> the defaults constant it must use.
API = {
    (metrics.kid, "subsets"): "KID_SUBSETS",
    (metrics.kid, "subset_size"): "KID_SUBSET_SIZE",
    (metrics.kid, "seed"): "SEED",
    (metrics.prdc, "k_pr"): "PR_K",
    (metrics.prdc, "k_dc"): "DC_K",
    (metrics.precision_recall, "k"): "PR_K",
    (metrics.density_coverage, "k"): "DC_K",
    (metrics.inception_score, "splits"): "IS_SPLITS",
    (metrics.inception_score, "seed"): "IS_SEED",
    (metrics.fid_infinity, "num_points"): "INF_POINTS",
    (metrics.fid_infinity, "min_n"): "INF_MIN_N",
    (metrics.fid_infinity, "seed"): "SEED",
    (metrics.is_infinity, "num_points"): "INF_POINTS",
    (metrics.is_infinity, "min_n"): "INF_MIN_N",
    (metrics.is_infinity, "seed"): "SEED",
    (metrics.is_infinity, "splits"): "IS_INF_SPLITS",
}
# evaluate / score_features argument == CLI flag dest -> the defaults constant.
SHARED = {"kid_subsets": "KID_SUBSETS", "kid_subset_size": "KID_SUBSET_SIZE", "pr_k": "PR_K",
          "dc_k": "DC_K", "is_splits": "IS_SPLITS", "is_seed": "IS_SEED",
          "inf_points": "INF_POINTS", "inf_min_n": "INF_MIN_N", "seed": "SEED"}


@pytest.mark.parametrize(("fn", "arg"), API, ids=[f"{f.__name__}.{a}" for f, a in API])
def test_api_defaults_come_from_the_defaults_module(fn, arg):
    assert inspect.signature(fn).parameters[arg].default is getattr(defaults, API[fn, arg])


@pytest.mark.parametrize("fn", [metrics.evaluate, metrics.score_features])
def test_evaluate_and_cli_share_the_defaults(fn):
    args = cli.parse_args(["real.npz", "fake.npz"])
    params = inspect.signature(fn).parameters
    for arg, name in SHARED.items():
        assert params[arg].default is getattr(defaults, name), arg
        assert getattr(args, arg) is getattr(defaults, name), f"--{arg.replace('_', '-')}"


def test_inception_score_seed_is_the_evaluator_order():
    """The documented choice: rows in order (original IS code, ADM), as evaluate scores."""
    assert defaults.IS_SEED is None
