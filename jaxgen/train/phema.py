"""Power-function EMA and post-hoc EMA reconstruction (Karras et al., CVPR 2024, Section 3).

An EMA whose averaging profile at training time ``t`` is ``p(tau) ~ tau^gamma``
on ``[0, t]`` has relative standard deviation ``sigma_rel`` (the profile's
width over its centre of mass), Eq. 123; it is tracked with the per-step
decay ``beta(t) = (1 - 1/t)^(gamma + 1)`` (Eq. 127). Training keeps a few
such EMAs (default ``sigma_rel`` 0.05 and 0.10) and saves snapshots of them;
after training, the EMA of any other ``sigma_rel`` is the least-squares
combination of the snapshots' profiles (Appendix C.3, Algorithm 3).

A transcription of NVlabs/edm2 ``training/phema.py`` (commit 4bf8162f) in
float64 NumPy, plus JAX updates for the train step:

- :func:`power_ema_init` / :func:`power_ema_update`: the EMAs as a pytree
  state (exact resume: checkpoint the state);
- :func:`save_snapshot` / :func:`list_snapshots`: snapshots as ``.npz`` files
  ``phema-<t>-<sigma_rel>.npz`` in ``RUN/phema`` (``t`` in updates);
- :func:`posthoc_coefficients` and :func:`reconstruct`, which streams the
  snapshots (one read at a time, float64 sums of the outputs);
  :func:`save_snapshot` writes the results in the same format and
  :func:`load_snapshot` reads either back as a parameter tree.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxgen.errors import InputError
from jaxgen.files import as_path, open_atomic

SNAPSHOT_DIR = "phema"
"""Sub-folder of a run's workdir holding the power-EMA snapshots."""

SIGMA_REL_MAX = float(np.sqrt(1 / 12))
"""``sigma_rel`` of ``gamma = 0`` (a uniform average over all of training): the widest profile."""

_NAME = re.compile(r"phema-(\d+)-(\d+\.\d+)\.npz")


def gamma_to_sigma_rel(gamma: Any) -> np.ndarray:
    """``sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3)))`` (Eq. 123)."""
    g = np.float64(gamma)
    return np.sqrt((g + 1) / (g + 2) ** 2 / (g + 3))


def sigma_rel_to_gamma(sigma_rel: Any) -> np.ndarray:
    """The exponent ``gamma`` of a given ``sigma_rel`` (Eq. 126, Algorithm 2).

    The largest real root of ``gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + (12 - s^-2)``.

    Raises:
      InputError: for ``sigma_rel`` outside ``(0, sqrt(1/12))`` (no ``gamma >= 0`` exists).
    """
    s = np.float64(sigma_rel)
    if np.any(s <= 0) or np.any(s >= SIGMA_REL_MAX):
        raise InputError(
            f"sigma_rel {s.tolist()}: must lie in (0, {SIGMA_REL_MAX:.4f}) (gamma > 0); "
            "0.05 and 0.10 are the paper's defaults."
        )
    tmp = s.reshape(-1) ** -2
    gamma = [np.roots([1, 7, 16 - c, 12 - c]).real.max() for c in tmp]
    return np.float64(gamma).reshape(s.shape)


def power_ema_beta(gamma: Any, t: Any) -> Any:
    """Per-step decay ``beta(t) = (1 - 1/t)^(gamma + 1)`` at update ``t >= 1`` (Eq. 127).

    ``t`` counts updates including the current one, so ``beta(1) = 0``: the
    first EMA value is the first parameters. NVlabs/edm2 writes it as
    ``(1 - batch / nimg)^(gamma + 1)``, the same number.
    """
    return (1 - 1 / t) ** (gamma + 1)


class PowerEMAState(NamedTuple):
    """Power-function EMAs of the parameters: ``emas[i]`` has ``sigma_rels[i]``."""

    count: jax.Array  # updates averaged so far, int32 scalar
    emas: tuple[Any, ...]


def power_ema_init(params: Any, sigma_rels: Sequence[float] = (0.05, 0.10)) -> PowerEMAState:
    """One copy of ``params`` per ``sigma_rel``, before any update (validates ``sigma_rels``)."""
    sigma_rel_to_gamma(sigma_rels)
    copy = lambda: jax.tree.map(jnp.array, params)
    return PowerEMAState(jnp.zeros((), jnp.int32), tuple(copy() for _ in sigma_rels))


def power_ema_update(
    state: PowerEMAState, params: Any, sigma_rels: Sequence[float] = (0.05, 0.10)
) -> PowerEMAState:
    """Average the new ``params`` into each EMA: ``ema <- beta ema + (1 - beta) params`` (Eq. 127).

    Call once per optimizer update, after it (and after
    :func:`jaxgen.models.force_normalize` for EDM2), inside ``jit``.

    Args:
      state: from :func:`power_ema_init` or the previous update.
      params: the parameters after this update.
      sigma_rels: the same values given to :func:`power_ema_init` (static).
    """
    gammas = sigma_rel_to_gamma(sigma_rels)
    t = (state.count + 1).astype(jnp.float32)
    emas = []
    for gamma, ema in zip(gammas, state.emas, strict=True):
        # 1 - beta as -expm1((gamma + 1) log1p(-1/t)): in float32, 1 - 1/t itself is off by
        # up to 3% of 1/t at t = 1e6 updates, and so would be every step's weight.
        w = -jnp.expm1((float(gamma) + 1) * jnp.log1p(-1 / t))
        emas.append(jax.tree.map(lambda e, p, w=w: e + w * (p - e), ema, params))
    return PowerEMAState(state.count + 1, tuple(emas))


# ---------------------------------------------------------------- post-hoc reconstruction


def power_function_correlation(a_t: Any, a_sigma_rel: Any, b_t: Any, b_sigma_rel: Any):
    """Inner products ``<p_a, p_b>`` of normalised power-function profiles (Eq. 151, Alg. 3).

    Profile ``a`` ends at ``a_t`` with ``sigma_rel`` ``a_sigma_rel``; arguments broadcast.
    """
    a_g, b_g = sigma_rel_to_gamma(a_sigma_rel), sigma_rel_to_gamma(b_sigma_rel)
    a_t, b_t = np.float64(a_t), np.float64(b_t)
    ratio = a_t / b_t
    exponent = np.where(a_t < b_t, b_g, -a_g)
    num = (a_g + 1) * (b_g + 1) * ratio**exponent
    return num / ((a_g + b_g + 1) * np.maximum(a_t, b_t))


def posthoc_coefficients(
    in_t: Sequence[float],
    in_sigma_rel: Sequence[float],
    out_t: float,
    out_sigma_rel: Sequence[float],
) -> np.ndarray:
    """Least-squares weights ``X [in, out]`` of snapshots for target profiles (Algorithm 3).

    Solves ``A X = B`` with ``A_ij = <p_i, p_j>`` over the snapshots and
    ``B_ij = <p_i, q_j>`` against the targets, then scales each column to sum
    to 1 (so a constant parameter is reproduced exactly).

    Args:
      in_t: training time of each snapshot (any unit, the same for all).
      in_sigma_rel: ``sigma_rel`` of each snapshot.
      out_t: training time of the reconstruction (a snapshot time, normally the last).
      out_sigma_rel: the ``sigma_rel`` values to reconstruct.

    Returns:
      float64 ``[len(in_t), len(out_sigma_rel)]``.
    """
    in_t, in_s = np.broadcast_arrays(np.float64(in_t), np.float64(in_sigma_rel))
    out_t, out_s = np.broadcast_arrays(np.float64(out_t), np.float64(out_sigma_rel))
    col, row = (lambda x: x.reshape(-1, 1)), (lambda x: x.reshape(1, -1))
    a = power_function_correlation(col(in_t), col(in_s), row(in_t), row(in_s))
    b = power_function_correlation(col(in_t), col(in_s), row(out_t), row(out_s))
    x = np.linalg.solve(a, b)
    return x / np.sum(x, axis=0)


class Snapshot(NamedTuple):
    """A saved power-EMA: file path, training time ``t`` (updates) and ``sigma_rel``."""

    path: epath.Path
    t: int
    sigma_rel: float


def snapshot_name(t: int, sigma_rel: float) -> str:
    """``phema-<t, 10 digits>-<sigma_rel, 3 decimals>.npz`` (the official naming, in updates)."""
    return f"phema-{t:010d}-{sigma_rel:.3f}.npz"


def save_snapshot(folder: epath.PathLike, params: Any, t: int, sigma_rel: float) -> epath.Path:
    """Write parameters (nested dicts, or flat ``a/b/c`` keys) as one flat ``.npz``, atomically.

    Used for training snapshots and for reconstructions alike. Call it on one
    process (the arrays are gathered to the host here). Returns the path.

    Raises:
      InputError: for a ``sigma_rel`` with more than 3 decimals (the file name
        records it, and reconstruction reads it from there).
    """
    if round(sigma_rel, 3) != sigma_rel:
        raise InputError(
            f"sigma_rel {sigma_rel}: snapshots record sigma_rel with 3 decimals in their "
            "file name; use a value like 0.05 or 0.125."
        )
    flat = {"/".join(k): np.asarray(v) for k, v in flatten_dict(jax.device_get(params)).items()}
    path = as_path(folder) / snapshot_name(t, sigma_rel)
    with open_atomic(path) as f:
        np.savez(f, **flat)
    return path


def list_snapshots(folder: epath.PathLike) -> list[Snapshot]:
    """The snapshots in ``folder`` sorted by ``(t, sigma_rel)``.

    Raises:
      InputError: when ``folder`` is missing or holds none.
    """
    where = as_path(folder)
    if not where.is_dir():
        raise InputError(f"{folder}: no such folder of power-EMA snapshots.")
    found = []
    for p in where.iterdir():
        m = _NAME.fullmatch(p.name)
        if m:
            found.append(Snapshot(p, int(m.group(1)), float(m.group(2))))
    if not found:
        raise InputError(
            f"{folder}: holds no power-EMA snapshots (files like {snapshot_name(1000, 0.05)})."
        )
    return sorted(found, key=lambda s: (s.t, s.sigma_rel))


def _load(path: epath.Path) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(path.read_bytes()), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def reconstruct(
    snapshots: Sequence[Snapshot],
    out_sigma_rels: Sequence[float],
    out_t: int | None = None,
) -> Iterable[tuple[float, dict[str, np.ndarray]]]:
    """Post-hoc EMAs of ``out_sigma_rels`` at time ``out_t`` from saved snapshots.

    Streams: each snapshot is read once and added, times its coefficient, into
    float64 sums, one per output; memory is one snapshot plus the outputs.

    Args:
      snapshots: from :func:`list_snapshots` (any order).
      out_sigma_rels: the ``sigma_rel`` values wanted, each in ``(0, sqrt(1/12))``.
      out_t: the time to reconstruct at; one of the snapshots' times (default:
        the latest). Snapshots after it are ignored.

    Yields:
      ``(sigma_rel, flat parameters)`` with float32 arrays keyed like the snapshots.

    Raises:
      InputError: for an ``out_t`` no snapshot has, a ``sigma_rel`` out of range,
        or snapshots of different models (keys or shapes differ).
    """
    times = sorted({s.t for s in snapshots})
    out_t = times[-1] if out_t is None else out_t
    if out_t not in times:
        raise InputError(f"t={out_t}: no snapshot at that time; snapshots exist at t={times}.")
    used = [s for s in snapshots if 0 < s.t <= out_t]
    coefs = posthoc_coefficients([s.t for s in used], [s.sigma_rel for s in used], out_t,
                                 out_sigma_rels)
    sums: list[dict[str, np.ndarray]] = [{} for _ in out_sigma_rels]
    for i, snap in enumerate(used):
        params = _load(snap.path)
        ref = sums[0]
        if ref and (params.keys() != ref.keys()
                    or any(params[k].shape != ref[k].shape for k in ref)):
            raise InputError(
                f"{snap.path}: parameters differ from {used[0].path} (keys or shapes); "
                "all snapshots must come from one model."
            )
        for j, out in enumerate(sums):
            for k, v in params.items():
                term = coefs[i, j] * v.astype(np.float64)
                out[k] = out[k] + term if k in out else term
    for s, out in zip(out_sigma_rels, sums, strict=True):
        yield float(s), {k: v.astype(np.float32) for k, v in out.items()}


def snapshot_folder(workdir: epath.PathLike) -> epath.Path:
    """Where a run keeps its power-EMA snapshots: ``WORKDIR/phema``."""
    return as_path(workdir) / SNAPSHOT_DIR


def load_snapshot(path: epath.PathLike) -> dict[str, Any]:
    """A snapshot (or reconstruction) as the nested parameter dict it was saved from."""
    return unflatten_dict(_load(as_path(path)), sep="/")
