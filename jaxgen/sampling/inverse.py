"""Posterior sampling for linear inverse problems ``y = A x0 + n``, ``n ~ N(0, noise_std^2 I)``.

Each method turns the prior's denoiser ``D(x_t) = E[x0 | x_t]`` into a
conditional one, and any registered solver runs on it:

- ``"pigdm"`` (Song et al. 2023, PiGDM, Sec. 3): ``p(x0 | x_t) ~ N(D, r_t^2 I)`` with
  ``r_t^2 = v sigma^2 / (v + sigma^2)`` (``sigma`` the noise level of ``x_t / alpha``,
  ``v`` the data variance) gives ``p(y | x_t) ~ N(A D, r_t^2 A A^T + noise_std^2 I)``.
  Its score ``J_D^T A^T (r_t^2 A A^T + noise_std^2 I)^{-1} (y - A D)`` enters
  by Tweedie's formula: ``E[x0 | x_t, y] = D + (sigma_t^2 / alpha_t) grad_x log p(y | x_t)``.
  For a Gaussian prior ``N(mu, v I)`` both approximations are exact, so the
  sampler draws from the exact posterior as the solver's steps grow.
- ``"dps"`` (Chung et al. 2023, DPS, Algorithm 1): ``grad log p(y | x_t) ~
  -zeta_t grad_x ||y - A D||^2`` with the normalised weight ``zeta_t = zeta / ||y - A D||``
  of their code, entered through the same Tweedie formula rather than as a step on
  ``x_{t-1}``: the move of ``x0`` is ``sigma_t^2 / alpha_t`` times that score, so
  ``zeta`` is not their step size (on the tests' Gaussian prior, ``zeta = 10`` cut the
  residual ``||A x - y||`` tenfold).
- ``"ddnm"`` (Wang et al. 2023, DDNM, Sec. 3.2): range-null-space replacement
  ``x0 <- D + A^+ (y - A D)``; with ``solver="ddpm"`` this is their Algorithm 1.
  Noiseless measurements only (``noise_std = 0``). Observed pixels of an
  inpainting come out exactly equal to ``y`` with solvers whose last step returns
  the denoised ``x0`` (DDIM/DDPM, DPM-Solver++, UniPC).
- ``"ddnm+"`` (Wang et al. 2023, DDNM+, Sec. 3.3, Eqs. 17-19): noisy measurements.
  The replacement is scaled, ``x0 <- D - lambda_t A^+ (A D - y)``, and the ancestral
  step's fresh noise cut to ``gamma_t = sigma_t^2 - (a_t lambda_t noise_std)^2`` so that
  the measurement noise carried in by ``A^+ y`` takes its place (``a_t``: the weight of
  ``x0`` in the DDPM posterior mean, ``sigma_t``: its std; ``lambda_t = 1`` while
  ``sigma_t >= a_t noise_std``). The noise cut is part of the step, so this method
  is its own sampler: :func:`ddnm_plus`, DDPM steps (``solver="ddpm"``). With
  ``noise_std = 0`` it is DDNM with DDPM. Time travel (Sec. 3.3) is an option of it:
  after reaching some steps the chain goes back ``l`` steps by the forward process and
  samples that stretch again (:func:`travel_path`), at the cost of more evaluations.

``dps`` and ``pigdm`` differentiate through the model (one vector-Jacobian
product per evaluation, about three forward passes of cost).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgen.errors import InputError
from jaxgen.sampling.driver import SOLVERS, check_solver
from jaxgen.sampling.grids import make_grid
from jaxgen.sampling.guidance import Denoiser, make_denoiser
from jaxgen.sampling.solvers import step_noise

METHODS = ("pigdm", "dps", "ddnm", "ddnm+")


def _sum(a):
    return jnp.sum(a, axis=tuple(range(1, a.ndim)), keepdims=True)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: the mask is an array
class Inpaint:
    """``A x = m * x``: keep the pixels where ``mask`` (broadcasting to ``[H, W, C]``) is 1."""

    mask: Any

    def out_shape(self, shape):
        """Shape of ``y`` for images of ``shape`` ``(B, H, W, C)``."""
        np.broadcast_shapes(np.shape(self.mask), shape[1:])
        return shape

    def __call__(self, x):
        return jnp.asarray(self.mask, x.dtype) * x

    adjoint = pinv = __call__

    def gram_solve(self, r, r2, s2):
        """``(r2 A A^T + s2 I)^{-1} r`` on the range of ``A`` (where ``A^T`` will act)."""
        return self(r) / (r2 + s2)


@dataclasses.dataclass(frozen=True)
class SuperResolution:
    """``A x``: the mean over ``factor x factor`` blocks (``A A^T = I / factor^2``)."""

    factor: int

    def out_shape(self, shape):
        """Shape of ``y`` for images of ``shape`` ``(B, H, W, C)``."""
        b, h, w, c = shape
        if h % self.factor or w % self.factor:
            raise InputError(f"SuperResolution factor={self.factor} does not divide {h}x{w}.")
        return (b, h // self.factor, w // self.factor, c)

    def __call__(self, x):
        b, h, w, c, f = *x.shape, self.factor
        return x.reshape(b, h // f, f, w // f, f, c).mean((2, 4))

    def pinv(self, y):
        """``A^+ y``: nearest-neighbour upsampling."""
        return jnp.repeat(jnp.repeat(y, self.factor, 1), self.factor, 2)

    def adjoint(self, y):
        """``A^T y``."""
        return self.pinv(y) / self.factor**2

    def gram_solve(self, r, r2, s2):
        """``(r2 A A^T + s2 I)^{-1} r``."""
        return r / (r2 / self.factor**2 + s2)


@dataclasses.dataclass(frozen=True)
class Colorization:
    """``A x``: the mean of the 3 colour channels, ``[B, H, W, 1]`` (``A A^T = 1/3``)."""

    def out_shape(self, shape):
        """Shape of ``y`` for images of ``shape`` ``(B, H, W, C)``."""
        if len(shape) != 4 or shape[-1] != 3:
            raise InputError(f"Colorization needs (B, H, W, 3) images; got {shape}.")
        return (*shape[:3], 1)

    def __call__(self, x):
        return x.mean(-1, keepdims=True)

    def pinv(self, y):
        """``A^+ y``: the grey value in every channel."""
        return jnp.broadcast_to(y, (*y.shape[:3], 3))

    def adjoint(self, y):
        """``A^T y``."""
        return self.pinv(y) / 3

    def gram_solve(self, r, r2, s2):
        """``(r2 A A^T + s2 I)^{-1} r``."""
        return r / (r2 / 3 + s2)


@dataclasses.dataclass(frozen=True)
class GaussianBlur:
    """Circular convolution with a normalised ``size x size`` Gaussian of std ``sigma`` pixels.

    Circulant, so ``A = F^* diag(K) F`` with ``K`` the kernel's 2-D DFT: the
    adjoint multiplies by ``conj(K)`` and the pseudo-inverse by ``1/K`` where
    ``|K| > cutoff`` (0 elsewhere, as a truncated SVD).
    """

    sigma: float
    size: int = 9
    cutoff: float = 1e-3

    def out_shape(self, shape):
        """Shape of ``y`` for images of ``shape`` ``(B, H, W, C)``."""
        if len(shape) != 4 or min(shape[1:3]) < self.size:
            raise InputError(f"GaussianBlur size={self.size} needs (B, H, W, C) at least that big.")
        return shape

    def _spectrum(self, h, w):
        u = np.arange(self.size) - self.size // 2
        k1 = np.exp(-0.5 * (u / self.sigma) ** 2)
        k = np.outer(k1, k1) / np.outer(k1, k1).sum()
        pad = np.zeros((h, w))
        pad[: self.size, : self.size] = k
        pad = np.roll(pad, (-(self.size // 2), -(self.size // 2)), (0, 1))  # centre at (0, 0)
        return np.fft.fft2(pad)[None, :, :, None]

    def _apply(self, x, gain):
        spec = jnp.asarray(gain(self._spectrum(*x.shape[1:3])))
        return jnp.real(jnp.fft.ifft2(jnp.fft.fft2(x, axes=(1, 2)) * spec, axes=(1, 2))).astype(
            x.dtype
        )

    def __call__(self, x):
        return self._apply(x, lambda k: k)

    def adjoint(self, y):
        """``A^T y``."""
        return self._apply(y, np.conj)

    def pinv(self, y):
        """``A^+ y`` (truncated at ``cutoff``)."""
        return self._apply(y, lambda k: np.where(np.abs(k) > self.cutoff, 1 / k, 0))

    def gram_solve(self, r, r2, s2):
        """``(r2 A A^T + s2 I)^{-1} r``, on the range kept by the pseudo-inverse."""

        def gain(k):
            d = r2 * np.abs(k) ** 2 + s2
            return np.where(np.abs(k) > self.cutoff, 1 / np.where(d > 0, d, 1), 0)

        return self._apply(r, gain)


def posterior_denoiser(
    denoise: Callable,
    process,
    operator,
    y,
    *,
    method: str,
    noise_std: float = 0.0,
    zeta: float = 1.0,
    data_var: float = 1.0,
) -> Callable:
    """Turn ``denoise(x, t) -> (x0, eps)`` into ``E[x0 | x_t, y]`` by ``method`` (module docstring).

    Args:
      denoise: the prior's denoiser (see :func:`jaxgen.sampling.make_denoiser`).
      process: the noise process.
      operator: ``A``: an :class:`Inpaint`, :class:`SuperResolution`,
        :class:`Colorization` or :class:`GaussianBlur`.
      y: the measurement, ``operator.out_shape(x.shape)``.
      method: ``"pigdm"``, ``"dps"`` or ``"ddnm"``.
      noise_std: measurement noise std (PiGDM's ``sigma_y``).
      zeta: DPS step size.
      data_var: PiGDM's data variance ``v`` in ``r_t^2``.
    """

    def guided(x, t, state):
        a, s = process.alpha(t), process.sigma(t)
        if method == "ddnm":
            x0, _, state = denoise.step(x, t, state)
            x0 = x0 + operator.pinv(y - operator(x0))
        else:
            x0_of = lambda z: denoise.step(z, t, state)[::2]
            x0, vjp, state = jax.vjp(x0_of, x, has_aux=True)
            r = y - operator(x0)
            if method == "pigdm":
                s_hat2 = (s / a) ** 2
                r2 = data_var * s_hat2 / (data_var + s_hat2)
                g = operator.adjoint(operator.gram_solve(r, r2, noise_std**2))
            else:  # grad_x0 of -zeta ||r||^2 / ||r|| = 2 zeta A^T r / ||r||
                g = 2 * zeta * operator.adjoint(r) / jnp.sqrt(jnp.maximum(_sum(r * r), 1e-30))
            # Where alpha = 0, x_t carries nothing about x0 and the score of y is 0.
            x0 = jnp.where(a > 0, x0 + s * s / jnp.where(a > 0, a, 1) * vjp(g)[0], x0)
        return x0, (x - a * x0) / s, state

    def conditional(x, t, state):
        return lax.cond(process.sigma(t) > 0, guided, denoise.step, x, t, state)

    return Denoiser(conditional, denoise.init)


def travel_path(steps: int, length: int = 0, interval: int | None = None,
                repeat: int = 2) -> np.ndarray:
    """The grid indices (0: ``ts[0]``, ``steps``: the end) DDNM+ visits with time travel.

    Wang et al. (2023), Sec. 3.3, with the schedule of their code (``get_schedule_jump``,
    from RePaint): on the way down, at every ``interval``-th step counted from the end
    (the last step excluded, and only where ``length`` steps fit above), the chain goes
    back ``length`` steps and samples them again, ``repeat - 1`` times. Their code ties
    the interval to the length (``s = l``, the default here) and steps back one grid
    point at a time; one jump of ``length`` by the forward process is the same draw.

    Args:
      steps: DDPM steps of the grid.
      length: travel length ``l`` (0: no travel, the plain path ``0, 1, ..., steps``).
      interval: travel interval ``s`` (default ``length``).
      repeat: times each travelled stretch is sampled (``r``; 1: no travel).

    Returns:
      ``int`` indices; consecutive ones step down by one (a model evaluation) or jump
      back by ``length`` (forward noise, no evaluation).
    """
    interval = max(length, 1) if interval is None else interval
    bad = [(k, v) for k, v in (("length", length), ("interval", interval), ("repeat", repeat))
           if not isinstance(v, int | np.integer) or v < (0 if k == "length" else 1)]
    if bad or length >= max(steps, 1):
        raise InputError(
            f"time travel length={length}, interval={interval}, repeat={repeat} with "
            f"steps={steps}: need ints, 0 <= length < steps, interval >= 1, repeat >= 1."
        )
    # Their positions p = steps - 1 ... 0 are our indices steps - 1 - p.
    trips = {} if length == 0 else {
        steps - 1 - p: repeat - 1 for p in range(0, steps - length, interval)
    }
    path, k = [0], 0
    while k < steps:
        k += 1
        path.append(k)
        if trips.get(k, 0) > 0:
            trips[k] -= 1
            k -= length
            path.append(k)
    return np.asarray(path)


def ddnm_plus(denoise, x, ts, keys, process, *, operator, y, noise_std: float, path=None):
    """DDNM+ (Wang et al. 2023, Eqs. 17-19): DDPM steps with the scaled range-space fix.

    Each step ``t -> s`` is the DDPM posterior ``N(a_t x0 + b_t x_t, sigma_t^2)`` of
    :func:`jaxgen.sampling.ddim` at ``eta = 1``, with ``x0`` replaced by
    ``D - lambda_t A^+ (A D - y)`` and the variance by ``gamma_t`` (module docstring).
    ``path`` (:func:`travel_path`; default: straight down) adds time travel (Sec. 3.3):
    a jump back from ``t`` to ``u > t`` draws ``x_u ~ q(x_u | x_t)``, the forward
    process, as their Sec. 3.3 rolls back and RePaint resamples (their code instead
    re-noises its last, uncorrected ``x0`` estimate: ``x_u ~ q(x_u | x0)``), so a chain
    at its target law stays there. Its noise is that of path position ``n``, as a
    step's is (position ``n`` is step ``n`` without travel).
    """
    alpha, sigma = process.alpha(ts), process.sigma(ts)
    path = np.arange(len(ts)) if path is None else np.asarray(path)
    travels = bool(np.any(np.diff(path) < 0))
    src, dst = jnp.asarray(path[:-1]), jnp.asarray(path[1:])

    def restore(x, state, i, n):
        x0, _, state = denoise.step(x, ts[i], state)
        a, s, a1, s1 = alpha[i], sigma[i], alpha[i + 1], sigma[i + 1]
        var = jnp.clip((s1 / s) ** 2 * (s**2 - (a / a1 * s1) ** 2), 0.0, s1**2)
        b = jnp.sqrt(s1**2 - var) / s
        coef, std = a1 - b * a, jnp.sqrt(var)  # a_t and sigma_t of Eq. 19
        noisy = coef * noise_std > std
        lam = jnp.where(noisy, std / jnp.where(noisy, coef * noise_std, 1.0), 1.0)
        gamma = jnp.maximum(var - (coef * lam * noise_std) ** 2, 0.0)
        x0 = x0 - lam * operator.pinv(operator(x0) - y)
        return coef * x0 + b * x + jnp.sqrt(gamma) * step_noise(keys, n, x), state

    def travel(x, state, i, j, n):
        r = alpha[j] / alpha[i]  # q(x_u | x_t) = N(r x_t, sigma_u^2 - r^2 sigma_t^2)
        std = jnp.sqrt(jnp.maximum(sigma[j] ** 2 - (r * sigma[i]) ** 2, 0.0))
        return r * x + std * step_noise(keys, n, x), state

    def step(carry, n):
        x, state = carry
        if not travels:  # the plain chain compiles no branch
            return restore(x, state, src[n], n), None
        go = lambda x, state: restore(x, state, src[n], n)
        back = lambda x, state: travel(x, state, src[n], dst[n], n)
        return lax.cond(dst[n] > src[n], go, back, x, state), None

    return lax.scan(step, (x, denoise.init(x)), jnp.arange(len(path) - 1))[0][0]


@functools.partial(jax.jit, static_argnums=0)
def _run(config, params, key, ts, y, cond, x_T):
    model_fn, process, prediction, operator, method, solver, options, shape, extra = config
    per_sample = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(shape[0]))
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(per_sample)
    if x_T is None:
        draw = lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape[1:], ts.dtype)
        x_T = process.sigma(ts[0]) * jax.vmap(draw)(per_sample)
    denoise = make_denoiser(functools.partial(model_fn, params), process, prediction, cond)
    if method == "ddnm+":
        noise_std, path = dict(extra)["noise_std"], dict(extra)["path"]
        return ddnm_plus(denoise, x_T, ts, step_keys, process, operator=operator, y=y,
                         noise_std=noise_std, path=path)
    extra = {k: v for k, v in extra if k != "path"}
    denoise = posterior_denoiser(denoise, process, operator, y, method=method, **extra)
    spec = SOLVERS[solver]
    return spec.fn(denoise, x_T, ts, step_keys, process, **(dict(spec.fixed) | dict(options)))


def posterior_sample(
    model_fn: Callable,
    params: Any,
    process,
    key: jax.Array,
    y: jax.Array,
    operator,
    shape: tuple[int, ...],
    *,
    prediction: str,
    method: str = "pigdm",
    noise_std: float = 0.0,
    zeta: float = 1.0,
    data_var: float = 1.0,
    solver: str = "ddim",
    steps: int = 100,
    solver_options: dict | None = None,
    cond: Any = None,
    x_T: jax.Array | None = None,
    travel_length: int = 0,
    travel_interval: int | None = None,
    travel_repeat: int = 2,
) -> tuple[jax.Array, dict]:
    """Sample ``p(x0 | y)`` for ``y = A x0 + n`` with a diffusion prior (module docstring).

    Args:
      model_fn: the prior, ``model_fn(params, x_t, t, cond) -> prediction``.
      params: its weights (a traced argument).
      process: the noise process the model was trained with.
      key: PRNG key; sample ``i`` depends only on ``(key, i)``.
      y: measurements, ``[B, ...]`` of ``operator.out_shape(shape)``.
      operator: the linear operator ``A``.
      shape: ``(B, H, W, C)`` of the samples.
      prediction: what ``model_fn`` returns.
      method: ``"pigdm"``, ``"dps"``, ``"ddnm"`` or ``"ddnm+"`` (with ``solver="ddpm"``).
      noise_std: measurement noise std; must be 0 for ``ddnm``.
      zeta: DPS step size. data_var: PiGDM's data variance.
      solver: a name in :data:`jaxgen.sampling.SOLVERS`; steps: its step count.
      solver_options: its keyword options.
      cond: conditioning pytree for the prior, or ``None``.
      x_T: starting point at the grid's first time (overrides the noise from ``key``).
      travel_length, travel_interval, travel_repeat: ``ddnm+`` only: time travel
        ``l``, ``s``, ``r`` of :func:`travel_path` (``travel_length = 0``: none).

    Returns:
      ``(x0, info)`` with ``info = {"nfe", "timesteps"}``; for ``dps`` and ``pigdm``
      every model evaluation also runs a vector-Jacobian product; with time travel
      ``nfe`` counts the stretches sampled again, and ``info["path"]`` gives the grid
      indices visited.
    """
    if method not in METHODS:
        raise InputError(f"method={method!r}: use one of {', '.join(METHODS)}.")
    if method == "ddnm" and noise_std:
        raise InputError(
            f"method='ddnm' is for noiseless y (noise_std={noise_std}); use 'ddnm+' or 'pigdm'."
        )
    if method == "ddnm+" and solver != "ddpm":
        raise InputError(
            f"method='ddnm+' is its own ancestral sampler; pass solver='ddpm' (got {solver!r})."
        )
    if noise_std < 0 or data_var <= 0 or zeta <= 0:
        raise InputError(
            f"noise_std={noise_std}, data_var={data_var}, zeta={zeta}: need >= 0, > 0."
        )
    if travel_length and method != "ddnm+":
        raise InputError(f"travel_length={travel_length}: time travel is an option of "
                         f"method='ddnm+', not {method!r}.")
    spec, options = check_solver(solver, solver_options)
    path = travel_path(steps, travel_length, travel_interval, travel_repeat)
    shape = tuple(int(s) for s in shape)
    want = tuple(operator.out_shape(shape))
    if tuple(jnp.shape(y)) != want:
        raise InputError(
            f"y has shape {tuple(jnp.shape(y))}; {operator!r} on {shape} gives {want}."
        )
    ts = make_grid(process.default_grid, process, steps)
    extra = (("noise_std", noise_std), ("zeta", zeta), ("data_var", data_var),
             ("path", tuple(path.tolist())))
    config = (model_fn, process, prediction, operator, method, solver, options, shape, extra)
    ts_in = jnp.asarray(ts, jnp.result_type(float))
    x = _run(config, params, key, ts_in, jnp.asarray(y), cond, x_T)
    clean_end = float(process.sigma(jnp.asarray(ts[-1]))) == 0.0
    nfe = spec.evals_per_step * steps - (spec.free_final if clean_end else 0)
    if method == "ddnm+":  # one evaluation per step down the path, travel included
        nfe = int(np.sum(np.diff(path) > 0))
        return x, {"nfe": nfe, "timesteps": ts, "path": path}
    return x, {"nfe": nfe, "timesteps": ts}
