"""One pass of Inception features over REAL and FAKE feeds every requested metric.

As torch-fidelity does, each side's images run through the network once;
the float64 statistics (FID, sFID) are accumulated on the fly and the full
feature arrays are kept only for the metrics that need them (KID,
precision/recall, density/coverage, FID-infinity, IS). A side may also be a
statistics file, in which case no image of it is read.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
from jax.sharding import Mesh

from jaxgen.data import ArraySource, FirstN, ImageSource, open_source
from jaxgen.errors import InputError
from jaxgen.files import as_path, is_local
from jaxgen.metrics import defaults
from jaxgen.metrics.feature_pass import feature_pass
from jaxgen.metrics.features import FeatureExtractor, default_batch_size
from jaxgen.metrics.fid import frechet_distance
from jaxgen.metrics.fid_infinity import fid_infinity, is_infinity
from jaxgen.metrics.inception_score import inception_score
from jaxgen.metrics.kid import kid
from jaxgen.metrics.prdc import prdc
from jaxgen.metrics.stats import (
    INCEPTION_POOL3,
    INCEPTION_SPATIAL,
    GaussianStats,
    check_comparable,
    read_npz,
)

METRICS = ("fid", "sfid", "is", "kid", "pr", "dc", "fid_inf", "is_inf")


@dataclasses.dataclass
class EvalInput:
    """One input of the comparison (the real or the fake side): images to featurise,
    precomputed statistics, or both (an ADM-layout npz)."""

    name: str
    source: ImageSource | None = None
    stats: GaussianStats | None = None
    spatial: GaussianStats | None = None


def open_eval_input(
    x: str | os.PathLike | np.ndarray | ImageSource | GaussianStats,
    name: str,
    num: int | None = None,
) -> EvalInput:
    """Interpret one evaluation input.

    Accepts an :class:`ImageSource`, a uint8 image array, a
    :class:`GaussianStats`, a statistics ``.npz`` (pytorch-fid's ``mu``/``sigma``
    or the ADM evaluator's, whose images in ``arr_0`` are used when a metric
    needs features), or any spec :func:`jaxgen.data.open_source` accepts.
    ``num`` keeps only the first ``num`` images. Fewer than 2 images is an error.
    """
    side = _open_eval_input(x, name)
    if side.source is not None:
        if num is not None:
            side.source = FirstN(side.source, num)
        if len(side.source) < 2:
            raise InputError(
                f"{side.source.name}: holds {len(side.source)} image(s); "
                "statistics need at least 2."
            )
    elif num is not None:
        raise InputError(f"{side.name}: a statistics file cannot be limited to {num} images.")
    return side


def _open_eval_input(x, name: str) -> EvalInput:
    if isinstance(x, GaussianStats):
        return EvalInput(name, stats=x)
    if isinstance(x, ImageSource):
        return EvalInput(name, source=x)
    if isinstance(x, np.ndarray):
        return EvalInput(name, source=ArraySource(x, name))
    spec = os.fspath(x)
    path = as_path(os.path.expanduser(spec) if is_local(spec) else spec)
    if path.suffix.lower() == ".npz" and path.is_file():
        keys = read_npz(path)
        if "mu" in keys and "sigma" in keys:
            side = EvalInput(spec, stats=GaussianStats.load(path))
            if "mu_s" in keys and "sigma_s" in keys:
                side.spatial = GaussianStats.load(path, spatial=True)
            if "arr_0" in keys:
                side.source = ArraySource(keys["arr_0"], spec)
            return side
    return EvalInput(spec, source=open_source(spec))


@dataclasses.dataclass
class FeatureRequest:
    """Which features of one :class:`EvalInput` the requested metrics need, as flags
    (the pool3 statistics are always kept)."""

    pool3_stats: bool = False
    spatial_stats: bool = False
    pool3: bool = False
    logits: bool = False

    def any_images(self, side: EvalInput) -> bool:
        """Whether ``side``'s images must run through the network for this request."""
        stats_missing = (self.pool3_stats and side.stats is None) or (
            self.spatial_stats and side.spatial is None
        )
        return self.pool3 or self.logits or stats_missing


def feature_request(metrics: Sequence[str], fake: bool) -> FeatureRequest:
    """What the Inception ``metrics`` need of the real (``fake=False``) or fake side."""
    m = set(metrics)
    return FeatureRequest(
        pool3_stats=bool(m & {"fid", "fid_inf"}),
        spatial_stats="sfid" in m,
        pool3=bool(m & {"kid", "pr", "dc"}) or (fake and "fid_inf" in m),
        logits=fake and bool(m & {"is", "is_inf"}),
    )


def check_logits(module, needs: FeatureRequest) -> None:
    """Refuse IS on Inception weights without the logits layer."""
    if needs.logits and not module.with_logits:
        raise InputError(
            f"IS needs Inception weights with logits; {module.source} has none. Put "
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth in the jaxgen cache "
            "(see `load_inception`)."
        )


def featurize(
    side: EvalInput,
    needs: FeatureRequest,
    extractor: FeatureExtractor,
    *,
    progress: bool = True,
) -> dict[str, np.ndarray | GaussianStats]:
    """Run ``side``'s images through the network once and collect what ``needs`` asks for."""
    if side.source is None:
        raise InputError(
            f"{side.name}: is a statistics file without images, but the requested metrics need "
            "per-image features; give the images instead."
        )
    check_logits(extractor.module, needs)
    return feature_pass(side.source, [extractor], INCEPTION_STATS, inception_rows(needs),
                        name=side.name, progress=progress)


INCEPTION_STATS = {"pool3": INCEPTION_POOL3, "spatial": INCEPTION_SPATIAL}
"""The statistics every Inception pass accumulates (FID's and sFID's), with their protocols."""


def inception_rows(needs: FeatureRequest) -> set[str]:
    """The Inception outputs whose rows ``needs`` keeps."""
    return {k for k in ("pool3", "logits") if getattr(needs, k)}


def evaluate(
    real: str | os.PathLike | np.ndarray | ImageSource | GaussianStats,
    fake: str | os.PathLike | np.ndarray | ImageSource | GaussianStats,
    metrics: Sequence[str] = ("fid",),
    *,
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    inception: tuple | None = None,
    kid_subsets: int = defaults.KID_SUBSETS,
    kid_subset_size: int = defaults.KID_SUBSET_SIZE,
    pr_k: int = defaults.PR_K,
    dc_k: int = defaults.DC_K,
    is_splits: int = defaults.IS_SPLITS,
    is_seed: int | None = defaults.IS_SEED,
    inf_points: int = defaults.INF_POINTS,
    inf_min_n: int = defaults.INF_MIN_N,
    seed: int = defaults.SEED,
    num_real: int | None = None,
    num_fake: int | None = None,
    progress: bool = True,
) -> dict[str, float | int | str]:
    """Compute ``metrics`` between ``real`` and ``fake`` in one pass of features.

    Args:
      real, fake: image folders / arrays / npz / IDX / ``tfds:NAME[:SPLIT]``
        specs, :class:`ImageSource` objects, uint8 arrays, or statistics
        (``GaussianStats`` or an npz with ``mu``/``sigma``).
      metrics: any of ``fid``, ``sfid``, ``is``, ``kid``, ``pr``, ``dc``.
      batch_size: images per device step (all devices together); default
        :func:`jaxgen.metrics.features.default_batch_size`.
      mesh: device mesh; default all devices.
      inception: ``(module, variables)``; default :func:`load_inception`.
      kid_subsets, kid_subset_size: KID's subsets (torch-fidelity's defaults).
      pr_k, dc_k: neighbourhood sizes for precision/recall and density/coverage.
      is_splits: Inception Score splits.
      is_seed: seed of IS's row shuffle; ``None`` keeps the rows in order, as the
        original IS code and the ADM evaluator (2020 reproduces torch-fidelity).
      inf_points, inf_min_n: FID-inf / IS-inf fit at ``inf_points`` sample
        counts from ``inf_min_n`` to all fake images (Chong & Forsyth 2020).
      seed: seed of KID's subset draws and of FID-inf/IS-inf's subsets.
        The defaults of the metric options are :mod:`jaxgen.metrics.defaults`.
      num_real, num_fake: use only the first this many images of a side.
      progress: show a progress bar on stderr.

    Returns:
      A flat dict: each requested metric's keys (``fid``, ``sfid``,
      ``is_mean``/``is_std``, ``kid_mean``/``kid_std``, ``precision``/
      ``recall``, ``density``/``coverage``, ``fid_inf``/``is_inf`` with
      ``fid_inf_points``/``is_inf_points`` as ``[[N, score], ...]``),
      ``n_real``, ``n_fake`` and
      ``weights`` (which Inception weights were used).
    """
    metrics = list(dict.fromkeys(metrics))
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise InputError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}.")
    sides = {
        "real": open_eval_input(real, "real", num_real),
        "fake": open_eval_input(fake, "fake", num_fake),
    }
    check_stats_protocols(sides, metrics)
    if {"is", "is_inf", "fid_inf"} & set(metrics) and sides["fake"].source is None:
        raise InputError(
            f"{sides['fake'].name}: IS, IS-inf and FID-inf need the fake images, not statistics."
        )
    if {"is_inf", "fid_inf"} & set(metrics) and len(sides["fake"].source) <= inf_min_n:
        raise InputError(  # before the feature pass, which would find it out at its end
            f"{sides['fake'].name}: FID-inf/IS-inf fit scores at N from inf_min_n={inf_min_n} "
            f"(--inf-min-n) to the {len(sides['fake'].source)} fake images; lower it below "
            f"{len(sides['fake'].source)} or generate more (the reference: 50000 from 5000)."
        )
    if inception is None:
        from jaxgen.metrics.weights import load_inception

        inception = load_inception()
    check_logits(inception[0], feature_request(metrics, fake=True))
    todo = {
        k: s for k, s in sides.items()
        if feature_request(metrics, fake=k == "fake").any_images(s)
    }
    if todo:
        # No step larger than the data: padding 6 images to 100 would waste 94 images of work.
        batch_size = batch_size or default_batch_size(mesh)
        largest = max(
            (len(s.source) for s in todo.values() if s.source is not None), default=batch_size
        )
        extractor = FeatureExtractor(*inception, batch_size=min(batch_size, largest), mesh=mesh)
    feats: dict[str, dict] = {}
    for key, side in sides.items():
        if key in todo:
            feats[key] = featurize(
                side, feature_request(metrics, fake=key == "fake"), extractor, progress=progress
            )
        else:
            feats[key] = {}
        if side.stats is not None and "pool3_stats" not in feats[key]:
            feats[key]["pool3_stats"] = side.stats
        if side.spatial is not None and "spatial_stats" not in feats[key]:
            feats[key]["spatial_stats"] = side.spatial
    real_f, fake_f = feats["real"], feats["fake"]
    for key, f in feats.items():
        if "sfid" in metrics and "spatial_stats" not in f:
            raise InputError(
                f"{sides[key].name}: sFID needs mu_s/sigma_s (ADM layout) or the images."
            )
    out = score_features(
        real_f,
        fake_f,
        metrics,
        mesh=mesh,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        pr_k=pr_k,
        dc_k=dc_k,
        is_splits=is_splits,
        is_seed=is_seed,
        inf_points=inf_points,
        inf_min_n=inf_min_n,
        seed=seed,
    )
    out["n_real"] = _count(sides["real"], real_f)
    out["n_fake"] = _count(sides["fake"], fake_f)
    out["weights"] = inception[0].source
    return out


def check_stats_protocols(sides: dict[str, EvalInput], metrics: Sequence[str]) -> None:
    """Before any image is read: statistics given as files hold the features the metrics
    compare (FID, FID-inf: Inception ``pool3``; sFID: ``mixed_6/conv``), and the two
    sides' statistics come from one protocol.

    Raises:
      InputError: naming the file(s) and both protocols.
    """
    uses = (("stats", INCEPTION_POOL3, {"fid", "fid_inf"}), ("spatial", INCEPTION_SPATIAL,
                                                              {"sfid"}))
    for attr, want, users in uses:
        asked = sorted(users & set(metrics))
        if not asked:
            continue
        given = {k: getattr(s, attr) for k, s in sides.items() if getattr(s, attr) is not None}
        if len(given) == 2:
            check_comparable(given["real"], given["fake"], sides["real"].name,
                             sides["fake"].name)
        for key, stats in given.items():
            if stats.network not in (None, want):
                other = sides["fake" if key == "real" else "real"].name
                raise InputError(
                    f"{sides[key].name} holds {stats.network} statistics, but {'/'.join(asked)} "
                    f"compares {want} features (of {other}); give statistics of that "
                    "protocol (`python -m jaxgen.fid_stats`) or the images."
                )


def score_features(
    real: dict[str, np.ndarray | GaussianStats],
    fake: dict[str, np.ndarray | GaussianStats],
    metrics: Sequence[str] = ("fid",),
    *,
    mesh: Mesh | None = None,
    kid_subsets: int = defaults.KID_SUBSETS,
    kid_subset_size: int = defaults.KID_SUBSET_SIZE,
    pr_k: int = defaults.PR_K,
    dc_k: int = defaults.DC_K,
    is_splits: int = defaults.IS_SPLITS,
    is_seed: int | None = defaults.IS_SEED,
    inf_points: int = defaults.INF_POINTS,
    inf_min_n: int = defaults.INF_MIN_N,
    seed: int = defaults.SEED,
) -> dict[str, float | int | str | list]:
    """The metrics of :func:`evaluate` from features already extracted (every metric but
    the feature pass; arguments as there).

    Args:
      real, fake: dicts with what ``metrics`` need, as :func:`featurize` returns them:
        ``pool3_stats`` (FID, FID-inf's real side), ``spatial_stats`` (sFID),
        ``pool3`` ``[N, D]`` (KID, PR, DC, FID-inf's fake side) and ``logits``
        (IS, IS-inf; fake only).

    Returns:
      The metric entries of :func:`evaluate`'s dict.
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InputError(f"unknown metric(s) {unknown}; choose from {', '.join(METRICS)}.")
    for name, side in (("real", real), ("fake", fake)):
        needs = feature_request(metrics, fake=name == "fake")
        fields = ("pool3_stats", "spatial_stats", "pool3", "logits")
        missing = [k for k in fields if getattr(needs, k) and k not in side]
        if missing:
            raise InputError(
                f"score_features: the {name} dict lacks {missing}, which metrics "
                f"{list(metrics)} need."
            )
    out: dict[str, float | int | str | list] = {}
    if "fid" in metrics:
        out["fid"] = frechet_distance(real["pool3_stats"], fake["pool3_stats"])
    if "sfid" in metrics:
        out["sfid"] = frechet_distance(real["spatial_stats"], fake["spatial_stats"])
    if "is" in metrics:
        out["is_mean"], out["is_std"] = inception_score(fake["logits"], is_splits, seed=is_seed)
    if "kid" in metrics:
        out["kid_mean"], out["kid_std"] = kid(
            real["pool3"], fake["pool3"], kid_subsets, kid_subset_size, seed, mesh=mesh
        )
    if "pr" in metrics or "dc" in metrics:
        r = prdc(
            real["pool3"],
            fake["pool3"],
            k_pr=pr_k if "pr" in metrics else None,
            k_dc=dc_k if "dc" in metrics else None,
            mesh=mesh,
        )
        out.update({k: float(v) for k, v in r.items()})
    if "fid_inf" in metrics:
        fit = fid_infinity(real["pool3_stats"], fake["pool3"], inf_points, inf_min_n, seed)
        out["fid_inf"], out["fid_inf_points"] = fit.value, _points(fit)
    if "is_inf" in metrics:
        fit = is_infinity(fake["logits"], inf_points, inf_min_n, seed)
        out["is_inf"], out["is_inf_points"] = fit.value, _points(fit)
    return out


def _points(fit) -> list[list[float]]:
    return [[int(n), float(v)] for n, v in zip(fit.n, fit.scores, strict=True)]


def _count(side: EvalInput, f: dict) -> int | None:
    stats = f.get("pool3_stats")
    if side.source is not None:
        return len(side.source)
    return None if stats is None else stats.n
