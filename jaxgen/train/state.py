"""Train state, optimizer, EMA and the jitted, sharded train step.

The optimizer is a chain of optax transforms (clip -> AdamW with a warmup +
constant/cosine schedule, or EDM2's inverse square-root decay), wrapped in
:class:`optax.MultiSteps` for gradient accumulation. Parameters and optimizer
state are sharded over the mesh by the models' logical axis names
(:data:`jaxgen.models.LOGICAL_AXIS_RULES`); the batch is split over every mesh
axis. One call of the train step consumes one (micro-)batch; with
``grad_accum = k`` the parameters and EMAs change every ``k`` calls and the
learning-rate schedule counts those updates.

EDM2 (Karras et al., CVPR 2024) as its official training loop does: the
network's fixed ``buffers`` travel in :attr:`TrainState.constants`, the stored
weights are renormalised after every update (:data:`PARAM_CONSTRAINTS`), the
loss is ``diffusion.loss = "edm2"`` and the power-function EMAs of
``train.phema_sigma_rels`` are updated after each update (:attr:`TrainState.phema`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax.traverse_util import flatten_dict
from jax.sharding import Mesh, NamedSharding

from jaxgen import diffusion
from jaxgen.diffusion import vlb
from jaxgen.diffusion.consistency import consistency_precond
from jaxgen.diffusion.edm2_loss import edm2_loss
from jaxgen.errors import InputError
from jaxgen.models import EDM2, LOGICAL_AXIS_RULES, as_model_fn, create_model, force_normalize
from jaxgen.parallel import batch_sharding, replicated
from jaxgen.train import repa
from jaxgen.train.consistency import (
    FEW_STEP_LOSSES,
    check_consistency,
    consistency_function,
    consistency_loss,
    fake_updates,
    generator_terms_on_turn,
    generator_turn,
    target_ema,
    wrap_few_step_model,
)
from jaxgen.train.latent import LatentSpace, load_latent_space, make_to_x0
from jaxgen.train.latent import enabled as latent_enabled
from jaxgen.train.phema import PowerEMAState, power_ema_init, power_ema_update, sigma_rel_to_gamma
from jaxgen.train.schedules import inverse_sqrt_schedule

PROCESSES = {"vp": diffusion.VP, "edm": diffusion.EDM, "flow": diffusion.Flow,
             "trigflow": diffusion.TrigFlow}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("constant", "cosine", "inverse_sqrt")
LOSSES = ("denoising", "edm2", *FEW_STEP_LOSSES)

PARAM_CONSTRAINTS: dict[type, Callable[[Any], Any]] = {EDM2: force_normalize}
"""Modules whose stored weights are projected after init and after every optimizer update:
EDM2's forced weight normalisation (Eq. 66; the official network does it at each
training-mode forward pass, i.e. before the next step uses the weights)."""


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue.

    The fields added after the first five (EDM2's, CD's target, DMD2's fake score)
    are ``None`` when unused; a checkpoint saved before one of them existed
    restores with it ``None`` (:meth:`jaxgen.train.Checkpointer.restore_latest`).

    Attributes:
      step: number of train-step calls so far (micro-batches with accumulation).
      params: model parameters (float32).
      ema: exponential moving averages of ``params``, one per decay, keyed by
        the decay written as a string (``"0.9999"``).
      opt_state: optax state of :func:`make_optimizer`'s transform.
      rng: base PRNG key; step ``s`` uses ``fold_in(rng, s)``.
      constants: the model's variable collections other than ``params``
        (EDM2's ``buffers``: fixed random Fourier features), made at init with
        the parameters, passed to every model call, never optimised nor
        averaged; ``None`` for a model with none.
      phema: the power-function EMAs of ``train.phema_sigma_rels``
        (:class:`jaxgen.train.phema.PowerEMAState`, ``emas[i]`` for the i-th
        sigma_rel); ``None`` when the list is empty.
      target: consistency distillation's target network ``theta-`` (Song et al.
        2023, Algorithm 2: ``theta- <- mu theta- + (1 - mu) theta`` after each update,
        ``mu = distill.target_ema``), given to the loss as ``target_params``;
        ``None`` when ``mu = 0`` (the target is the current weights).
      fake_params: DMD2's fake-score network (``diffusion.loss = "dmd2"``; the
        student's architecture, starting as the teacher's weights), updated at every
        step by :func:`jaxgen.diffusion.distillation.fake_score_loss` on the
        generator's samples; ``params`` are then the one-step generator's, updated
        every ``distill.fake_updates``-th step (:func:`jaxgen.train.consistency.generator_turn`).
        ``None`` for other losses.
      fake_opt_state: the fake score's own optax state (:attr:`RunParts.fake_optimizer`);
        ``None`` for other losses.
    """

    step: jax.Array
    params: Any
    ema: dict[str, Any]
    opt_state: Any
    rng: jax.Array
    constants: dict[str, Any] | None = None
    phema: PowerEMAState | None = None
    target: Any = None
    fake_params: Any = None
    fake_opt_state: Any = None


def ema_name(decay: float) -> str:
    """Key of an EMA in :attr:`TrainState.ema`."""
    return repr(float(decay))


def phema_name(sigma_rel: float) -> str:
    """Name of a power-function EMA: ``"phema:0.05"`` (``load_run``'s ``ema`` argument)."""
    return f"phema:{float(sigma_rel)!r}"


def phema_sigma_rels(config: ml_collections.ConfigDict) -> tuple[float, ...]:
    """``train.phema_sigma_rels`` as a tuple (absent from configs saved before it existed)."""
    return tuple(float(s) for s in config.train.get("phema_sigma_rels", ()))


def default_weights_name(config: ml_collections.ConfigDict) -> str:
    """Name of the weights evaluation and sampling use unless told otherwise.

    The first EMA of ``train.ema_decays``; with none, the first power EMA of
    ``train.phema_sigma_rels`` (EDM2's recipe keeps no classic EMA); with
    neither, the raw parameters (``"params"``).
    """
    if config.train.ema_decays:
        return ema_name(config.train.ema_decays[0])
    sigma_rels = phema_sigma_rels(config)
    return phema_name(sigma_rels[0]) if sigma_rels else "params"


def state_weights(state: TrainState, config: ml_collections.ConfigDict, name: str) -> Any:
    """The weights called ``name`` in ``state``: ``"params"``, an :func:`ema_name` or a
    :func:`phema_name`.

    Raises:
      InputError: for a name the run does not keep (the message lists those it does).
    """
    phemas = {phema_name(s): i for i, s in enumerate(phema_sigma_rels(config))}
    if name == "params":
        return state.params
    if name in state.ema:
        return state.ema[name]
    if name in phemas:
        return state.phema.emas[phemas[name]]
    kept = ["params", *sorted(state.ema), *phemas]
    raise InputError(f"{name!r}: the run keeps the weights {kept}.")


def make_process(cfg: ml_collections.ConfigDict):
    """The noise process of ``config.diffusion``: ``process`` in :data:`PROCESSES` + kwargs.

    ``diffusion.sigma_data`` is the one place the data scale is set: the EDM
    process, the EDM preconditioning and the ``edm`` weighting all read it.
    """
    if cfg.process not in PROCESSES:
        raise InputError(f"diffusion.process={cfg.process!r}: use one of {', '.join(PROCESSES)}.")
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in dict(cfg.get("process_kwargs", {})).items()}
    if cfg.process in ("edm", "trigflow"):
        _add_sigma_data(kwargs, cfg, "process_kwargs")
    fields = [f.name for f in dataclasses.fields(PROCESSES[cfg.process]) if f.init]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise InputError(
            f"diffusion.process_kwargs has {', '.join(unknown)}, which process "
            f"{cfg.process!r} does not take (it takes {', '.join(fields) or 'no arguments'}): "
            "a recipe's process_kwargs belong to its own process, so switch processes in a config "
            "file that also sets diffusion.process_kwargs, or keep the recipe's process."
        )
    return PROCESSES[cfg.process](**kwargs)


def _add_sigma_data(kwargs: dict, cfg: ml_collections.ConfigDict, where: str) -> None:
    """``kwargs["sigma_data"] = diffusion.sigma_data``, refusing a second value in ``where``."""
    if "sigma_data" in kwargs:
        where = where if where.startswith("model.") else f"diffusion.{where}"
        raise InputError(
            f"{where}.sigma_data: set diffusion.sigma_data instead (the one value "
            "the process, the preconditioning and the weighting share)."
        )
    kwargs["sigma_data"] = cfg.sigma_data


def make_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The model of ``config.model`` with the compute dtype of ``config.train.compute_dtype``."""
    if config.train.compute_dtype not in DTYPES:
        raise InputError(
            f"train.compute_dtype={config.train.compute_dtype!r}: use one of {', '.join(DTYPES)}."
        )
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in dict(config.model.get("kwargs", {})).items()}
    module = create_model(config.model.name, dtype=DTYPES[config.train.compute_dtype], **kwargs)
    if hasattr(module, "sigma_data"):  # a model that preconditions itself (EDM2)
        _add_sigma_data(kwargs, config.diffusion, "model.kwargs")
        module = module.clone(sigma_data=kwargs["sigma_data"])
    module = wrap_few_step_model(config, module)  # sCM's adaptive-weight head
    return repa.wrap_model(config, module)  # REPA's projector when train.repa is on


def make_schedule(cfg: ml_collections.ConfigDict, total_updates: int) -> optax.Schedule:
    """Linear warmup over ``warmup_steps`` updates, then constant or cosine decay; or EDM2's.

    The cosine decays to ``lr * final_lr_fraction`` at ``total_updates``.
    ``inverse_sqrt`` is EDM2's ``lr / sqrt(max(t / ref_steps, 1)) * min(t / warmup_steps, 1)``
    at update ``t`` (:func:`jaxgen.train.schedules.inverse_sqrt_schedule`: ``lr`` is
    ``alpha_ref``, ``ref_steps`` is ``t_ref`` in updates).
    """
    if cfg.schedule not in SCHEDULES:
        raise InputError(f"optim.schedule={cfg.schedule!r}: use one of {', '.join(SCHEDULES)}.")
    if cfg.schedule == "inverse_sqrt":
        return inverse_sqrt_schedule(cfg.lr, cfg.ref_steps, rampup_steps=cfg.warmup_steps)
    if cfg.schedule == "constant":
        main = optax.constant_schedule(cfg.lr)
    else:
        decay = max(total_updates - cfg.warmup_steps, 1)
        main = optax.cosine_decay_schedule(cfg.lr, decay, alpha=cfg.final_lr_fraction)
    if cfg.warmup_steps <= 0:
        return main
    warmup = optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    return optax.join_schedules([warmup, main], [cfg.warmup_steps])


def make_optimizer(cfg: ml_collections.ConfigDict, total_updates: int) -> optax.MultiSteps:
    """``MultiSteps(chain(clip_by_global_norm, adamw(schedule)), grad_accum)``.

    Args:
      cfg: ``config.optim``: ``lr``, ``warmup_steps``, ``schedule``,
        ``final_lr_fraction``, ``b1``, ``b2``, ``eps``, ``weight_decay``,
        ``grad_clip`` (0: none), ``grad_accum`` (micro-batches per update).
      total_updates: optimizer updates of the whole run (for the cosine).
    """
    if cfg.grad_accum < 1:
        raise InputError(f"optim.grad_accum={cfg.grad_accum} must be >= 1.")
    adamw = optax.adamw(make_schedule(cfg, total_updates), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay)
    clip = optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity()
    return optax.MultiSteps(optax.chain(clip, adamw), every_k_schedule=cfg.grad_accum)


def ema_decay(decay: float, updates: jax.Array, warmup: bool) -> jax.Array:
    """The decay used after ``updates`` optimizer updates.

    With ``warmup`` it is ``min(decay, (1 + n) / (10 + n))`` so that the average
    forgets the random initialisation quickly in short runs (the warmup of
    TF's ``ExponentialMovingAverage(num_updates=...)``).
    """
    n = updates.astype(jnp.float32)
    return jnp.minimum(decay, (1 + n) / (10 + n)) if warmup else jnp.asarray(decay, jnp.float32)


LossFn = Callable[..., tuple[jax.Array, dict]]
"""``loss_fn(model_fn, params, x0, cond, key) -> (loss, metrics)``: ``loss`` is ``[B]``
per-example values or a scalar (the train step takes the mean), ``metrics`` a dict
of scalars; ``model_fn(params, x_t, t, cond, **kwargs)`` is the preconditioned model
in training mode (dropout on), keywords passed to the module's call (EDM2's
``return_logvar=True``). A run with frozen weights (:attr:`RunParts.frozen`: a
distillation teacher, a feature encoder) calls ``loss_fn(..., key, frozen=frozen)``
with them as traced arrays; a loss with a ``step`` keyword (iCT's curriculum) gets
``step=`` the number of optimizer updates so far (traced int32); a run with a target
network (:attr:`TrainState.target`) passes it as ``target_params=``; a run with a fake
score (:attr:`TrainState.fake_params`, DMD2) passes it as ``fake_params=``, differentiated
with ``params``, and ``generator_step=`` (a Python bool: whether the generator's terms
are needed this step)."""


@dataclasses.dataclass(frozen=True)
class RunParts:
    """The pieces of a run that do not change as it trains.

    Facts about the model (its classes) come from the built ``module``, never
    from a second copy in the config.

    ``constants`` are the model's fixed variable collections (EDM2's
    ``buffers``, see :attr:`TrainState.constants`) that :attr:`model_fn` and
    :meth:`apply` pass to the module; they exist once a state does, so bind
    them with ``parts = parts.with_constants(state.constants)`` before sampling
    (the loop and :func:`jaxgen.train.load_run` do). They are host arrays that
    compiled samplers embed: small, and fixed for the run, so one compilation
    still serves every checkpoint and EMA.

    ``fake_optimizer`` is DMD2's fake-score optimizer (``None`` for other losses): the
    same ``config.optim`` transform as ``optimizer``, scheduled over the run's
    ``num_steps // grad_accum`` updates, while ``optimizer`` and ``schedule`` (the
    generator's) span ``1 / distill.fake_updates`` of them, the generator's share.
    """

    module: nn.Module
    process: Any
    prediction: str
    optimizer: optax.MultiSteps
    schedule: optax.Schedule
    mesh: Mesh
    image_shape: tuple[int, int, int]
    config: ml_collections.ConfigDict
    loss_fn: LossFn
    constants: dict[str, Any] | None = None
    frozen: Any = None
    start: Any = None
    fake_optimizer: optax.MultiSteps | None = None

    def with_constants(self, constants: dict[str, Any] | None) -> RunParts:
        """These parts with the model's fixed collections (``state.constants``) bound."""
        return dataclasses.replace(self, constants=jax.tree.map(np.asarray, constants))

    @property
    def param_constraint(self) -> Callable[[Any], Any] | None:
        """The projection of the stored weights after each update (:data:`PARAM_CONSTRAINTS`)."""
        return next((fn for cls, fn in PARAM_CONSTRAINTS.items()
                     if isinstance(self.module, cls)), None)

    @property
    def is_consistency(self) -> bool:
        """Whether the model is a consistency function (``diffusion.precond = "consistency"``,
        an sCM, ``diffusion.loss = "scm"``, or a CD student of any parametrisation): sampled
        in ``steps`` evaluations by :func:`jaxgen.sampling.consistency_sample`."""
        return (self.config.diffusion.precond == "consistency"
                or self.config.diffusion.get("loss") in ("scm", "cd"))

    @functools.cached_property
    def consistency_fn(self) -> Callable:
        """A consistency model's function ``f(params, x, t, cond) -> x0`` as its sampler
        takes it, one object per run: :attr:`model_fn`, or for CD on another
        parametrisation (:func:`jaxgen.train.consistency.cd_view`) the model seen as a
        consistency function on the levels :func:`jaxgen.train.consistency.cd_levels`."""
        return consistency_function(self.config, self.process, self.prediction, self.model_fn)

    @property
    def is_dmd2_generator(self) -> bool:
        """Whether the model is a DMD2 generator (``diffusion.loss = "dmd2"``): sampled in
        its ``distill.generator_steps`` evaluations on :func:`jaxgen.sampling.generator_times`
        (:func:`jaxgen.diffusion.distillation.few_step_generator`; one step:
        ``G(z) = x0(sigma(t_max) z, t_max)``)."""
        return self.config.diffusion.get("loss") == "dmd2"

    @property
    def num_classes(self) -> int:
        """Classes the model is conditioned on (0: unconditional), read off the module."""
        return int(getattr(self.module, "num_classes", 0) or 0)

    @functools.cached_property
    def latent(self) -> LatentSpace | None:
        """The autoencoder and latent scaling of ``config.latent``, its weights loaded on
        first use (for sampling: samples are decoded through it); ``None`` on pixels."""
        return load_latent_space(self.config, self.mesh) if latent_enabled(self.config) else None

    @functools.cached_property
    def model_fn(self) -> Callable:
        """``model_fn(params, x_t, t, cond, **kwargs)`` in evaluation mode, one function
        object per run, so every compiled sampler is reused across checkpoints and EMAs;
        keywords go to the module's call (the samplers' feature-cache switches)."""
        return lambda params, x_t, t, cond, **kwargs: self.apply(params, x_t, t, cond, **kwargs)

    @property
    def null_cond(self) -> dict | None:
        """The "no class" condition (label ``num_classes``, learned through label
        dropout) for classifier-free guidance's unconditional pass, batch 1;
        ``None`` for an unconditional model."""
        return {"label": jnp.full((1,), self.num_classes, jnp.int32)} if self.num_classes else None

    def apply(self, params, x_t, t, cond, *, train: bool = False, rngs=None, constants=None,
              **call_kwargs):
        """The model as the loss and samplers see it (``model_fn(params, x_t, t, cond)``).

        EDM preconditioning (``diffusion.precond == "edm"``) wraps the network
        here, so the backbone never sees raw ``x_t`` and ``t`` (it gets
        ``c_noise = ln(sigma) / 4``); TrigFlow's (``"trigflow"``, Lu & Song 2024,
        Sec. 3) returns the velocity ``sigma_d F(x_t / sigma_d, time_scale * t)``;
        otherwise it sees ``diffusion.time_scale * t + diffusion.time_shift``
        (1000 and -1: DDPM/DiT's 0-based step index ``k - 1`` at ``t = k / N``), or
        with ``diffusion.reverse_time`` SiT's time ``1 - t`` (its interpolants run
        from noise at 0 to data at 1), a velocity then negated. A
        learned-sigma output keeps only the prediction channels (:func:`jaxgen.models.as_model_fn`).
        ``constants`` (default: the bound :attr:`constants`) and ``call_kwargs``
        go to the module as in :func:`jaxgen.models.as_model_fn`; the train step
        passes the state's own (traced) constants.
        """

        raw = as_model_fn(self.module, train=train, rngs=rngs,
                          constants=self.constants if constants is None else constants,
                          **call_kwargs)

        if self.config.diffusion.precond == "edm":
            sigma_data = getattr(self.process, "sigma_data", self.config.diffusion.sigma_data)
            return diffusion.edm_precond(raw, self.process, sigma_data)(params, x_t, t, cond)
        if self.config.diffusion.precond == "consistency":  # f(x, sigma_min) = x exactly
            precond = consistency_precond(raw, self.process,
                                          sigma_data=self.config.diffusion.sigma_data)
            return precond(params, x_t, t, cond)
        if self.config.diffusion.precond == "trigflow":  # velocity sigma_d F(x_t / sigma_d, t)
            sd = self.process.sigma_data
            out = raw(params, x_t / sd, self.config.diffusion.get("time_scale", 1.0) * t, cond)
            return (sd * out[0], *out[1:]) if isinstance(out, tuple) else sd * out
        if self.config.diffusion.get("reverse_time", False):  # SiT: t = 1 is the data
            out = raw(params, x_t, self.config.diffusion.get("time_scale", 1.0) * (1 - t), cond)
            if self.prediction != "velocity":
                return out
            return (-out[0], *out[1:]) if isinstance(out, tuple) else -out  # REPA: (v, tokens)
        time = self.config.diffusion.get("time_scale", 1.0) * t
        return raw(params, x_t, time + self.config.diffusion.get("time_shift", 0.0), cond)

    def example_inputs(self, batch: int = 1):
        """Abstract ``(x, t, cond)`` to initialise the model with."""
        x = jax.ShapeDtypeStruct((batch, *self.image_shape), jnp.float32)
        t = jax.ShapeDtypeStruct((batch,), jnp.float32)
        cond = {"label": jax.ShapeDtypeStruct((batch,), jnp.int32)} if self.num_classes else None
        return x, t, cond


def make_run_parts(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    image_shape: tuple[int, int, int],
    total_updates: int,
    *,
    module: nn.Module | None = None,
    loss_fn: LossFn | None = None,
    frozen: Any = None,
) -> RunParts:
    """Model, process, optimizer and mesh of ``config`` for images of ``image_shape``.

    Args:
      config: the run's configuration.
      mesh: the device mesh.
      image_shape: ``(H, W, C)`` the model sees.
      total_updates: optimizer updates of the whole run (for the schedule).
      module: any Flax module called as ``module.apply(variables, x_t, t, cond,
        train=..., rngs=...)``, with an optional ``num_classes`` attribute (labels
        ``0..num_classes-1``, null class ``num_classes``); default
        ``create_model(config.model.name, **config.model.kwargs)``.
      loss_fn: a :data:`LossFn`; default :func:`jaxgen.diffusion.loss` with the
        process, prediction, time sampler and weighting of ``config.diffusion``.
      frozen: weights ``loss_fn`` takes as ``frozen=`` (:attr:`RunParts.frozen`).
    """
    if config.diffusion.precond not in ("none", "edm", "consistency", "trigflow"):
        raise InputError(f"diffusion.precond={config.diffusion.precond!r}: use 'none', 'edm', "
                         "'consistency' or 'trigflow'.")
    preconditioned = config.diffusion.precond in ("edm", "consistency")
    prediction = "x0" if preconditioned else config.diffusion.prediction
    if config.diffusion.precond == "trigflow":
        prediction = "velocity"  # TrigFlow's model is its PF-ODE's dx_t/dt
    process = make_process(config.diffusion)
    check_consistency(config, process)
    if module is None:
        module = make_model(config)
    sigma_data = getattr(module, "sigma_data", config.diffusion.sigma_data)
    if sigma_data != config.diffusion.sigma_data:
        raise InputError(
            f"the model's sigma_data={sigma_data} differs from diffusion.sigma_data="
            f"{config.diffusion.sigma_data}; the model preconditions with it, so they must agree."
        )
    _check_phema(config)
    if loss_fn is None and config.diffusion.get("loss") in FEW_STEP_LOSSES:
        loss_fn = consistency_loss(config, process, total_updates, prediction)
    if loss_fn is None:
        loss_fn = _make_loss(config.diffusion, module, process, prediction)
    loss_fn = _with_learned_variance(config.diffusion, module, process, prediction, loss_fn)
    # DMD2: each network's schedule counts its own updates; the generator makes 1 in F.
    n_fake = fake_updates(config)
    generator_updates = total_updates if n_fake is None else max(total_updates // n_fake, 1)
    return RunParts(
        module=module,
        process=process,
        prediction=prediction,
        optimizer=make_optimizer(config.optim, generator_updates),
        schedule=make_schedule(config.optim, generator_updates),
        mesh=mesh,
        image_shape=tuple(image_shape),
        config=config,
        loss_fn=loss_fn,
        frozen=frozen,
        fake_optimizer=None if n_fake is None else make_optimizer(config.optim, total_updates),
    )


def _make_loss(cfg: ml_collections.ConfigDict, module: nn.Module, process,
               prediction: str) -> LossFn:
    """The :data:`LossFn` of ``config.diffusion.loss`` (absent from older configs: denoising)."""
    name = cfg.get("loss", "denoising")
    if name not in LOSSES:
        raise InputError(f"diffusion.loss={name!r}: use one of {', '.join(LOSSES)}.")
    if name == "denoising":
        return functools.partial(
            diffusion.loss, process=process, prediction=prediction,
            time_sampler=_time_sampler(cfg), weighting=_weighting(cfg),
        )
    want = dict(process="edm", precond="none", prediction="x0", time_sampler="lognormal",
                weighting="edm")
    wrong = {k: cfg[k] for k, v in want.items() if cfg[k] != v}
    if wrong:
        raise InputError(
            "diffusion.loss='edm2' (EDM2 Eq. 21) needs diffusion."
            + ", ".join(f"{k}={v!r}" for k, v in want.items())
            + " (the network preconditions itself; time_sampler_kwargs p_mean, p_std are EDM2's "
            + "P_mean, P_std); got " + ", ".join(f"{k}={v!r}" for k, v in wrong.items()) + "."
        )
    if "return_logvar" not in inspect.signature(module.__call__).parameters:
        raise InputError(
            f"diffusion.loss='edm2' weights the loss by the model's learned uncertainty, but "
            f"{type(module).__name__} has no return_logvar output; use an edm2-* model."
        )
    kwargs = dict(cfg.get("time_sampler_kwargs", {}))
    unknown = sorted(set(kwargs) - {"p_mean", "p_std"})
    if unknown:
        raise InputError(f"diffusion.time_sampler_kwargs: {unknown} unknown; EDM2's loss takes "
                         "p_mean and p_std.")
    return functools.partial(_edm2_loss, sigma_data=cfg.sigma_data, **kwargs)


def _with_learned_variance(cfg: ml_collections.ConfigDict, module: nn.Module, process,
                           prediction: str, loss_fn: LossFn) -> LossFn:
    """``loss_fn`` plus IDDPM's ``L_vlb`` on the model's variance channels when
    ``diffusion.learned_variance = "vlb"`` (:func:`jaxgen.diffusion.vlb.hybrid_loss`)."""
    mode = cfg.get("learned_variance", "")
    if mode not in ("", "vlb"):
        raise InputError(f"diffusion.learned_variance={mode!r}: use '' (off) or 'vlb'.")
    if not mode:
        return loss_fn
    what = "diffusion.learned_variance='vlb'"
    if not getattr(module, "learn_sigma", False):
        raise InputError(f"{what} trains a model's variance channels; {type(module).__name__} "
                         "has none: set model.kwargs.learn_sigma=True.")
    vlb.check_discrete_vp(process, what)
    want = dict(loss="denoising", precond="none", time_sampler="discrete", reverse_time=False)
    wrong = {k: cfg.get(k) for k, v in want.items() if cfg.get(k, v) != v}
    if wrong:
        raise InputError(f"{what} needs diffusion." + ", ".join(f"{k}={v!r}" for k, v in
                         want.items()) + f" (the bound's N steps); got {wrong}.")
    return functools.partial(vlb.hybrid_loss, base_loss=loss_fn, process=process,
                             prediction=prediction)


def _edm2_loss(model_fn, params, x0, cond, key, **kwargs):
    """:func:`jaxgen.diffusion.edm2_loss.edm2_loss` over the model's ``(denoised, logvar)``."""
    return edm2_loss(functools.partial(model_fn, return_logvar=True), params, x0, cond, key,
                     **kwargs)


def _check_phema(config: ml_collections.ConfigDict) -> None:
    """``train.phema_sigma_rels`` in range with 3 decimals (the snapshots' file names hold them)."""
    sigma_rels = phema_sigma_rels(config)
    sigma_rel_to_gamma(sigma_rels)  # the range, in one line
    odd = [s for s in sigma_rels if round(s, 3) != s]
    if odd or len(set(sigma_rels)) != len(sigma_rels):
        raise InputError(
            f"train.phema_sigma_rels={list(sigma_rels)}: give distinct values with at most 3 "
            "decimals, e.g. (0.05, 0.1); snapshot file names record them so."
        )


def _init_boxed(parts: RunParts, key: jax.Array, start: Any = None) -> TrainState:
    x, t, cond = parts.example_inputs()
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)
    variables = dict(parts.module.init(key, zeros(x), zeros(t), jax.tree.map(zeros, cond)))
    params = variables.pop("params")
    if start is not None:  # a distilled student starts as its teacher (RunParts.start)
        params = _start_from(params, start)
    if parts.param_constraint is not None:
        params = parts.param_constraint(params)
    decays = parts.config.train.ema_decays
    sigma_rels = phema_sigma_rels(parts.config)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema={ema_name(d): params for d in decays},
        opt_state=parts.optimizer.init(params),
        rng=jax.random.fold_in(key, 1),
        constants=variables or None,
        phema=power_ema_init(params, sigma_rels) if sigma_rels else None,
        target=params if target_ema(parts.config) > 0 else None,
        # DMD2's fake score starts as the generator does (the teacher's weights).
        fake_params=None if parts.fake_optimizer is None else params,
        fake_opt_state=None if parts.fake_optimizer is None else parts.fake_optimizer.init(
            params),
    )


def _start_from(params: Any, start: Any) -> Any:
    """``params`` (boxed) with every leaf that ``start`` holds replaced by ``start``'s.

    Leaves ``start`` lacks (a wrapper's head, e.g. sCM's adaptive weight) keep their
    initialisation; the caller has checked that the paths and shapes fit
    (:func:`jaxgen.train.consistency.check_start`).
    """
    given = flatten_dict(start)

    def pick(path, leaf):
        key = tuple(getattr(k, "key", k) for k in path)
        if key not in given:
            return leaf
        value = jnp.asarray(given[key], nn.unbox(leaf).dtype)
        return leaf.replace_boxed(value) if isinstance(leaf, nn.meta.AxisMetadata) else value

    return jax.tree_util.tree_map_with_path(
        pick, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def state_shardings(parts: RunParts) -> TrainState:
    """``NamedSharding`` of every leaf of the train state (params by logical axis names)."""
    abstract = jax.eval_shape(lambda: _init_boxed(parts, jax.random.key_data(jax.random.key(0))))
    specs = nn.get_partition_spec(abstract)
    return nn.logical_to_mesh_sharding(specs, parts.mesh, LOGICAL_AXIS_RULES)


def abstract_state(parts: RunParts) -> TrainState:
    """Shapes, dtypes and shardings of the train state, no memory used (for restoring)."""
    shapes = jax.eval_shape(
        lambda: nn.unbox(_init_boxed(parts, jax.random.key_data(jax.random.key(0))))
    )
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes, state_shardings(parts),
    )


def init_state(parts: RunParts, seed: int) -> TrainState:
    """A fresh train state, created directly in its shardings; its weights (and EMAs)
    start as :attr:`RunParts.start` where that is set (a distillation teacher's)."""
    key = jax.random.key_data(jax.random.key(seed))
    init = jax.jit(lambda k, start: nn.unbox(_init_boxed(parts, k, start)),
                   out_shardings=state_shardings(parts))
    return init(key, parts.start)


def gradients_under_cond(mesh: Mesh) -> bool:
    """Whether a gradient inside ``lax.cond`` runs at full speed on ``mesh``'s devices.

    Not on XLA:CPU: there the default recipe's U-Net's ``value_and_grad`` (batch 32) took
    1.77 s inside a ``lax.cond`` against 0.15 s outside it (jax 0.10.2; inside ``lax.scan``
    0.87 s), while forward passes are unaffected (BENCHMARKS.md, "Few-step students").
    """
    return mesh.devices.flat[0].platform != "cpu"


def make_train_step(parts: RunParts) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted ``train_step(state, batch) -> (state, metrics)``.

    :attr:`RunParts.frozen` weights, when there are any, are placed on the mesh
    once (replicated) and passed to the compiled step as an argument at every
    call, and to the loss as ``frozen=``.

    ``batch`` holds ``image`` (uint8 NHWC, global, batch-sharded) and, for a
    class-conditional model, ``label``. The state is donated. ``metrics`` are
    replicated scalars that stay on the device (reading them waits for the
    step; the loop does so only when it logs): ``loss``, the loss function's
    own metrics, ``grad_norm``, ``update_norm``, ``lr`` and ``finite``. A step
    whose loss, gradient or update is not finite changes nothing in the state
    but its step count (``finite`` is 0), so the state never holds a NaN.

    After each optimizer update (each ``grad_accum``-th call) the weights of a
    module in :data:`PARAM_CONSTRAINTS` are projected (EDM2's forced weight
    normalisation), then the EMAs and the power EMAs average the projected
    weights. The model reads the state's ``constants`` in every call.

    DMD2 (:attr:`TrainState.fake_params`): one gradient of the loss in
    ``(params, fake_params)`` per step. The fake score's optimizer
    (:attr:`RunParts.fake_optimizer`) takes it at every step. On the generator's turn
    (:func:`jaxgen.train.consistency.generator_turn`, under ``lax.cond``, so the
    generator's terms are computed on its turns only; on CPU they are computed at every
    step and dropped off its turns, since XLA:CPU runs a gradient inside a conditional
    an order of magnitude slower) the generator's optimizer takes
    its part; on the other steps the generator's weights, optimizer state (Adam's
    moments and counts, ``grad_accum``'s accumulator), EMAs and power EMAs are left
    exactly as they were, so that each optimizer, schedule and EMA counts its own
    network's updates. ``grad_norm`` and ``update_norm`` are the generator's (0 off its
    turns), ``lr`` its schedule's, ``fake_grad_norm`` and ``fake_update_norm`` the fake score's;
    ``loss`` is ``fake_loss + generator_loss`` (the latter 0 off its turns, so a
    window's mean of it is ``1 / distill.fake_updates`` of its mean over the turns).
    """
    cfg = parts.config
    tx = parts.optimizer
    sigma_rels = phema_sigma_rels(cfg)
    constrain = parts.param_constraint

    to_x0 = make_to_x0(cfg, parts.image_shape[2])  # images, or a draw from latent moments
    loss_kwargs = (lambda frozen: {}) if parts.frozen is None else (
        lambda frozen: {"frozen": frozen})
    takes_step = "step" in inspect.signature(parts.loss_fn).parameters
    mu = target_ema(cfg)
    fake_tx = parts.fake_optimizer

    def step_fn(state: TrainState, batch: dict, frozen: Any) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.rng, state.step)
        k_loss, k_model = jax.random.split(key)
        x0 = to_x0(batch["image"], jax.random.fold_in(key, 2))
        cond = {"label": batch["label"]} if parts.num_classes else None

        def model_fn(p, x, t, c, **kwargs):
            return parts.apply(p, x, t, c, train=True, rngs={"dropout": k_model},
                               constants=state.constants or {}, **kwargs)

        def objective(params, fake_params=None, generator_step=True):
            step_kwargs = {"step": _update_count(state.opt_state)} if takes_step else {}
            if state.target is not None:
                step_kwargs["target_params"] = state.target
            if fake_tx is not None:
                step_kwargs.update(fake_params=fake_params, generator_step=generator_step)
            value, metrics = parts.loss_fn(model_fn, params, x0, cond, k_loss,
                                           **loss_kwargs(frozen), **step_kwargs)
            value = jnp.mean(value)  # per-example [B] or already a scalar
            return value, dict(metrics, loss=value)

        if fake_tx is None:
            (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        else:  # DMD2: both networks' gradients; the generator's terms on its turns only
            turn = generator_turn(cfg, _update_count(state.fake_opt_state))
            both = lambda generator_step: jax.value_and_grad(
                lambda p: objective(*p, generator_step=generator_step), has_aux=True,
            )((state.params, state.fake_params))
            if not gradients_under_cond(parts.mesh):
                # Compute the generator's terms at every step and drop them off its turns:
                # the numbers the cond gives, at a fraction of its time on XLA:CPU.
                (_, metrics), (grads, fake_grads) = both(True)
                metrics = generator_terms_on_turn(metrics, turn)
                loss = metrics["loss"]
                grads = jax.tree.map(lambda g: jnp.where(turn, g, jnp.zeros_like(g)), grads)
            else:
                (loss, metrics), (grads, fake_grads) = jax.lax.cond(
                    turn, lambda: both(True), lambda: both(False))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        updated = tx.has_updated(opt_state)
        if fake_tx is not None:  # off its turns the generator and its optimizer stand still
            on_turn = lambda new, old: jax.tree.map(lambda n, o: jnp.where(turn, n, o), new, old)
            params, opt_state = on_turn(params, state.params), on_turn(opt_state, state.opt_state)
            updates = jax.tree.map(lambda u: jnp.where(turn, u, jnp.zeros_like(u)), updates)
            updated = updated & turn
        keep_unless_updated = lambda new, old: jax.tree.map(
            lambda n, o: jnp.where(updated, n, o), new, old)
        if constrain is not None:  # on real updates only: the projection is not idempotent
            params = keep_unless_updated(constrain(params), params)
        n_updates = _update_count(opt_state)
        ema = {}
        for decay in cfg.train.ema_decays:
            d = ema_decay(decay, n_updates, cfg.train.ema_warmup)
            new = optax.incremental_update(params, state.ema[ema_name(decay)], 1 - d)
            ema[ema_name(decay)] = keep_unless_updated(new, state.ema[ema_name(decay)])
        phema = state.phema
        if sigma_rels:
            phema = keep_unless_updated(power_ema_update(phema, params, sigma_rels), phema)
        grad_norm, update_norm = optax.tree.norm(grads), optax.tree.norm(updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        fake_params, fake_opt_state = state.fake_params, state.fake_opt_state
        if fake_tx is not None:  # DMD2's fake score: an update at every step
            fake_step, fake_opt_state = fake_tx.update(fake_grads, fake_opt_state, fake_params)
            fake_params = optax.apply_updates(fake_params, fake_step)
            if constrain is not None:
                fake_params = jax.tree.map(
                    lambda n, o: jnp.where(fake_tx.has_updated(fake_opt_state), n, o),
                    constrain(fake_params), fake_params)
            fake_norms = optax.tree.norm(fake_grads), optax.tree.norm(fake_step)
            finite = finite & jnp.isfinite(fake_norms[0]) & jnp.isfinite(fake_norms[1])
            metrics = dict(metrics, fake_grad_norm=fake_norms[0], fake_update_norm=fake_norms[1])
        metrics = dict(metrics, grad_norm=grad_norm, update_norm=update_norm,
                       lr=parts.schedule(n_updates), finite=finite.astype(jnp.float32))
        target = state.target
        if target is not None:  # theta- <- stopgrad(mu theta- + (1 - mu) theta), CD Alg. 2
            target = keep_unless_updated(optax.incremental_update(params, target, 1 - mu), target)
        new_state = state.replace(params=params, ema=ema, opt_state=opt_state, phema=phema,
                                  target=target, fake_params=fake_params,
                                  fake_opt_state=fake_opt_state)
        # Checked on the device: a non-finite step is dropped without a host round trip.
        kept = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        return kept.replace(step=state.step + 1), metrics

    shardings = state_shardings(parts)
    data = batch_sharding(parts.mesh)
    step = jax.jit(
        step_fn,
        in_shardings=(shardings, data, replicated(parts.mesh)),
        out_shardings=(shardings, replicated(parts.mesh)),
        donate_argnums=0,
    )
    frozen = jax.device_put(parts.frozen, replicated(parts.mesh))
    return lambda state, batch: step(state, batch, frozen)


def _update_count(opt_state: optax.MultiStepsState) -> jax.Array:
    """Optimizer updates applied so far (MultiSteps' inner count of applied updates)."""
    return opt_state.gradient_step


def _time_sampler(cfg: ml_collections.ConfigDict):
    kwargs = dict(cfg.get("time_sampler_kwargs", {}))
    return diffusion.TIME_SAMPLERS[cfg.time_sampler](**kwargs) if kwargs else cfg.time_sampler


def _weighting(cfg: ml_collections.ConfigDict):
    if cfg.weighting not in diffusion.WEIGHTINGS:
        raise InputError(
            f"diffusion.weighting={cfg.weighting!r}: use one of {', '.join(diffusion.WEIGHTINGS)}."
        )
    kwargs = dict(cfg.get("weighting_kwargs", {}))
    if cfg.weighting == "edm":
        _add_sigma_data(kwargs, cfg, "weighting_kwargs")
    return diffusion.WEIGHTINGS[cfg.weighting](**kwargs) if kwargs else cfg.weighting


def param_sharding_summary(state: TrainState) -> dict[str, tuple]:
    """``path -> PartitionSpec`` of every parameter, to show where weights live."""
    flat = jax.tree_util.tree_flatten_with_path(state.params)[0]
    out = {}
    for path, leaf in flat:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        sharding = leaf.sharding
        out[name] = tuple(sharding.spec) if isinstance(sharding, NamedSharding) else ()
    return out
