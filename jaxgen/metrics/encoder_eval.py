"""FD-DINOv2, CMMD and clean-FID, the feature-set metrics on DINOv2 features, and the
Inception metrics asked with them, from one read of each side.

:func:`evaluate_encoders` reads each side's images once and runs every
network the requested metrics need on each batch (the TF-FID Inception,
DINOv2 ViT-L/14, CLIP ViT-L/14-336, the clean-resize Inception;
:mod:`encoder_features`, :func:`jaxgen.metrics.feature_pass.feature_pass`),
accumulating float64 Gaussian statistics and keeping feature rows only where
a metric needs them. ``features="dinov2"`` computes FID, KID,
precision/recall, density/coverage and FID-infinity on the DINOv2 CLS
features instead of Inception's ``pool3`` (their keys keep their names; the
output's ``features`` entry says which network).
"""

from __future__ import annotations

from collections.abc import Sequence

from jax.sharding import Mesh

from jaxgen.errors import InputError
from jaxgen.metrics.cmmd import cmmd
from jaxgen.metrics.encoder_features import (
    clean_inception_forward,
    clip_forward,
    dinov2_forward,
)
from jaxgen.metrics.evaluate import (
    INCEPTION_STATS,
    METRICS,
    check_logits,
    feature_request,
    inception_rows,
    open_eval_input,
    score_features,
)
from jaxgen.metrics.feature_pass import feature_pass
from jaxgen.metrics.features import FeatureExtractor, default_batch_size
from jaxgen.metrics.fid import frechet_distance
from jaxgen.metrics.stats import DINOV2_CLS, INCEPTION_CLEAN

ENCODER_METRICS = ("fd_dinov2", "cmmd", "clean_fid")
DINOV2_FEATURE_METRICS = ("fid", "kid", "pr", "dc", "fid_inf")
FEATURES = ("inception", "dinov2")
_FORWARDS = {"dinov2": dinov2_forward, "clip": clip_forward,
             "clean_pool3": clean_inception_forward}
_PROTOCOLS = {"dinov2": DINOV2_CLS, "clean_pool3": INCEPTION_CLEAN}
_IDENTITY_KEYS = {"dinov2": "dinov2_weights", "clip": "clip_weights",
                  "clean_pool3": "clean_fid_weights"}


def _networks(metrics: set[str], features: str) -> dict[str, bool]:
    """Which encoder networks run, and whether their rows (not just statistics) are kept."""
    on_dinov2 = set(DINOV2_FEATURE_METRICS) & metrics if features == "dinov2" else set()
    nets = {}
    if "fd_dinov2" in metrics or on_dinov2:
        nets["dinov2"] = bool(on_dinov2 - {"fid"})
    if "cmmd" in metrics:
        nets["clip"] = True
    if "clean_fid" in metrics:
        nets["clean_pool3"] = False
    return nets


def evaluate_encoders(
    real,
    fake,
    metrics: Sequence[str],
    *,
    features: str = "inception",
    batch_size: int | None = None,
    mesh: Mesh | None = None,
    inception: tuple | None = None,
    dinov2: tuple | None = None,
    clip: tuple | None = None,
    cmmd_block_size: int = 4096,
    num_real: int | None = None,
    num_fake: int | None = None,
    progress: bool = True,
    **score_kwargs,
) -> dict[str, float | int | str | list]:
    """``fd_dinov2``, ``cmmd``, ``clean_fid``, and any Inception metric, in one pass per side.

    Args:
      real, fake: as :func:`jaxgen.metrics.evaluate` takes them (images; not statistics).
      metrics: at least one of :data:`ENCODER_METRICS` (or, with ``features="dinov2"``, of
        :data:`DINOV2_FEATURE_METRICS`), plus any of :data:`jaxgen.metrics.evaluate.METRICS`,
        which are computed on Inception (``features="dinov2"``: those of
        :data:`DINOV2_FEATURE_METRICS` on DINOv2) from the same read of the images.
      features: ``"dinov2"`` to compute the feature-set metrics on DINOv2 features.
      batch_size, mesh: as for :func:`jaxgen.metrics.evaluate`.
      inception, dinov2, clip: ``(module, variables)`` or ``(module, variables, identity)``;
        default :func:`load_inception` / :func:`load_dinov2` / :func:`load_clip`.
      cmmd_block_size: CMMD's kernel block (memory ``16 * block^2`` bytes).
      num_real, num_fake: use only the first this many images of a side.
      progress: show a progress bar on stderr.
      **score_kwargs: KID / PR / DC / IS / FID-inf options of :func:`score_features`.

    Returns:
      A flat dict with ``fd_dinov2``, ``cmmd``, ``clean_fid``, the DINOv2-feature and
      Inception metrics' keys as asked, the weights' identities (``dinov2_weights``,
      ``clip_weights``, ``clean_fid_weights``, ``weights`` for Inception's metrics) and
      ``features``.
    """
    if features not in FEATURES:
        raise InputError(f"features must be one of {FEATURES}, got {features!r}.")
    metrics = list(dict.fromkeys(metrics))
    m = set(metrics)
    on_dinov2 = set(DINOV2_FEATURE_METRICS) if features == "dinov2" else set()
    on_inception = [x for x in metrics if x in METRICS and x not in on_dinov2]
    nets = _networks(m, features)
    unknown = m - set(ENCODER_METRICS) - set(METRICS)
    if unknown or not nets:
        raise InputError(
            f"metric(s) {sorted(unknown or m)} cannot be computed here; choose from "
            f"{sorted(set(ENCODER_METRICS) | set(METRICS))}, with at least one of "
            f"{sorted(set(ENCODER_METRICS) | on_dinov2)} (the rest: jaxgen.metrics.evaluate)."
        )
    sides = {"real": open_eval_input(real, "real", num_real),
             "fake": open_eval_input(fake, "fake", num_fake)}
    for side in sides.values():
        if side.source is None:
            raise InputError(f"{side.name}: FD-DINOv2, CMMD and clean-FID need the images, not "
                             "statistics.")
    loaded, out = {}, {"features": features}
    if on_inception or "clean_pool3" in nets:
        if inception is None:
            inception = _load("clean_pool3")
        check_logits(inception[0], feature_request(on_inception, fake=True))
    for key in nets:
        net = {"dinov2": dinov2, "clip": clip, "clean_pool3": inception}[key]
        loaded[key] = net if net is not None else _load(key)
        ident = net[2] if len(net) > 2 else getattr(net[0], "source", type(net[0]).__name__)
        out[_IDENTITY_KEYS[key]] = ident
    batch_size = batch_size or default_batch_size(mesh)
    batch_size = min(batch_size, max(len(s.source) for s in sides.values()))
    extractors = {k: FeatureExtractor(net[0], net[1], batch_size=batch_size, mesh=mesh,
                                      forward=_FORWARDS[k]) for k, net in loaded.items()}
    if on_inception:
        extractors["inception"] = FeatureExtractor(inception[0], inception[1],
                                                   batch_size=batch_size, mesh=mesh)
    f = {}
    for name, side in sides.items():
        stats = {k: _PROTOCOLS[k] for k in nets if k in _PROTOCOLS}
        keep = {k for k, rows in nets.items() if rows}
        if on_inception:
            stats.update(INCEPTION_STATS)
            keep |= inception_rows(feature_request(on_inception, fake=name == "fake"))
        f[name] = feature_pass(side.source, list(extractors.values()), stats, keep,
                               name=side.name, progress=progress)
    if "fd_dinov2" in m:
        out["fd_dinov2"] = frechet_distance(f["real"]["dinov2_stats"], f["fake"]["dinov2_stats"])
    if "clean_fid" in m:
        out["clean_fid"] = frechet_distance(f["real"]["clean_pool3_stats"],
                                            f["fake"]["clean_pool3_stats"])
    if "cmmd" in m:
        out["cmmd"] = cmmd(f["real"]["clip"], f["fake"]["clip"], block_size=cmmd_block_size)
    dino_metrics = [x for x in metrics if x in on_dinov2]
    if dino_metrics:
        as_pool3 = lambda d: {"pool3_stats": d["dinov2_stats"],
                              **({"pool3": d["dinov2"]} if "dinov2" in d else {})}
        out.update(score_features(as_pool3(f["real"]), as_pool3(f["fake"]), dino_metrics,
                                  mesh=mesh, **score_kwargs))
    if on_inception:
        out.update(score_features(f["real"], f["fake"], on_inception, mesh=mesh,
                                  **score_kwargs))
        out["weights"] = inception[0].source
    out["n_real"], out["n_fake"] = len(sides["real"].source), len(sides["fake"].source)
    return out


def _load(key: str) -> tuple:
    if key == "clean_pool3":
        from jaxgen.metrics.weights import load_inception

        return load_inception()
    from jaxgen.encoders.weights import load_clip, load_dinov2

    return load_dinov2() if key == "dinov2" else load_clip()
