"""Time grids: tiny functions ``grid(process, steps) -> ts``.

Every grid starts at the process's true terminal time ``t_max`` and ends at
the clean point ``t = 0``, with ``steps`` intervals (so ``steps + 1`` points).
For processes with ``t_min > 0`` the last interval is the jump from ``t_min``
to 0 (k-diffusion's appended ``sigma = 0``); for flows (``t_min = 0``) the grid
itself reaches 0.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jaxgen.errors import InputError


def _grid(process, steps: int, t_of_u) -> np.ndarray:
    """Evaluate ``t_of_u`` on ``u`` in [0, 1] (0 -> t_max, 1 -> t_min) and close at t = 0."""
    noisy = steps if process.t_min > 0 else steps + 1
    u = np.linspace(0.0, 1.0, noisy)
    ts = np.array(t_of_u(u), dtype=np.float64)  # a writable copy
    ts[0] = process.t_max  # pin the ends against round-off in the maps
    if noisy > 1:
        ts[-1] = process.t_min
    return np.append(ts, 0.0) if process.t_min > 0 else ts


def _finite_logsnr(process, name: str) -> tuple[float, float]:
    lam = np.asarray(process.logsnr(jnp.asarray([process.t_max, process.t_min])), np.float64)
    if not np.all(np.isfinite(lam)):
        raise InputError(
            f"grid={name!r} spaces points in log-SNR, which is infinite at the ends of "
            f"{process!r}; use grid='uniform' (or 'shifted', 'trailing')."
        )
    return float(lam[0]), float(lam[1])


def uniform(process, steps: int) -> np.ndarray:
    """Uniform in t (DDIM's "linear" spacing; rectified-flow Euler)."""
    return _grid(process, steps, lambda u: process.t_max + u * (process.t_min - process.t_max))


def logsnr(process, steps: int) -> np.ndarray:
    """Uniform in log-SNR (DPM-Solver's ``logSNR`` skip type, Lu et al. 2022, Sec. 3.3)."""
    lam0, lam1 = _finite_logsnr(process, "logsnr")
    return _grid(
        process, steps, lambda u: process.t_from_logsnr(jnp.asarray(lam0 + u * (lam1 - lam0)))
    )


def karras(process, steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), Eq. 5: uniform in ``sigma^(1/rho)`` from sigma_max to sigma_min.

    ``sigma = sigma(t) / alpha(t)``, so the grid is the same in noise level on every process.
    """
    lam0, lam1 = _finite_logsnr(process, "karras")
    hi, lo = math.exp(-lam0 / 2) ** (1 / rho), math.exp(-lam1 / 2) ** (1 / rho)
    return _grid(
        process,
        steps,
        lambda u: process.t_from_logsnr(jnp.asarray(-2 * rho * np.log(hi + u * (lo - hi)))),
    )


def shifted(process, steps: int, shift: float = 3.0) -> np.ndarray:
    """Uniform grid with log-SNR shifted by ``-2 log(shift)`` (Esser et al. 2024, Eq. 23).

    On ``Flow("linear")`` this is SD3's ``t' = shift t / (1 + (shift - 1) t)``;
    ``shift > 1`` spends more steps at high noise.
    """
    if not shift > 0:
        raise InputError(f"shift={shift} must be > 0.")
    base = uniform(process, steps)
    ts = np.asarray(process.t_from_logsnr(process.logsnr(jnp.asarray(base)) - 2 * math.log(shift)))
    ts = np.minimum(np.asarray(ts, np.float64), process.t_max)
    ts[0], ts[-1] = base[0], base[-1]
    return ts


def _discrete_steps(process, steps: int, name: str) -> int:
    n = getattr(process, "num_steps", None)
    if not n:
        raise InputError(
            f"grid={name!r} picks indices of a discrete VP(num_steps=N); got {process!r}."
        )
    if steps > n:
        raise InputError(f"steps={steps} exceeds the {n} discrete timesteps of {process!r}.")
    return n


def trailing(process, steps: int) -> np.ndarray:
    """Indices ``round(N - i N / steps) - 1`` (Lin et al. 2024, Table 2), from the last index."""
    n = _discrete_steps(process, steps, "trailing")
    idx = np.round(np.arange(n, 0, -n / steps)).astype(np.int64) - 1
    return np.append((idx + 1) / n, 0.0)


def leading(process, steps: int) -> np.ndarray:
    """Indices ``i * (N // steps)`` as in the DDIM code (Song et al. 2021); ends at index 0.

    Note: it does not start at the terminal index (Lin et al. 2024 explain why
    that is a flaw); prefer ``trailing``.
    """
    n = _discrete_steps(process, steps, "leading")
    idx = np.arange(steps)[::-1] * (n // steps)
    return np.append((idx + 1) / n, 0.0)


def iddpm(process, steps: int) -> np.ndarray:
    """IDDPM's ``space_timesteps(N, [steps])`` (Nichol & Dhariwal 2021, Sec. 4; ADM, DiT).

    Indices ``round(i (N - 1) / (steps - 1))`` for ``i < steps``, accumulated in floats
    and rounded half to even exactly as the reference, from ``N - 1`` down to 0; the
    250-step grid of DiT's ``sample.py``.
    """
    n = _discrete_steps(process, steps, "iddpm")
    stride = (n - 1) / (steps - 1) if steps > 1 else 1
    idx, cur = [], 0.0
    for _ in range(steps):
        idx.append(round(cur))
        cur += stride
    return np.append((np.array(idx[::-1], np.float64) + 1) / n, 0.0)


GRIDS = {
    "uniform": uniform,
    "logsnr": logsnr,
    "karras": karras,
    "shifted": shifted,
    "trailing": trailing,
    "leading": leading,
    "iddpm": iddpm,
}


def make_grid(grid, process, steps: int) -> np.ndarray:
    """Resolve ``grid`` (a name in :data:`GRIDS`, a callable or an explicit array) and check it.

    Returns:
      Float64 array of ``steps + 1`` strictly decreasing times.
    """
    if isinstance(grid, str):
        if grid not in GRIDS:
            raise InputError(f"grid={grid!r}: use one of {', '.join(GRIDS)}, a callable or times.")
        ts = GRIDS[grid](process, steps)
    elif callable(grid):
        ts = grid(process, steps)
    else:
        ts = grid
    ts = np.asarray(ts, dtype=np.float64)
    if ts.shape != (steps + 1,):
        raise InputError(f"the time grid has shape {ts.shape}; steps={steps} needs ({steps + 1},).")
    if not (np.all(np.isfinite(ts)) and np.all(np.diff(ts) < 0) and ts[-1] >= 0):
        raise InputError(f"the time grid must be finite, >= 0 and strictly decreasing; got {ts}.")
    return ts
