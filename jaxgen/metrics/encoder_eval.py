"""FD-DINOv2, CMMD and clean-FID, and the feature-set metrics on DINOv2 features.

:func:`evaluate_encoders` reads each side's images once and runs every
network the requested metrics need on each batch (DINOv2 ViT-L/14, CLIP
ViT-L/14-336, the clean-resize Inception; :mod:`encoder_features`),
accumulating float64 Gaussian statistics and keeping feature rows only where
a metric needs them. ``features="dinov2"`` computes FID, KID,
precision/recall, density/coverage and FID-infinity on the DINOv2 CLS
features instead of Inception's ``pool3`` (their keys keep their names; the
output's ``features`` entry says which network).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jaxgen.errors import InputError
from jaxgen.metrics.cmmd import cmmd
from jaxgen.metrics.encoder_features import (
    clean_inception_forward,
    clip_forward,
    dinov2_forward,
)
from jaxgen.metrics.eval_parts import gather_rows, iterate_eval, largest_part
from jaxgen.metrics.evaluate import EvalInput, open_eval_input, score_features
from jaxgen.metrics.features import FeatureExtractor, default_batch_size
from jaxgen.metrics.fid import frechet_distance
from jaxgen.metrics.stats import MomentAccumulator

ENCODER_METRICS = ("fd_dinov2", "cmmd", "clean_fid")
DINOV2_FEATURE_METRICS = ("fid", "kid", "pr", "dc", "fid_inf")
FEATURES = ("inception", "dinov2")


def _networks(metrics: set[str], features: str) -> dict[str, bool]:
    """Which networks run, and whether their rows (not just statistics) are kept."""
    on_dinov2 = set(DINOV2_FEATURE_METRICS) & metrics if features == "dinov2" else set()
    nets = {}
    if "fd_dinov2" in metrics or on_dinov2:
        nets["dinov2"] = bool(on_dinov2 - {"fid"})
    if "cmmd" in metrics:
        nets["clip"] = True
    if "clean_fid" in metrics:
        nets["clean_pool3"] = False
    return nets


def _featurize(side: EvalInput, extractors: dict, keep: dict[str, bool], local_batch: int,
               progress: bool) -> dict:
    """One pass over ``side``'s images through every extractor: statistics and kept rows."""
    if side.source is None:
        raise InputError(f"{side.name}: FD-DINOv2, CMMD and clean-FID need the images; a "
                         "statistics file carries no protocol they could check.")
    n, pid, count = len(side.source), jax.process_index(), jax.process_count()
    acc = {k: MomentAccumulator() for k in extractors}
    rows: dict[str, list[np.ndarray]] = {k: [] for k in extractors if keep[k]}
    bar = tqdm(total=n, desc=f"encoders {side.name}", unit="img", file=sys.stderr,
               disable=not progress or pid != 0, leave=False)
    steps = 0
    for images in iterate_eval(side.source, local_batch, process_index=pid, process_count=count):
        for key, ext in extractors.items():
            f = ext(images, side.name)[key]
            acc[key].update(f)
            if key in rows:
                rows[key].append(f)
        steps += 1
        bar.update(len(images) * count)
    for _ in range(-(-largest_part(n, count) // local_batch) - steps):
        for ext in extractors.values():  # every process runs the sharded step equally often
            ext.idle_step(side.source.image_shape)
    bar.close()
    out = {}
    for key, a in acc.items():
        a.allreduce()
        out[f"{key}_stats"] = a.finalize()
    out.update({k: gather_rows(np.concatenate(v), n) for k, v in rows.items()})
    return out


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
    """``fd_dinov2``, ``cmmd``, ``clean_fid`` and (``features="dinov2"``) the feature-set metrics.

    Args:
      real, fake: as :func:`jaxgen.metrics.evaluate` takes them (images; not statistics).
      metrics: any of :data:`ENCODER_METRICS`, plus, with ``features="dinov2"``, any of
        :data:`DINOV2_FEATURE_METRICS`.
      features: ``"dinov2"`` to compute the feature-set metrics on DINOv2 features.
      batch_size, mesh: as for :func:`jaxgen.metrics.evaluate`.
      inception, dinov2, clip: ``(module, variables)`` or ``(module, variables, identity)``;
        default :func:`load_inception` / :func:`load_dinov2` / :func:`load_clip`.
      cmmd_block_size: CMMD's kernel block (memory ``16 * block^2`` bytes).
      num_real, num_fake: use only the first this many images of a side.
      progress: show a progress bar on stderr.
      **score_kwargs: KID / PR / DC / FID-inf options of :func:`score_features`.

    Returns:
      A flat dict with ``fd_dinov2``, ``cmmd``, ``clean_fid`` and the
      DINOv2-feature metrics' keys as asked, the weights' identities
      (``dinov2_weights``, ``clip_weights``, ``clean_fid_weights``) and ``features``.
    """
    if features not in FEATURES:
        raise InputError(f"features must be one of {FEATURES}, got {features!r}.")
    m = set(metrics)
    allowed = set(ENCODER_METRICS) | (set(DINOV2_FEATURE_METRICS) if features == "dinov2"
                                      else set())
    if m - allowed:
        raise InputError(f"metric(s) {sorted(m - allowed)} cannot be computed here; choose from "
                         f"{sorted(allowed)}.")
    nets = _networks(m, features)
    sides = {"real": open_eval_input(real, "real", num_real),
             "fake": open_eval_input(fake, "fake", num_fake)}
    forwards = {"dinov2": dinov2_forward, "clip": clip_forward,
                "clean_pool3": clean_inception_forward}
    loaded, out = {}, {"features": features}
    for key in nets:
        net = {"dinov2": dinov2, "clip": clip, "clean_pool3": inception}[key]
        if net is None:
            net = _load(key)
        loaded[key] = net
        ident = net[2] if len(net) > 2 else getattr(net[0], "source", type(net[0]).__name__)
        out[{"dinov2": "dinov2_weights", "clip": "clip_weights",
             "clean_pool3": "clean_fid_weights"}[key]] = ident
    batch_size = batch_size or default_batch_size(mesh)
    largest = max(len(s.source) for s in sides.values() if s.source is not None)
    extractors = {k: FeatureExtractor(net[0], net[1], batch_size=min(batch_size, largest),
                                      mesh=mesh, forward=forwards[k]) for k, net in loaded.items()}
    local_batch = next(iter(extractors.values())).local_batch
    f = {k: _featurize(s, extractors, nets, local_batch, progress) for k, s in sides.items()}
    if "fd_dinov2" in m:
        out["fd_dinov2"] = frechet_distance(f["real"]["dinov2_stats"], f["fake"]["dinov2_stats"])
    if "clean_fid" in m:
        out["clean_fid"] = frechet_distance(f["real"]["clean_pool3_stats"],
                                            f["fake"]["clean_pool3_stats"])
    if "cmmd" in m:
        out["cmmd"] = cmmd(f["real"]["clip"], f["fake"]["clip"], block_size=cmmd_block_size)
    on_dinov2 = [x for x in metrics if x in DINOV2_FEATURE_METRICS]
    if on_dinov2:
        as_pool3 = lambda d: {"pool3_stats": d["dinov2_stats"],
                              **({"pool3": d["dinov2"]} if "dinov2" in d else {})}
        out.update(score_features(as_pool3(f["real"]), as_pool3(f["fake"]), on_dinov2,
                                  mesh=mesh, **score_kwargs))
    out["n_real"], out["n_fake"] = len(sides["real"].source), len(sides["fake"].source)
    return out


def _load(key: str) -> tuple:
    if key == "clean_pool3":
        from jaxgen.metrics.weights import load_inception

        return load_inception()
    from jaxgen.encoders.weights import load_clip, load_dinov2

    return load_dinov2() if key == "dinov2" else load_clip()
