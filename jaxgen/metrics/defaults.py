"""Default options of the metrics, in one place.

The Python API (:func:`~jaxgen.metrics.kid`, :func:`~jaxgen.metrics.prdc`,
:func:`~jaxgen.metrics.inception_score`, :func:`~jaxgen.metrics.fid_infinity`,
:func:`~jaxgen.metrics.is_infinity`, :func:`~jaxgen.metrics.evaluate`,
:func:`~jaxgen.metrics.score_features`) takes its default arguments from here,
and ``python -m jaxgen.evaluate`` its flags' defaults, so the two cannot drift.
"""

from __future__ import annotations

KID_SUBSETS = 100
"""KID: number of random subsets (torch-fidelity's ``kid_subsets``)."""

KID_SUBSET_SIZE = 1000
"""KID: rows per subset (torch-fidelity's ``kid_subset_size``)."""

PR_K = 3
"""Precision/recall: k of the k-NN radii (Kynkäänniemi et al. 2019)."""

DC_K = 5
"""Density/coverage: k of the k-NN radii (Naeem et al. 2020)."""

IS_SPLITS = 10
"""Inception Score: chunks the mean and std are taken over (Salimans et al. 2016)."""

IS_SEED: int | None = None
"""Inception Score: seed of the row shuffle before splitting; ``None`` keeps the rows in
the order given, as the original IS code (openai/improved-gan) and the ADM evaluator
do, and as ``jaxgen.evaluate`` has always scored. torch-fidelity shuffles with
``rng_seed=2020``: pass ``2020`` to reproduce its numbers."""

INF_POINTS = 15
"""FID-inf / IS-inf: sample counts the line is fitted through (Chong & Forsyth 2020)."""

INF_MIN_N = 5000
"""FID-inf / IS-inf: the smallest sample count (the reference: 5000 of 50000)."""

IS_INF_SPLITS = 1
"""IS-inf: chunks per IS_N (the reference code uses one)."""

SEED = 0
"""Seed of KID's subset draws and of FID-inf's / IS-inf's subsets."""
