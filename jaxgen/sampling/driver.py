"""The one sampling driver: checks, jits, scans, shards, counts NFE; and a batch generator."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxgen.diffusion.predictions import check_prediction
from jaxgen.diffusion.vlb import check_discrete_vp
from jaxgen.errors import InputError
from jaxgen.parallel import batch_sharding, pad_batch, to_host
from jaxgen.sampling import solvers
from jaxgen.sampling.grids import make_grid
from jaxgen.sampling.guidance import PERTURB_KEY, Guidance, make_denoiser


@dataclasses.dataclass(frozen=True)
class SolverSpec:
    """A registered solver: the function, the options its name fixes, and its cost.

    ``nfe = evals_per_step * steps - free_final`` when the grid ends at the
    clean point (the stages there are the identity, not a model call).
    ``learned_variance``: the solver reads the model's variance channels (a denoiser
    built with ``learned_variance=True``); ``grid``: its default time grid (``None``:
    the process's).
    """

    fn: Callable
    fixed: tuple = ()
    evals_per_step: int = 1
    free_final: int = 0
    learned_variance: bool = False
    grid: str | None = None

    def options(self) -> set[str]:
        """Keyword options a user may set."""
        params = inspect.signature(self.fn).parameters.values()
        return {p.name for p in params if p.kind is p.KEYWORD_ONLY} - dict(self.fixed).keys()


SOLVERS = {
    "ddpm": SolverSpec(solvers.ddim, (("eta", 1.0),)),
    # IDDPM/ADM/DiT: a learn_sigma model's variance, on IDDPM's respaced grid by default.
    "ddpm_learned": SolverSpec(solvers.ddpm_learned, learned_variance=True, grid="iddpm"),
    "ddim": SolverSpec(solvers.ddim),
    "euler": SolverSpec(solvers.runge_kutta, (("tableau", "euler"),)),
    "midpoint": SolverSpec(solvers.runge_kutta, (("tableau", "midpoint"),), 2),
    "heun": SolverSpec(solvers.runge_kutta, (("tableau", "heun"),), 2, 1),
    "rk4": SolverSpec(solvers.runge_kutta, (("tableau", "rk4"),), 4, 1),
    "dpmpp_2m": SolverSpec(solvers.dpmpp_2m),
    "dpmpp_3m": SolverSpec(solvers.dpmpp_3m),
    "unipc_bh1": SolverSpec(solvers.unipc, (("variant", "bh1"),)),
    "unipc_bh2": SolverSpec(solvers.unipc, (("variant", "bh2"),)),
    "euler_maruyama": SolverSpec(solvers.euler_maruyama),
    # k-diffusion's stochastic samplers; eta is a default here, not fixed.
    "euler_ancestral": SolverSpec(functools.partial(solvers.ddim, eta=1.0)),
    "dpmpp_2m_sde": SolverSpec(functools.partial(solvers.dpmpp_2m, eta=1.0)),
    "dpmpp_3m_sde": SolverSpec(functools.partial(solvers.dpmpp_3m, eta=1.0)),
    # Restart steps come out of the grid's budget: the cost of `steps` Heun steps.
    "restart": SolverSpec(solvers.restart, (), 2, 1),
    "sa_solver": SolverSpec(solvers.sa_solver),
}


@dataclasses.dataclass(frozen=True)
class _Config:
    """Everything static about a sampling run: one compilation per distinct value."""

    model_fn: Callable
    process: Any
    prediction: str
    solver: str
    options: tuple
    shape: tuple
    guided: bool
    pag: bool
    guide_fn: Callable | None
    mesh: Mesh | None
    cache_interval: int | None


def _run(config: _Config, params, key, first_index, ts, x_T, cond, uncond, gparams, guide_params):
    b = config.shape[0]
    ids = first_index + jnp.arange(b)
    per_sample = jax.vmap(lambda i: jax.random.fold_in(key, i))(ids)
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(per_sample)
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, 1))(per_sample)
    if x_T is None:
        draw = lambda k: jax.random.normal(k, config.shape[1:], ts.dtype)
        x_T = config.process.sigma(ts[0]) * jax.vmap(draw)(init_keys)
    if config.mesh is not None:
        shard = lambda a: jax.lax.with_sharding_constraint(a, batch_sharding(config.mesh))
        x_T, step_keys = shard(x_T), shard(step_keys)
        cond = jax.tree.map(shard, cond)
    guidance = None
    if config.guided:
        guide_fn = None if config.guide_fn is None else functools.partial(config.guide_fn,
                                                                          guide_params)
        guidance = Guidance.from_dynamic(gparams, uncond, guide_fn, config.pag)
    # Weights are traced arguments: bound here, inside the trace, never baked in as constants.
    model_fn = functools.partial(config.model_fn, params)
    spec = SOLVERS[config.solver]
    denoise = make_denoiser(model_fn, config.process, config.prediction, cond, guidance,
                            cache_interval=config.cache_interval,
                            learned_variance=spec.learned_variance)
    options = dict(spec.fixed) | dict(config.options)
    return spec.fn(denoise, x_T, ts, step_keys, config.process, **options)


_run_jit = jax.jit(_run, static_argnums=0)


def check_solver(solver: str, options: dict | None) -> tuple[SolverSpec, tuple]:
    """The spec of ``solver`` and its ``options`` as a sorted tuple (hashable, for jit).

    Raises:
      InputError: an unknown solver, or options it does not take.
    """
    if solver not in SOLVERS:
        raise InputError(f"solver={solver!r}: use one of {', '.join(SOLVERS)}.")
    spec, options = SOLVERS[solver], dict(options or {})
    unknown = options.keys() - spec.options()
    if unknown:
        raise InputError(
            f"solver_options {sorted(unknown)} are not options of solver={solver!r}; "
            f"it takes {sorted(spec.options()) or 'none'}."
        )
    return spec, tuple(sorted(options.items()))


# Models found to support PAG / feature caching, by (check, model_fn, shape, cond's
# shapes): the abstract trace of a check runs once, not on every batch of `generate`.
_SUPPORTED: set = set()


def _once(check: Callable) -> Callable:
    @functools.wraps(check)
    def checked(model_fn, params, shape, cond, *args):
        leaves = tuple((jnp.shape(a), jnp.result_type(a)) for a in jax.tree.leaves(cond))
        key = (check.__name__, model_fn, shape, jax.tree.structure(cond), leaves, args)
        if key not in _SUPPORTED:
            check(model_fn, params, shape, cond, *args)
            _SUPPORTED.add(key)

    return checked


@_once
def _check_perturbable(model_fn: Callable, params, shape: tuple, cond) -> None:
    """Refuse perturbed-attention guidance, before tracing the sampler, for a model without it."""
    flag = {PERTURB_KEY: jax.ShapeDtypeStruct(shape[:1], jnp.bool_)}
    x = jax.ShapeDtypeStruct(shape, jnp.result_type(float))
    try:
        jax.eval_shape(model_fn, params, x, x.update(shape=shape[:1]), {**(cond or {}), **flag})
    except InputError as e:
        raise InputError(
            f"Guidance pag_scale needs a model that reads cond[{PERTURB_KEY!r}] (jaxgen's DiT "
            f"and U-Net); this one refused it: {e}"
        ) from None


@_once
def _check_cacheable(model_fn: Callable, params, shape: tuple, cond, interval) -> None:
    """Refuse feature caching, before tracing the sampler, for a model without it."""
    if not isinstance(interval, int | np.integer) or interval < 1:
        raise InputError(f"cache_interval={interval!r}: an int >= 1 (None: no cache).")
    x = jax.ShapeDtypeStruct(shape, jnp.result_type(float))
    try:
        out = jax.eval_shape(
            lambda p, x: model_fn(p, x, jnp.zeros(shape[:1], x.dtype), cond, fill_cache=True),
            params,
            x,
        )
        ok = isinstance(out, tuple) and len(out) == 2
    except (TypeError, InputError):
        ok = False
    if not ok:
        raise InputError(
            "cache_interval needs a model_fn taking fill_cache=True (-> (prediction, "
            "features)) and cache=features: jaxgen's DiT and U-Net through as_model_fn."
        )


@_once
def _check_variance(model_fn: Callable, params, shape: tuple, cond) -> None:
    """Refuse a learned-variance solver, before tracing it, for a model without variance."""
    x = jax.ShapeDtypeStruct(shape, jnp.result_type(float))
    try:
        out = jax.eval_shape(lambda p, x: model_fn(p, x, jnp.zeros(shape[:1], x.dtype), cond,
                                                   keep_variance=True), params, x)
        ok = getattr(out, "shape", None) == (*shape[:-1], 2 * shape[-1])
    except (TypeError, InputError):
        ok = False
    if not ok:
        raise InputError(
            "solver='ddpm_learned' needs a model_fn taking keep_variance=True (-> 2C channels: "
            "prediction, variance): as_model_fn of a model built with learn_sigma=True."
        )


def _check_start(process, prediction: str, ts: np.ndarray, solver: str, options: tuple) -> None:
    alpha0 = float(process.alpha(jnp.asarray(ts[0])))
    if prediction in ("eps", "score") and (
        alpha0 == 0.0 or getattr(process, "zero_terminal_snr", False)
    ):
        raise InputError(
            f"prediction={prediction!r} cannot give x0 at t={ts[0]:g}, where alpha = 0 on "
            f"{process!r} (x_t is pure noise); use an 'x0', 'v' or 'velocity' model."
        )
    if ts[0] > process.t_max * (1 + 1e-6):
        raise InputError(f"the time grid starts at {ts[0]:g}, past t_max={process.t_max:g}.")
    if solver == "euler_maruyama" and dict(options).get("diffusion") == "sbdm":
        w = np.asarray(process.d_logsnr(jnp.asarray(ts[:-1])))
        if not np.all(np.isfinite(w)):
            raise InputError(
                f"diffusion='sbdm' is infinite at t={ts[0]:g} on {process!r}; "
                "use diffusion='sigma' or 'constant'."
            )


def _plan(process, grid, steps: int, prediction: str, solver: str, options: tuple):
    """The time grid (checked against the process and prediction) and whether it ends clean.

    Computed on concrete values also when ``sample`` is called inside a trace (a train
    step that integrates a teacher's ODE, :func:`jaxgen.sampling.teacher.reflow_pairs`).
    """
    with jax.ensure_compile_time_eval():
        ts = make_grid(process.default_grid if grid is None else grid, process, steps)
        _check_start(process, prediction, ts, solver, options)
        return ts, float(process.sigma(jnp.asarray(ts[-1]))) == 0.0


# Named grids are pure functions of hashable arguments: plan once, so that a
# repeated call to ``sample`` costs only the dispatch of the compiled program.
_plan_named = functools.lru_cache(maxsize=256)(_plan)


def sample(
    model_fn: Callable,
    params: Any,
    process,
    key: jax.Array,
    shape: tuple[int, ...],
    *,
    prediction: str,
    solver: str = "dpmpp_2m",
    steps: int = 20,
    grid: str | Callable | np.ndarray | None = None,
    cond: Any = None,
    guidance: Guidance | None = None,
    x_T: jax.Array | None = None,
    mesh: Mesh | None = None,
    solver_options: dict | None = None,
    first_index: int = 0,
    cache_interval: int | None = None,
) -> tuple[jax.Array, dict]:
    """Draw samples by solving the reverse process from ``t_max`` to 0.

    Sample ``i`` of the batch is the sample of index ``first_index + i`` of the
    run: its noise comes from ``fold_in(key, first_index + i)`` alone, so the
    result does not depend on the batch size or the number of devices.

    Args:
      model_fn: ``model_fn(params, x_t, t, cond) -> prediction``, ``t`` of shape ``[B]``.
        Compiled programs are cached on its identity: build it once, not per call.
      params: the weights, a traced argument of the compiled program (a new
        checkpoint or EMA never recompiles); any pytree, ``None`` for none.
      process: the noise process the model was trained with.
      key: PRNG key (the seed of the run).
      shape: ``(B, ...)`` of the samples.
      prediction: what ``model_fn`` returns: ``eps``, ``x0``, ``v``, ``velocity`` or ``score``.
      solver: a name in :data:`SOLVERS`.
      steps: number of solver steps (intervals of the time grid), >= 1.
      grid: a name in :data:`jaxgen.sampling.grids.GRIDS`, a callable
        ``(process, steps) -> ts`` or explicit times; default the solver's
        (``iddpm`` for ``ddpm_learned``), else the process's ``default_grid``
        (``trailing`` for discrete VP, ``logsnr`` for continuous VP, ``karras``
        for EDM, ``uniform`` for flows).
      cond: conditioning pytree with leading axis ``B``, or ``None``.
      guidance: a :class:`Guidance` or ``None``.
      x_T: starting point at ``ts[0]`` (already scaled); overrides the noise from ``key``.
      mesh: shard the batch over this mesh (it is padded to a multiple of its size).
      solver_options: solver-specific keywords (``eta``, ``s_churn``, ``order``, ...).
      first_index: index of the first sample of this batch within the run.
      cache_interval: feature caching (DeepCache on the U-Net, FORA on DiT): a full
        model call every ``cache_interval`` calls, cheap calls reusing its features
        in between (:func:`~jaxgen.sampling.guidance.make_denoiser`); ``None``: off.
        The model must take ``fill_cache`` / ``cache`` keywords (``as_model_fn``
        of a DiT or U-Net). ``nfe`` counts the cheap calls too.

    Returns:
      ``(x0, info)`` with ``info = {"nfe": denoiser evaluations, "model_passes",
      "timesteps": ts}``. With autoguidance each evaluation calls two models; with CFG
      it is one call on a doubled batch (a tripled one with PAG); ``model_passes``
      counts every network pass per sample (``nfe`` times 1, 2 or 3).
    """
    spec, options = check_solver(solver, solver_options)
    if not isinstance(steps, int | np.integer) or steps < 1:
        raise InputError(f"steps={steps!r} must be an int >= 1.")
    check_prediction(prediction)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise InputError(f"shape={shape}: need (batch, ...) with every size >= 1.")
    grid = spec.grid if grid is None else grid
    if spec.learned_variance:
        check_discrete_vp(process, f"solver={solver!r}")
        _check_variance(model_fn, params, shape, cond)
    plan = _plan_named if grid is None or isinstance(grid, str) else _plan
    ts, clean_end = plan(process, grid, int(steps), prediction, solver, options)
    if guidance is not None:
        guidance.check(cond)
        if guidance.pag_scale:
            _check_perturbable(model_fn, params, shape, cond)
    if cache_interval is not None:
        _check_cacheable(model_fn, params, shape, cond, cache_interval)
    if x_T is not None and tuple(x_T.shape) != shape:
        raise InputError(f"x_T has shape {tuple(x_T.shape)}; shape={shape}.")

    batch = shape[0]
    devices = mesh.size if mesh is not None else 1
    rows = math.ceil(batch / devices) * devices
    if rows != batch:
        x_T = None if x_T is None else pad_batch(jnp.asarray(x_T), devices)[0]
        cond = None if cond is None else pad_batch(jax.tree.map(jnp.asarray, cond), devices)[0]
    config = _Config(
        model_fn,
        process,
        prediction,
        solver,
        options,
        (rows, *shape[1:]),
        guidance is not None,
        guidance is not None and guidance.pag_scale != 0,
        None if guidance is None else guidance.guide_fn,
        mesh,
        cache_interval,
    )
    gparams = Guidance(1.0).dynamic() if guidance is None else guidance.dynamic()
    uncond = None if guidance is None else guidance.uncond
    guide_params = None if guidance is None else guidance.guide_params
    ts_in = ts.astype(jnp.result_type(float))  # float32 unless x64 is enabled
    x = _run_jit(config, params, key, first_index, ts_in, x_T, cond, uncond, gparams,
                 guide_params)
    nfe = spec.evals_per_step * int(steps) - (spec.free_final if clean_end else 0)
    info = {"nfe": nfe, "model_passes": nfe * _passes(guidance), "timesteps": ts.copy()}
    return (x if rows == batch else x[:batch]), info


def _passes(guidance: Guidance | None) -> int:
    """Network passes per sample and evaluation: conditional, unconditional or weak, perturbed."""
    if guidance is None:
        return 1
    return 1 + (guidance.uncond is not None or guidance.guide_fn is not None) + (
        guidance.pag_scale != 0
    )


def to_uint8(x: jax.Array) -> jax.Array:
    """Model space [-1, 1] to uint8: ``floor((x + 1) * 127.5 + 0.5)`` clipped to [0, 255]."""
    return jnp.clip(jnp.floor((x + 1) * 127.5 + 0.5), 0, 255).astype(jnp.uint8)


_to_uint8_jit = jax.jit(to_uint8)
# A latent model's samples go through its decoder first; its weights stay traced.
_decode_uint8_jit = jax.jit(lambda decode, params, x: to_uint8(decode(params, x)),
                            static_argnums=0)


def generate(
    model_fn: Callable,
    params: Any,
    process,
    key: jax.Array,
    sample_shape: tuple[int, int, int],
    *,
    num: int,
    batch_size: int,
    cond: Any = None,
    decode: Callable | None = None,
    decode_params: Any = None,
    sampler: Callable | None = None,
    **sample_kwargs,
) -> Iterator[np.ndarray]:
    """Yield ``num`` samples as uint8 NHWC batches of at most ``batch_size``.

    Sample ``i`` is the same whatever ``batch_size`` (see :func:`sample`). The
    next batch is dispatched before the current one is handed over, so the
    device keeps working while the caller consumes; only two batches are ever
    held.

    Args:
      model_fn, params, process, key: as for :func:`sample`.
      sample_shape: ``(H, W, C)``.
      num: total number of samples.
      batch_size: samples per device call (the last batch is computed at full
        size and cut, so one compilation serves the whole run).
      cond: ``None``, a pytree with leading axis ``num``, or a callable
        ``cond(indices) -> pytree`` for the sample indices of a batch.
      decode: ``decode(decode_params, x) -> images`` in [-1, 1], applied to the
        samples before the uint8 rule (a latent model's VAE decoder); one function
        object per run (compilations are cached on it).
      decode_params: its weights, a traced argument.
      sampler: the batch sampler, called as :func:`sample` is (default :func:`sample`;
        :func:`jaxgen.sampling.consistency_sample` for a consistency model).
      **sample_kwargs: passed to the sampler (``prediction``, ``solver``, ``steps``, ...).
    """
    if len(tuple(sample_shape)) != 3:
        raise InputError(f"sample_shape={sample_shape}: generate yields images, give (H, W, C).")
    if num < 1 or batch_size < 1:
        raise InputError(f"num={num}, batch_size={batch_size}: both must be >= 1.")

    def launch(start):
        idx = np.arange(start, start + batch_size)
        if callable(cond):
            c = cond(idx)
        elif cond is not None:
            c = jax.tree.map(lambda a: jnp.asarray(a)[np.minimum(idx, num - 1)], cond)
        else:
            c = None
        x, _ = (sampler or sample)(
            model_fn,
            params,
            process,
            key,
            (batch_size, *sample_shape),
            cond=c,
            first_index=start,
            **sample_kwargs,
        )
        return _to_uint8_jit(x) if decode is None else _decode_uint8_jit(decode, decode_params, x)

    pending = launch(0)
    for start in range(0, num, batch_size):
        following = launch(start + batch_size) if start + batch_size < num else None
        yield to_host(pending)[: min(batch_size, num - start)]
        pending = following


