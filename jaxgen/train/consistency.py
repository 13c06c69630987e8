"""Few-step generators in the trainer: consistency models (iCT, CD, sCM) and progressive
distillation.

- ``diffusion.loss = "ict"`` trains a consistency function from data alone
  (:func:`jaxgen.diffusion.consistency.ict_loss`, its curriculum ``N(k)`` read from
  the train step).
- ``"cd"`` distils the jaxgen run named by ``distill.teacher``
  (:func:`jaxgen.diffusion.consistency.cd_loss`) through one step of any
  deterministic jaxgen solver (``distill.solver``); the target network is the
  student itself (``distill.target_ema = 0``, as iCT) or an EMA of it with decay
  ``mu`` (Song et al. 2023, Algorithm 2), kept in the train state
  (:attr:`jaxgen.train.TrainState.target`).
  Both need ``diffusion.precond = "consistency"`` on ``diffusion.process = "edm"``.
- ``"scm"`` (Lu & Song 2024, Algorithm 1): continuous-time consistency training
  (sCT, no teacher) or distillation (sCD, ``distill.teacher`` gives the PF-ODE's
  velocity for the tangent), on ``diffusion.process = precond = "trigflow"``, the
  tangent by ``jax.jvp`` with warmup and normalisation
  (:func:`jaxgen.diffusion.scm.scm_loss`), and with ``distill.adaptive_weight`` the
  learned weighting of a :class:`jaxgen.models.adaptive_weight.AdaptiveWeightModel`
  head. ``distill.init_from_teacher`` starts the student from a TrigFlow teacher's weights.
- ``"pd"`` (Salimans & Ho 2022, Algorithm 2): one stage of progressive distillation;
  the student starts from the teacher's weights and learns in ``N / 2`` DDIM steps
  what the teacher does in ``N = distill.teacher_steps``; the next stage is a new
  run whose teacher is this one, with ``distill.teacher_steps = N / 2``.

The teacher's weights reach the loss as the step's frozen argument (never
checkpointed: a resumed run loads them again from the folder its config names).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax.traverse_util import flatten_dict

from jaxgen.diffusion.consistency import cd_loss, ict_loss
from jaxgen.diffusion.distillation import progressive_loss, progressive_times
from jaxgen.diffusion.processes import EDM
from jaxgen.diffusion.scm import TrigFlow, scm_loss, teacher_velocity
from jaxgen.errors import InputError
from jaxgen.models.adaptive_weight import AdaptiveWeightModel
from jaxgen.sampling.consistency import SCM_SIGMA_MAX
from jaxgen.sampling.teacher import solver_step

CONSISTENCY_LOSSES = ("ict", "cd")  # on precond "consistency"
FEW_STEP_LOSSES = (*CONSISTENCY_LOSSES, "scm", "pd")
TEACHER_LOSSES = ("cd", "pd")  # need distill.teacher; scm takes one optionally
_SET_BY_TRAINER = {"step", "total_steps", "process", "teacher_step", "target_params",
                   "teacher", "sigma_data", "raw_logvar_fn", "teacher_fn", "teacher_params",
                   "prediction", "teacher_prediction", "student_steps", "ts"}
# Fields a student that starts from its teacher's weights shares with it.
_SAME_AS_TEACHER = ("model.name", "model.kwargs", "diffusion.process", "diffusion.process_kwargs",
                    "diffusion.precond", "diffusion.sigma_data", "diffusion.time_scale",
                    "diffusion.reverse_time", "latent.vae", "latent.vae_model", "latent.scale",
                    "latent.shift")
_FREE_IN_STUDENT = ("model.kwargs.dropout", "model.kwargs.class_dropout")  # train-time only


def _distill(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.distill`` (absent from configs saved before it existed: empty)."""
    return config.get("distill") or ml_collections.ConfigDict()


def target_ema(config: ml_collections.ConfigDict) -> float:
    """``distill.target_ema``: CD's target-network decay ``mu`` (0: the student itself)."""
    return float(_distill(config).get("target_ema") or 0.0)


def teacher_steps(config: ml_collections.ConfigDict) -> int:
    """``distill.teacher_steps``: the progressive-distillation teacher's sampler steps ``N``."""
    return _distill(config).get("teacher_steps")


def adaptive_weight(config: ml_collections.ConfigDict) -> bool:
    """Whether an sCM run learns the adaptive weight (``distill.adaptive_weight``)."""
    return config.diffusion.get("loss") == "scm" and bool(
        _distill(config).get("adaptive_weight", True))


def needs_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether the run reads ``distill.teacher`` (cd, pd; scm when it is set)."""
    loss = config.diffusion.get("loss")
    return loss in TEACHER_LOSSES or (loss == "scm" and bool(_distill(config).get("teacher")))


def starts_from_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether the student's weights start as the teacher's (pd; scm with
    ``distill.init_from_teacher``)."""
    loss = config.diffusion.get("loss")
    return loss == "pd" or (loss == "scm" and bool(_distill(config).get("init_from_teacher")))


def wrap_few_step_model(config: ml_collections.ConfigDict, module: nn.Module) -> nn.Module:
    """``module`` with sCM's adaptive-weight head when the run learns it, else unchanged."""
    if not adaptive_weight(config) or isinstance(module, AdaptiveWeightModel):
        return module
    return AdaptiveWeightModel(module)


def check_consistency(config: ml_collections.ConfigDict, process) -> None:
    """Refuse a configuration whose loss, preconditioning, process and teacher disagree.

    ``diffusion.precond = "consistency"`` goes with ``diffusion.loss`` ``ict`` or ``cd``
    (and back), on the EDM process; ``scm`` with precond and process ``trigflow``;
    ``distill.teacher`` is set for ``cd`` and ``pd`` (optional for ``scm``); ``pd``
    has an even ``distill.teacher_steps >= 2``; ``distill.target_ema`` in [0, 1) and
    only for ``cd``.
    """
    loss = config.diffusion.get("loss", "denoising")
    precond = config.diffusion.precond
    distill = _distill(config)
    if (precond == "consistency") != (loss in CONSISTENCY_LOSSES):
        raise InputError(
            f"diffusion.precond={precond!r} with diffusion.loss={loss!r}: a consistency model "
            "has precond='consistency' and loss='ict' or 'cd', both or neither."
        )
    if loss in CONSISTENCY_LOSSES and not isinstance(process, EDM):
        raise InputError(
            f"diffusion.loss={loss!r} runs on diffusion.process='edm' (its sigma_min and "
            f"sigma_max bound the consistency function); got {process!r}."
        )
    if (precond == "trigflow") != isinstance(process, TrigFlow):
        raise InputError(
            f"diffusion.precond={precond!r} on {process!r}: TrigFlow's parametrisation and "
            "process go together; set diffusion.process and diffusion.precond both to "
            "'trigflow', or neither."
        )
    if loss == "scm" and precond != "trigflow":
        raise InputError(f"diffusion.loss='scm' trains a TrigFlow model (Lu & Song 2024); set "
                         f"diffusion.process='trigflow' and diffusion.precond='trigflow' (got "
                         f"precond={precond!r}).")
    teacher = distill.get("teacher")
    if loss in TEACHER_LOSSES and not teacher:
        raise InputError(f"diffusion.loss={loss!r} distils a trained run: give "
                         "--config.distill.teacher=WORKDIR (a jaxgen.train run folder).")
    if teacher and loss not in (*TEACHER_LOSSES, "scm"):
        raise InputError(f"distill.teacher={teacher!r} is read only by diffusion.loss 'cd', "
                         f"'scm' or 'pd' (this run's loss is {loss!r}); drop it or set the loss.")
    if distill.get("init_from_teacher") and not (loss == "scm" and teacher):
        raise InputError("distill.init_from_teacher is for diffusion.loss='scm' with "
                         "distill.teacher set (pd always starts from its teacher); drop it.")
    steps = distill.get("teacher_steps")
    if loss == "pd" and not (isinstance(steps, int) and steps >= 2 and steps % 2 == 0):
        raise InputError(f"distill.teacher_steps={steps!r}: progressive distillation halves the "
                         "teacher's sampler steps; give an even number >= 2, e.g. 16.")
    mu = distill.get("target_ema") or 0.0
    if not (isinstance(mu, int | float) and 0 <= mu < 1):
        raise InputError(f"distill.target_ema={mu!r}: give the target network's EMA decay in "
                         "[0, 1) (0: the student itself; Song et al. 2023 use 0.95).")
    if mu and loss != "cd":
        raise InputError(f"distill.target_ema={mu} is CD's target network; diffusion.loss="
                         f"{loss!r} has none: drop it.")


def _loss_kwargs(config: ml_collections.ConfigDict, fn: Callable) -> dict:
    """``distill.loss_kwargs`` checked against the keywords of ``fn`` a config may set."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in dict(_distill(config).get("loss_kwargs", {})).items()}
    allowed = {p.name for p in inspect.signature(fn).parameters.values()
               if p.kind is p.KEYWORD_ONLY} - _SET_BY_TRAINER
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise InputError(f"distill.loss_kwargs: {unknown} unknown; diffusion.loss="
                         f"{config.diffusion.loss!r} takes {sorted(allowed)}.")
    return kwargs


def _dry_run(loss_fn: Callable, **extra) -> None:
    """Trace ``loss_fn`` once on a tiny abstract batch, so that a bad option is refused
    when the run is built rather than at its first step."""

    def model(params, x, t, cond, return_logvar=False):
        return (x, t) if return_logvar else x

    x0 = jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    jax.eval_shape(lambda x, k: loss_fn(model, None, x, None, k, **extra), x0, key)


def _teacher_not_loaded(*args, **kwargs):
    raise InputError(
        "distill.teacher: the teacher is not loaded; train_and_evaluate loads it (from "
        "Python: parts = jaxgen.train.consistency.with_teacher(parts))."
    )


def consistency_loss(config: ml_collections.ConfigDict, process, total_updates: int,
                     prediction: str) -> Callable:
    """The :data:`jaxgen.train.state.LossFn` of a few-step ``diffusion.loss``.

    ``ict``: :func:`~jaxgen.diffusion.consistency.ict_loss` with ``total_steps`` the
    run's optimizer updates (its curriculum ``N(k)``, Song & Dhariwal 2024 Sec. 3.4,
    follows the ``step`` the train step passes) and ``distill.loss_kwargs``. ``scm``
    without a teacher: sCT (:func:`scm_trainer_loss`). ``cd``, ``pd`` and sCD: a loss
    that needs the teacher, which :func:`with_teacher` loads; the options are checked
    here already.
    """
    loss = config.diffusion.loss
    if loss == "ict":
        fn = functools.partial(ict_loss, total_steps=total_updates, process=process,
                               **_loss_kwargs(config, ict_loss))
        _dry_run(fn, step=jnp.zeros((), jnp.int32))
        return fn
    if loss == "scm":
        fn = scm_trainer_loss(config, process)
        _dry_run(fn, step=jnp.zeros((), jnp.int32))
        return _teacher_not_loaded if needs_teacher(config) else fn
    if loss == "cd":
        _dry_run(functools.partial(cd_loss, teacher_step=lambda x, s_from, s_to, cond: x,
                                   process=process, **_loss_kwargs(config, cd_loss)))
    else:
        identity = lambda params, x, t, cond: x
        _dry_run(functools.partial(
            progressive_loss, teacher_fn=identity, teacher_params=None, process=process,
            prediction=prediction, student_steps=teacher_steps(config) // 2,
            **_loss_kwargs(config, progressive_loss)))
    return _teacher_not_loaded


def scm_trainer_loss(config: ml_collections.ConfigDict, process: TrigFlow,
                     velocity: Callable | None = None) -> Callable:
    """sCM's loss (:func:`jaxgen.diffusion.scm.scm_loss`) over the trainer's TrigFlow model.

    The model (``diffusion.precond = "trigflow"``) returns the velocity
    ``sigma_d F(x_t / sigma_d, t)``; the loss's ``F(x_in, t)`` is that model at
    ``x_t = sigma_d x_in``, divided by ``sigma_d``. With ``distill.adaptive_weight`` the
    student's pass also returns the head's ``u(t)`` (``return_logvar=True``).

    Args:
      config: the run's configuration (``distill.loss_kwargs``: ``p_mean``, ``p_std``,
        ``warmup_steps``, ``tangent_c``).
      process: the run's :class:`TrigFlow`.
      velocity: ``velocity(frozen) -> (x_t, t, cond) -> dx_t/dt``, the teacher's PF-ODE
        for sCD (:func:`jaxgen.diffusion.scm.teacher_velocity`); ``None`` for sCT.

    Returns:
      ``loss_fn(model_fn, params, x0, cond, key, *, step, frozen=None)``.
    """
    sd = process.sigma_data
    kwargs = _loss_kwargs(config, scm_loss)
    adaptive = adaptive_weight(config)

    def loss(model_fn, params, x0, cond, key, *, step, frozen=None):
        raw = lambda p, x_in, t, c: model_fn(p, sd * x_in, t, c) / sd

        def raw_logvar(p, x_in, t, c):
            v, u = model_fn(p, sd * x_in, t, c, return_logvar=True)
            return v / sd, u

        return scm_loss(raw, params, x0, cond, key, sigma_data=sd, step=step,
                        teacher=None if velocity is None else velocity(frozen),
                        raw_logvar_fn=raw_logvar if adaptive else None, **kwargs)

    return loss


def _noise_levels(process) -> tuple[float, float]:
    """The smallest and largest noise level ``sigma(t) / alpha(t)`` a process reaches."""
    t = jnp.asarray([process.t_min, process.t_max], jnp.float32)
    s = process.sigma(t) / process.alpha(t)
    return float(s[0]), float(s[1])


def _student_levels(student) -> tuple[float, float]:
    """The noise levels the student's teacher must reach: CD's ``[sigma_min, sigma_max]``;
    sCM's ``[0.002, 80]`` (its sampler starts at ``arctan(80 / sigma_d)``)."""
    if isinstance(student.process, EDM):
        return student.process.sigma_min, student.process.sigma_max
    return 0.002, SCM_SIGMA_MAX


def _fields(config: ml_collections.ConfigDict) -> dict:
    """``config`` flattened to dotted keys, as its ``config.json`` holds it."""
    flat = flatten_dict(json.loads(config.to_json_best_effort()))
    return {".".join(k): v for k, v in flat.items()}


def check_teacher(teacher, student, where: str) -> None:
    """Refuse a teacher run (:class:`jaxgen.train.RunParts`) the student cannot distil.

    Same image shape and class count; a diffusion or flow model (not itself a
    consistency model). CD and sCM: its noise levels cover the student's. A student
    that starts from the teacher's weights (pd; sCM with ``distill.init_from_teacher``):
    the same model (up to its dropout rates), process and parametrisation
    (:data:`_SAME_AS_TEACHER`) and
    prediction; a pd teacher that is itself a pd student samples in
    ``distill.teacher_steps`` steps.
    """
    if teacher.is_consistency:
        raise InputError(f"distill.teacher={where}: a consistency model; distil a diffusion or "
                         "flow model (its PF-ODE is the teacher).")
    if tuple(teacher.image_shape) != tuple(student.image_shape):
        data = teacher.config.data
        raise InputError(
            f"distill.teacher={where}: trained on images of shape {tuple(teacher.image_shape)}, "
            f"the student's data give {tuple(student.image_shape)}; use the teacher's "
            f"data.source={data.source!r}, data.resolution={data.resolution}, "
            f"data.pad_to={data.pad_to}."
        )
    if teacher.num_classes != student.num_classes:
        raise InputError(
            f"distill.teacher={where}: conditioned on {teacher.num_classes} classes, the student "
            f"on {student.num_classes}; set model.kwargs.num_classes={teacher.num_classes}."
        )
    loss = student.config.diffusion.get("loss")
    if loss in ("cd", "scm"):
        lo, hi = _noise_levels(teacher.process)
        s_min, s_max = _student_levels(student)
        if lo > s_min * (1 + 1e-6) or hi < s_max * (1 - 1e-6):
            raise InputError(
                f"distill.teacher={where}: its process {teacher.process!r} spans noise levels "
                f"[{lo:.4g}, {hi:.4g}], which does not cover the student's [{s_min:g}, "
                f"{s_max:g}]; distil a teacher of a wider process"
                + (" or set diffusion.process_kwargs sigma_min and sigma_max inside it."
                   if loss == "cd" else ".")
            )
    if not starts_from_teacher(student.config):
        return
    from jaxgen.configs import base

    # A field a run saved before jaxgen had it has the base recipe's default.
    defaults = _fields(base.get_config())
    mine, theirs = ({**defaults, **_fields(c)} for c in (student.config, teacher.config))
    for key in sorted(k for k in mine.keys() | theirs.keys()
                      if k.startswith(_SAME_AS_TEACHER) and k not in _FREE_IN_STUDENT):
        if mine.get(key) != theirs.get(key):
            raise InputError(
                f"distill.teacher={where}: the student's {key}={mine.get(key)!r} contradicts "
                f"the teacher's {theirs.get(key)!r}; the student starts from the teacher's "
                f"weights: set --config.{key}={theirs.get(key)!r} (or drop the override)."
            )
    if student.prediction != teacher.prediction:
        raise InputError(
            f"distill.teacher={where}: the student predicts {student.prediction!r}, the teacher "
            f"{teacher.prediction!r}; set diffusion.prediction={teacher.prediction!r}.")
    if loss == "pd" and teacher.config.diffusion.get("loss") == "pd":
        theirs_n = teacher_steps(teacher.config) // 2
        if theirs_n != teacher_steps(student.config):
            raise InputError(
                f"distill.teacher={where}: a progressive-distillation student of "
                f"{theirs_n} steps; set distill.teacher_steps={theirs_n} (each stage halves it).")


def check_start(student, start: Any, where: str) -> None:
    """Refuse starting weights that do not fit the student's module: every leaf of
    ``start`` must be a parameter of the same shape; the student may have more (a
    wrapper's head, such as the adaptive weight's ``logvar_head``)."""
    from jaxgen.models import abstract_init

    want = {k: v.shape for k, v in flatten_dict(
        nn.unbox(abstract_init(student.module, *student.example_inputs())["params"])).items()}
    for key, leaf in flatten_dict(start).items():
        if want.get(key) != tuple(leaf.shape):
            raise InputError(
                f"distill.teacher={where}: its parameter {'/'.join(key)} of shape "
                f"{tuple(leaf.shape)} is {'absent from' if key not in want else 'of shape '}"
                f"{want.get(key, '')} the student's model; give the student the teacher's "
                "model.name and model.kwargs.")


def teacher_loss(config: ml_collections.ConfigDict, student, teacher) -> Callable:
    """The loss of a run with ``teacher`` (its :class:`jaxgen.train.RunParts`).

    ``loss_fn(model_fn, params, x0, cond, key, *, frozen, ...)``: ``frozen`` are the
    teacher's weights. ``cd``: one ``distill.solver`` step of the teacher
    (:func:`jaxgen.sampling.teacher.solver_step`) maps ``x_{n+1}`` to ``x^_n``
    (Song et al. 2023, Eq. 6); the target network is ``target_params`` (the train
    state's EMA target when ``distill.target_ema > 0``) or the student itself.
    ``scm``: the teacher's velocity (:func:`jaxgen.diffusion.scm.teacher_velocity`)
    gives ``dx_t/dt``. ``pd``: :func:`jaxgen.diffusion.distillation.progressive_loss`
    with the teacher's ``distill.teacher_steps`` uniform times
    (:func:`jaxgen.diffusion.distillation.progressive_times`).
    """
    loss_name = config.diffusion.loss
    process = student.process
    if loss_name == "scm":
        velocity = lambda frozen: teacher_velocity(
            teacher.model_fn, frozen, teacher.process, prediction=teacher.prediction,
            sigma_data=process.sigma_data)
        return scm_trainer_loss(config, process, velocity)
    if loss_name == "pd":
        n = teacher_steps(config)
        kwargs = _loss_kwargs(config, progressive_loss)
        ts = progressive_times(process, n)

        def pd(model_fn, params, x0, cond, key, *, frozen):
            return progressive_loss(
                model_fn, params, x0, cond, key, teacher_fn=teacher.model_fn,
                teacher_params=frozen, process=process, prediction=student.prediction,
                teacher_prediction=teacher.prediction, student_steps=n // 2, ts=ts, **kwargs)

        return pd
    solver = _distill(config).get("solver", "heun")
    kwargs = _loss_kwargs(config, cd_loss)

    def teacher_step(frozen):
        return solver_step(teacher.model_fn, frozen, teacher.process,
                           prediction=teacher.prediction, solver=solver)

    teacher_step(None)  # checks the solver (known, deterministic) now

    def cd(model_fn, params, x0, cond, key, *, frozen, target_params=None):
        return cd_loss(model_fn, params, x0, cond, key, teacher_step=teacher_step(frozen),
                       target_params=target_params, process=process, **kwargs)

    return cd


def with_teacher(parts, *, teacher: Any = None):
    """``parts`` of a run that reads ``distill.teacher``, with its teacher loaded.

    The teacher is ``load_run(distill.teacher, distill.teacher_weights)``
    (:func:`jaxgen.train.load_run`), checked by :func:`check_teacher`; its
    weights become :attr:`RunParts.frozen` (replicated, traced, never
    checkpointed: a resumed run loads them again from the folder its config names)
    and, for a student that starts from them (:func:`starts_from_teacher`),
    :attr:`RunParts.start`.

    Args:
      parts: the student's :class:`jaxgen.train.RunParts`.
      teacher: an already loaded :class:`jaxgen.train.Run` to use instead.

    Raises:
      InputError: no teacher folder or checkpoint, or a teacher that does not fit.
    """
    cfg = _distill(parts.config)
    if teacher is None:
        from jaxgen.train.run import load_run  # run.py imports the loop, which imports us

        teacher = load_run(cfg.teacher, cfg.get("teacher_weights"))
    check_teacher(teacher.parts, parts, cfg.teacher)
    loss = teacher_loss(parts.config, parts, teacher.parts)
    start = None
    if starts_from_teacher(parts.config):
        check_start(parts, teacher.params, cfg.teacher)
        start = teacher.params
    return dataclasses.replace(parts, loss_fn=loss, frozen=teacher.params, start=start)
