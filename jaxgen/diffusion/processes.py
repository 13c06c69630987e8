"""Noise processes ``x_t = alpha(t) x0 + sigma(t) eps`` and their log-SNR.

Every process is a small frozen dataclass (hashable, so it can be a static
argument under ``jax.jit``) with the same five methods: ``alpha``, ``sigma``,
``logsnr`` (``log(alpha^2 / sigma^2)``), ``t_from_logsnr`` (its inverse) and
the time derivatives ``d_alpha`` / ``d_sigma`` used by velocity conversions.
``t_max`` is the true terminal time where sampling starts; ``t_min`` is the
smallest time a sampler evaluates the model at before the final jump to the
clean point ``t = 0``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.errors import InputError

# score_sde's continuous VP-SDE: beta(t) = beta_min + t (beta_max - beta_min),
# i.e. N * (1e-4 .. 0.02) for N = 1000 discrete steps.
_BETA_MIN, _BETA_MAX = 0.1, 20.0
_COSINE_S = 0.008  # Nichol & Dhariwal (2021) Eq. 17 offset.
# Terminal time of the continuous cosine schedule, DPM-Solver's choice
# (Lu et al. 2022, NoiseScheduleVP: T = 0.9946): alpha(1) = 0 exactly, so the
# schedule is cut where logsnr is still finite (about -10.4).
_COSINE_T_MAX = 0.9946


class ProcessBase:
    """Shared derived quantities; subclasses define alpha, sigma, logsnr, t_from_logsnr."""

    def d_alpha(self, t):
        """d alpha / dt."""
        t = jnp.asarray(t, jnp.result_type(float))
        return jax.jvp(self.alpha, (t,), (jnp.ones_like(t),))[1]

    def d_sigma(self, t):
        """d sigma / dt."""
        t = jnp.asarray(t, jnp.result_type(float))
        return jax.jvp(self.sigma, (t,), (jnp.ones_like(t),))[1]

    def d_logsnr(self, t):
        """d logsnr / dt (negative: noise grows with t)."""
        t = jnp.asarray(t, jnp.result_type(float))
        return jax.jvp(self.logsnr, (t,), (jnp.ones_like(t),))[1]


@functools.cache
def _ddpm_table(schedule: str, num_steps: int, zero_terminal_snr: bool):
    """(alpha_k, sigma_k) for k = 0..N in float64, with (1, 0) prepended at t = 0.

    Linear: Ho et al. (2020) Sec. 4, betas 1e-4..0.02 (scaled by 1000/N).
    Cosine: Nichol & Dhariwal (2021) Eq. 17, betas clipped at 0.999.
    Zero terminal SNR: Lin et al. (2024) Algorithm 1 on sqrt(alpha_bar).
    """
    n = num_steps
    if schedule == "linear":
        scale = 1000.0 / n
        betas = np.linspace(scale * 1e-4, scale * 0.02, n, dtype=np.float64)
    else:
        f = lambda u: np.cos((u / n + _COSINE_S) / (1 + _COSINE_S) * np.pi / 2) ** 2
        k = np.arange(n, dtype=np.float64)
        betas = np.minimum(1 - f(k + 1) / f(k), 0.999)
    alpha_bar = np.cumprod(1.0 - betas)
    a = np.sqrt(alpha_bar)
    one_minus_abar = -np.expm1(np.cumsum(np.log1p(-betas)))  # exact near t = 0
    if zero_terminal_snr:
        a0, a_t = a[0], a[-1]
        a = (a - a_t) * a0 / (a0 - a_t)
        one_minus_abar = 1.0 - a**2
        one_minus_abar[0] = -np.expm1(np.log1p(-betas[0]))  # a0 is kept exactly
    s = np.sqrt(np.maximum(one_minus_abar, 0.0))
    return np.concatenate([[1.0], a]), np.concatenate([[0.0], s])


@dataclasses.dataclass(frozen=True)
class VP(ProcessBase):
    """Variance-preserving process (DDPM), ``alpha^2 + sigma^2 = 1``.

    Args:
      schedule: ``"linear"`` (Ho et al. 2020) or ``"cosine"`` (Nichol & Dhariwal 2021).
      num_steps: ``N`` for the exact discrete DDPM schedule, evaluated at
        ``t = k / N`` for index ``k = 1..N`` (a model trained on integer index
        ``i = k - 1`` sees ``t * N - 1``); between grid points ``alpha`` and
        ``sigma`` are interpolated linearly. ``None`` gives the continuous-time
        form (score_sde's VP-SDE for linear, Nichol's ``alpha_bar(t)`` for cosine).
      zero_terminal_snr: rescale so that ``alpha(t_max) = 0`` (Lin et al. 2024,
        Algorithm 1). Needs an ``x0``, ``v`` or ``velocity`` model: ``eps``
        carries no information about ``x0`` at zero SNR.
      shift: resolution shift of simple diffusion (Hoogeboom et al. 2023, Eq. 4):
        ``logsnr(t) -> logsnr(t) - 2 log(shift)``; use ``shift = resolution / 64``.
    """

    schedule: str = "linear"
    num_steps: int | None = 1000
    zero_terminal_snr: bool = False
    shift: float = 1.0

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine"):
            raise InputError(f"VP schedule={self.schedule!r}: use 'linear' or 'cosine'.")
        if self.num_steps is not None and (
            not isinstance(self.num_steps, int) or self.num_steps < 2
        ):
            raise InputError(f"VP num_steps={self.num_steps!r}: use an int >= 2 or None.")
        if not self.shift > 0:
            raise InputError(f"VP shift={self.shift!r} must be > 0.")

    @property
    def t_max(self) -> float:
        """Terminal time where sampling starts."""
        if self.num_steps is None and self.schedule == "cosine":
            return _COSINE_T_MAX
        return 1.0

    @property
    def t_min(self) -> float:
        """Smallest noisy time a sampler visits before jumping to t = 0."""
        return 1.0 / self.num_steps if self.num_steps else 1e-3

    @property
    def default_grid(self) -> str:
        """Grid used by ``sampling.sample`` when none is given."""
        if self.zero_terminal_snr:
            return "uniform" if self.num_steps is None else "trailing"
        return "trailing" if self.num_steps else "logsnr"

    # (alpha, sigma) of the unshifted schedule, sigma computed without
    # cancellation so that logsnr stays accurate near t = 0.
    def _base(self, t):
        t = jnp.asarray(t, jnp.result_type(float))
        if self.num_steps:
            # Linear interpolation on the uniform grid k / N, by direct indexing.
            a_tab, s_tab = _ddpm_table(self.schedule, self.num_steps, self.zero_terminal_snr)
            pos = jnp.clip(t, 0.0, 1.0) * self.num_steps
            k = jnp.clip(jnp.floor(pos), 0, self.num_steps - 1).astype(jnp.int32)
            u = pos - k
            a_tab, s_tab = jnp.asarray(a_tab, t.dtype), jnp.asarray(s_tab, t.dtype)
            a = a_tab[k] + u * (a_tab[k + 1] - a_tab[k])
            return a, s_tab[k] + u * (s_tab[k + 1] - s_tab[k])
        if self.schedule == "linear":
            half_log_abar = -0.5 * (_BETA_MIN * t + 0.5 * (_BETA_MAX - _BETA_MIN) * t**2)
            a, one_minus_a = jnp.exp(half_log_abar), -jnp.expm1(half_log_abar)
        else:
            phi = lambda u: (u + _COSINE_S) / (1 + _COSINE_S) * jnp.pi / 2
            c0 = jnp.cos(phi(0.0))
            a = jnp.cos(phi(t)) / c0
            # cos(phi0) - cos(phi) as a product of sines: exact 0 at t = 0.
            half_sum = (t / 2 + _COSINE_S) / (1 + _COSINE_S) * jnp.pi / 2
            half_diff = t / 2 / (1 + _COSINE_S) * jnp.pi / 2
            one_minus_a = 2 * jnp.sin(half_sum) * jnp.sin(half_diff) / c0
        if self.zero_terminal_snr:
            a_end = self._continuous_alpha_end()
            # a_end is a float64 constant; clamp float32 rounding below zero at t_max.
            a, one_minus_a = jnp.maximum(a - a_end, 0) / (1 - a_end), one_minus_a / (1 - a_end)
        return a, jnp.sqrt(one_minus_a * (2 - one_minus_a))

    def _continuous_alpha_end(self) -> float:
        t = self.t_max
        if self.schedule == "linear":
            return math.exp(-0.5 * (_BETA_MIN * t + 0.5 * (_BETA_MAX - _BETA_MIN) * t**2))
        phi = lambda u: (u + _COSINE_S) / (1 + _COSINE_S) * math.pi / 2
        return math.cos(phi(t)) / math.cos(phi(0.0))

    def logsnr(self, t):
        """log(alpha^2 / sigma^2) at time t."""
        a, s = self._base(t)
        return 2 * (jnp.log(a) - jnp.log(s)) - 2 * math.log(self.shift)

    # With shift k, alpha^2 = sigmoid(logsnr) = a^2 / (a^2 + k^2 s^2): written
    # through (a, s) it stays differentiable where logsnr is infinite.
    def alpha(self, t):
        """Signal scale alpha(t) = sqrt(sigmoid(logsnr))."""
        a, s = self._base(t)
        return a * jax.lax.rsqrt(a * a + (self.shift * s) ** 2)

    def sigma(self, t):
        """Noise scale sigma(t) = sqrt(sigmoid(-logsnr))."""
        a, s = self._base(t)
        return self.shift * s * jax.lax.rsqrt(a * a + (self.shift * s) ** 2)

    def t_from_logsnr(self, lam):
        """The time t with logsnr(t) = lam (exact inverse, piecewise for discrete)."""
        lam0 = jnp.asarray(lam, jnp.result_type(float)) + 2 * math.log(self.shift)
        if self.num_steps:
            a_tab, s_tab = _ddpm_table(self.schedule, self.num_steps, self.zero_terminal_snr)
            with np.errstate(divide="ignore"):
                lam_tab = 2 * (np.log(a_tab) - np.log(s_tab))  # +inf at k=0, decreasing
            k = jnp.searchsorted(jnp.asarray(-lam_tab, lam0.dtype), -lam0, side="right") - 1
            k = jnp.clip(k, 0, self.num_steps - 1)
            a_k, s_k = jnp.asarray(a_tab, lam0.dtype)[k], jnp.asarray(s_tab, lam0.dtype)[k]
            da = jnp.asarray(a_tab, lam0.dtype)[k + 1] - a_k
            ds = jnp.asarray(s_tab, lam0.dtype)[k + 1] - s_k
            r = jnp.exp(jnp.clip(lam0 / 2, -60.0, 60.0))  # alpha / sigma on the segment
            u = jnp.clip((r * s_k - a_k) / (da - r * ds), 0.0, 1.0)
            t = (k + u) / self.num_steps
            return jnp.where(lam0 == jnp.inf, 0.0, jnp.where(lam0 == -jnp.inf, 1.0, t))
        one_minus_a = jax.nn.sigmoid(-lam0) / (1 + jnp.sqrt(jax.nn.sigmoid(lam0)))
        if self.zero_terminal_snr:
            one_minus_a = one_minus_a * (1 - self._continuous_alpha_end())
        if self.schedule == "linear":
            log_abar = 2 * jnp.log1p(-one_minus_a)
            d = _BETA_MAX - _BETA_MIN
            return -2 * log_abar / (_BETA_MIN + jnp.sqrt(_BETA_MIN**2 - 2 * d * log_abar))
        c0 = math.cos(_COSINE_S / (1 + _COSINE_S) * math.pi / 2)
        phi = jnp.arccos((1 - one_minus_a) * c0)
        return phi * 2 * (1 + _COSINE_S) / jnp.pi - _COSINE_S


@dataclasses.dataclass(frozen=True)
class EDM(ProcessBase):
    """Variance-exploding process of Karras et al. (2022): ``alpha = 1``, ``sigma = t``.

    Args:
      sigma_min: smallest noise level sampled (Table 1: 0.002).
      sigma_max: terminal noise level (Table 1: 80).
      sigma_data: data standard deviation used by preconditioning and the loss weight.
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5

    def __post_init__(self):
        if not 0 < self.sigma_min < self.sigma_max:
            raise InputError(
                f"EDM sigma_min={self.sigma_min}, sigma_max={self.sigma_max}: "
                "need 0 < sigma_min < sigma_max."
            )
        if not self.sigma_data > 0:
            raise InputError(f"EDM sigma_data={self.sigma_data} must be > 0.")

    default_grid = "karras"

    @property
    def t_max(self) -> float:
        """Terminal time (= sigma_max)."""
        return self.sigma_max

    @property
    def t_min(self) -> float:
        """Smallest noisy time (= sigma_min)."""
        return self.sigma_min

    def alpha(self, t):
        """alpha(t) = 1."""
        return jnp.ones_like(jnp.asarray(t, jnp.result_type(float)))

    def sigma(self, t):
        """sigma(t) = t."""
        return jnp.asarray(t, jnp.result_type(float))

    def logsnr(self, t):
        """-2 log t."""
        return -2 * jnp.log(jnp.asarray(t, jnp.result_type(float)))

    def t_from_logsnr(self, lam):
        """exp(-lam / 2)."""
        return jnp.exp(-0.5 * jnp.asarray(lam, jnp.result_type(float)))


@dataclasses.dataclass(frozen=True)
class Flow(ProcessBase):
    """Interpolant between data (t = 0) and noise (t = 1) for flow matching.

    Args:
      path: ``"linear"`` (rectified flow: ``alpha = 1 - t``, ``sigma = t``) or
        ``"gvp"`` (SiT's generalised VP: ``alpha = cos(pi t / 2)``, ``sigma = sin(pi t / 2)``).
    """

    path: str = "linear"

    def __post_init__(self):
        if self.path not in ("linear", "gvp"):
            raise InputError(f"Flow path={self.path!r}: use 'linear' or 'gvp'.")

    t_max = 1.0
    t_min = 0.0
    default_grid = "uniform"

    def alpha(self, t):
        """1 - t (linear) or cos(pi t / 2) (gvp)."""
        t = jnp.asarray(t, jnp.result_type(float))
        # sin(pi/2 (1 - t)) is exactly 0 at t = 1, where float32 cos(pi/2 t) is not.
        return 1 - t if self.path == "linear" else jnp.sin(jnp.pi / 2 * (1 - t))

    def sigma(self, t):
        """t (linear) or sin(pi t / 2) (gvp)."""
        t = jnp.asarray(t, jnp.result_type(float))
        return t if self.path == "linear" else jnp.sin(jnp.pi / 2 * t)

    def logsnr(self, t):
        """2 log(alpha / sigma)."""
        return 2 * (jnp.log(self.alpha(t)) - jnp.log(self.sigma(t)))

    def t_from_logsnr(self, lam):
        """Inverse of logsnr on [0, 1]."""
        lam = jnp.asarray(lam, jnp.result_type(float))
        if self.path == "linear":
            return jax.nn.sigmoid(-lam / 2)
        return 2 / jnp.pi * jnp.arctan(jnp.exp(-lam / 2))


Process = VP | EDM | Flow
