"""Quasi-Monte Carlo Gaussian latents: scrambled Sobol points through the normal inverse CDF.

Chong & Forsyth 2020 ("Effectively Unbiased FID and Inception Score and
where to find them", sec. 4) draw a sampler's initial noise from a scrambled
Sobol sequence instead of i.i.d. normals, which lowers the variance of FID_N
and IS_N at a given N. :func:`sobol_normal` returns such latents, ready to
pass to ``jaxgen.sampling.sample(..., x_T=...)``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.special import ndtri
from scipy.stats import qmc

from jaxgen.errors import InputError

SOBOL_MAX_DIM = qmc.Sobol.MAXDIM  # 21201: the direction numbers scipy ships (Joe & Kuo 2008)
_BITS = 30  # scipy's default precision: each coordinate is a multiple of 2^-30


def sobol_normal(n: int, shape: tuple[int, ...], seed: int = 0, *, offset: int = 0) -> np.ndarray:
    """Points ``offset .. offset + n - 1`` of a scrambled Sobol sequence, mapped to N(0, I).

    The sequence has one dimension per latent element, ``d = prod(shape)``;
    it is scrambled (LMS + digital shift, scipy's ``qmc.Sobol``) with
    ``seed``, so point ``i`` depends only on ``(seed, i)``: drawing a run in
    batches with ``offset = batch_index * batch_size`` gives exactly the rows
    of one call with the whole ``n``. Each uniform coordinate ``u = m 2^-30``
    is moved to the centre of its dyadic cell, ``u + 2^-31``, before the
    Gaussian inverse CDF, so no coordinate maps to +-inf. Sobol's balance
    properties hold for prefixes whose length is a power of two; other ``n``
    are still valid, just less evenly spread.

    Args:
      n: number of latents (rows).
      shape: shape of one latent, e.g. ``(32, 32, 3)``; ``prod(shape)`` must
        be at most 21201, the dimension limit of scipy's Sobol direction numbers.
      seed: scrambling seed.
      offset: index of the first point returned.

    Returns:
      ``float32`` array ``[n, *shape]``.

    Raises:
      InputError: for ``n < 0``, ``offset < 0``, an empty shape or too many dimensions.
    """
    shape = tuple(int(s) for s in shape)
    d = math.prod(shape)
    if n < 0 or offset < 0:
        raise InputError(f"sobol_normal needs n >= 0 and offset >= 0; got n={n}, offset={offset}.")
    if d < 1:
        raise InputError(f"sobol_normal: shape={shape} has no elements; give the latent shape.")
    if d > SOBOL_MAX_DIM:
        raise InputError(
            f"sobol_normal: shape={shape} has {d} elements, but scipy's Sobol sequence supports "
            f"at most {SOBOL_MAX_DIM} dimensions; use i.i.d. Gaussian noise (x_T=None) or a "
            "smaller latent."
        )
    if offset + n > 2**_BITS:
        raise InputError(
            f"sobol_normal: offset + n = {offset + n} exceeds the 2^{_BITS} points of the sequence."
        )
    sampler = qmc.Sobol(d, scramble=True, bits=_BITS, rng=seed)
    if offset:
        sampler.fast_forward(offset)
    with warnings.catch_warnings():
        # scipy warns when n is not a power of 2; any n is valid here (see docstring).
        warnings.filterwarnings("ignore", message=".*balance properties.*", category=UserWarning)
        u = sampler.random(n)
    z = ndtri(u + 2.0 ** -(_BITS + 1))
    return z.astype(np.float32).reshape((n, *shape))
