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
  velocity for the tangent), on ``diffusion.process = precond = "trigflow"`` or on
  any other process, whose model is then seen as a TrigFlow model at equal log-SNR
  (:func:`jaxgen.diffusion.scm.trigflow_velocity`); the tangent by ``jax.jvp`` with
  warmup and normalisation (:func:`jaxgen.diffusion.scm.scm_loss`), and with
  ``distill.adaptive_weight`` the learned weighting of a
  :class:`jaxgen.models.adaptive_weight.AdaptiveWeightModel` head.
  ``distill.init_from_teacher`` starts the student from the teacher's weights (the
  student then has the teacher's model, process and parametrisation, as pd's).
- ``"pd"`` (Salimans & Ho 2022, Algorithm 2): one stage of progressive distillation;
  the student starts from the teacher's weights and learns in ``N / 2`` DDIM steps
  what the teacher does in ``N = distill.teacher_steps``; the next stage is a new
  run whose teacher is this one, with ``distill.teacher_steps = N / 2``.
- ``"reflow"`` (Liu et al. 2023, "Flow Straight and Fast", Algorithm 1) on
  ``diffusion.process = "flow"``: the student starts from the teacher's weights;
  each step draws noise ``z``, integrates the teacher's ODE from ``z`` (with the
  batch's class labels, no guidance) in ``distill.teacher_steps`` steps of the
  deterministic ``distill.solver`` to ``x0`` (:func:`jaxgen.sampling.teacher.reflow_pairs`),
  and fits the straight path between them
  (:func:`jaxgen.diffusion.distillation.reflow_loss`). This is Algorithm 1 with the
  pairs drawn afresh at every step instead of from a stored set; the batch's images
  are not used. The student samples with the ordinary solvers, in few steps.
- ``"dmd2"`` (Yin et al. 2024, "Improved Distribution Matching Distillation",
  without its GAN term, which is not built): a generator of
  ``N = distill.generator_steps`` steps, ``G(z) = x0(sigma(t_max) z, t_max)`` at one
  step, DMD2's multi-step generator with backward simulation at several
  (:func:`jaxgen.diffusion.distillation.few_step_generator` over the student network,
  on the times :func:`jaxgen.sampling.generator_times`)
  trained by the distribution-matching gradient (Yin et al. 2023, Eqs. 7-8;
  :func:`~jaxgen.diffusion.distillation.dmd_loss`) between the frozen teacher (the
  real score, optionally with classifier-free guidance ``distill.real_guidance``)
  and a fake score of the same architecture that denoises the generator's samples
  (Eq. 6, :func:`~jaxgen.diffusion.distillation.fake_score_loss`). Both start from
  the teacher's weights; the fake score and its optimizer state are
  :attr:`jaxgen.train.TrainState.fake_params` and ``.fake_opt_state`` (checkpointed).
  Two time-scale update (DMD2's TTUR): every step updates the fake score, and every
  ``distill.fake_updates``-th the generator too (see :func:`generator_turn`). The
  run samples in its ``N`` steps: ``jaxgen.sample --steps N``.

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
import numpy as np
from flax.traverse_util import flatten_dict

from jaxgen.diffusion.consistency import cd_loss, consistency_view, ict_loss
from jaxgen.diffusion.distillation import (
    dmd_loss,
    fake_score_loss,
    few_step_generator,
    progressive_loss,
    progressive_times,
    reflow_loss,
)
from jaxgen.diffusion.processes import EDM, Flow
from jaxgen.diffusion.scm import TrigFlow, scm_loss, teacher_velocity, trigflow_velocity
from jaxgen.errors import InputError
from jaxgen.models.adaptive_weight import AdaptiveWeightModel
from jaxgen.sampling.consistency import SCM_SIGMA_MAX, generator_times
from jaxgen.sampling.teacher import reflow_pairs, solver_step

CONSISTENCY_LOSSES = ("ict", "cd")  # on precond "consistency"
FEW_STEP_LOSSES = (*CONSISTENCY_LOSSES, "scm", "pd", "reflow", "dmd2")
TEACHER_LOSSES = ("cd", "pd", "reflow", "dmd2")  # need distill.teacher; scm takes one optionally
FROM_TEACHER_LOSSES = ("pd", "reflow", "dmd2")  # the student always starts as its teacher
_SET_BY_TRAINER = {"step", "total_steps", "process", "teacher_step", "target_params",
                   "teacher", "sigma_data", "raw_logvar_fn", "teacher_fn", "teacher_params",
                   "prediction", "teacher_prediction", "student_steps", "ts", "real_fn",
                   "real_params", "fake_fn", "fake_params"}
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
    """``distill.teacher_steps``: the teacher's sampler steps ``N`` (pd: DDIM steps it
    distils into ``N / 2``; reflow: its ODE solver steps per pair)."""
    return _distill(config).get("teacher_steps")


def fake_updates(config: ml_collections.ConfigDict) -> int | None:
    """``distill.fake_updates`` of a DMD2 run: fake-score updates per generator update
    (DMD2's two time-scale update rule, 5 in the paper); ``None`` for other losses."""
    if config.diffusion.get("loss") != "dmd2":
        return None
    return _distill(config).get("fake_updates", 5)


def generator_steps(config: ml_collections.ConfigDict) -> int | None:
    """``distill.generator_steps`` of a DMD2 run: the generator's sampling steps ``N``
    (1: DMD2's one-step generator); ``None`` for other losses."""
    if config.diffusion.get("loss") != "dmd2":
        return None
    return _distill(config).get("generator_steps", 1)


def real_guidance(config: ml_collections.ConfigDict) -> float:
    """``distill.real_guidance``: DMD2's classifier-free guidance weight on the real
    score (1: none)."""
    return float(_distill(config).get("real_guidance", 1.0))


def adaptive_weight(config: ml_collections.ConfigDict) -> bool:
    """Whether an sCM run learns the adaptive weight (``distill.adaptive_weight``)."""
    return config.diffusion.get("loss") == "scm" and bool(
        _distill(config).get("adaptive_weight", True))


def needs_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether the run reads ``distill.teacher`` (cd, pd; scm when it is set)."""
    loss = config.diffusion.get("loss")
    return loss in TEACHER_LOSSES or (loss == "scm" and bool(_distill(config).get("teacher")))


def starts_from_teacher(config: ml_collections.ConfigDict) -> bool:
    """Whether the student's weights start as the teacher's (pd, reflow, dmd2; scm and cd
    with ``distill.init_from_teacher``)."""
    loss = config.diffusion.get("loss")
    return loss in FROM_TEACHER_LOSSES or (
        loss in ("scm", "cd") and bool(_distill(config).get("init_from_teacher")))


def cd_view(config: ml_collections.ConfigDict) -> bool:
    """Whether a CD run's student is a model of another parametrisation seen as a
    consistency function (:func:`jaxgen.diffusion.consistency.consistency_view`):
    ``diffusion.loss = "cd"`` without ``diffusion.precond = "consistency"``, e.g. the
    teacher's own network, process and prediction, so that it starts from its weights."""
    return config.diffusion.get("loss") == "cd" and config.diffusion.precond != "consistency"


def cd_levels(config: ml_collections.ConfigDict, process) -> EDM:
    """The :class:`EDM` process of a CD run's discretisation and sampler: the run's own
    (``precond = "consistency"``), else the paper's ``[0.002, 80]`` with
    ``diffusion.sigma_data`` (:func:`cd_view`)."""
    if not cd_view(config):
        return process
    return EDM(sigma_min=0.002, sigma_max=SCM_SIGMA_MAX,
               sigma_data=float(config.diffusion.get("sigma_data", 0.5)))


def consistency_function(config: ml_collections.ConfigDict, process, prediction: str,
                         model_fn: Callable) -> Callable:
    """A CD run's consistency function on :func:`cd_levels`: ``model_fn`` itself, or
    under :func:`cd_view` its :func:`~jaxgen.diffusion.consistency.consistency_view`
    (boundary 0.002)."""
    if not cd_view(config):
        return model_fn
    levels = cd_levels(config, process)
    return consistency_view(model_fn, process, prediction=prediction,
                            sigma_min=levels.sigma_min, sigma_data=levels.sigma_data)


def wrap_few_step_model(config: ml_collections.ConfigDict, module: nn.Module) -> nn.Module:
    """``module`` with sCM's adaptive-weight head when the run learns it, else unchanged."""
    if not adaptive_weight(config) or isinstance(module, AdaptiveWeightModel):
        return module
    return AdaptiveWeightModel(module)


def check_consistency(config: ml_collections.ConfigDict, process) -> None:
    """Refuse a configuration whose loss, preconditioning, process and teacher disagree.

    ``diffusion.precond = "consistency"`` goes with ``diffusion.loss`` ``ict`` or ``cd``
    (and back), on the EDM process; ``scm`` with precond and process ``trigflow``;
    ``distill.teacher`` is set for ``cd``, ``pd``, ``reflow`` and ``dmd2`` (optional for
    ``scm``); ``pd`` has an even ``distill.teacher_steps >= 2``; ``reflow`` runs on
    ``diffusion.process = "flow"`` with ``distill.teacher_steps >= 1``; ``dmd2`` has
    ``distill.fake_updates >= 1``, ``distill.generator_steps >= 1`` and a generator that
    can read ``x0`` at ``t_max``;
    ``distill.target_ema`` in [0, 1) and only for ``cd``; ``distill.real_guidance``
    finite and only for ``dmd2``.
    """
    loss = config.diffusion.get("loss", "denoising")
    precond = config.diffusion.precond
    distill = _distill(config)
    if (precond == "consistency") != (loss in CONSISTENCY_LOSSES) and not cd_view(config):
        raise InputError(
            f"diffusion.precond={precond!r} with diffusion.loss={loss!r}: a consistency model "
            "has precond='consistency' and loss='ict' or 'cd', both or neither (or loss='cd' "
            "on another parametrisation, the model seen as a consistency function)."
        )
    if precond == "consistency" and not isinstance(process, EDM):
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
    if (loss == "scm" and not isinstance(process, TrigFlow)) or cd_view(config):
        lo, hi = _noise_levels(process)
        if lo > 0.002 * (1 + 1e-6) or hi < SCM_SIGMA_MAX * (1 - 1e-6):
            fix = ("diffusion.process=diffusion.precond='trigflow'" if loss == "scm" else
                   "diffusion.process='edm' with diffusion.precond='consistency'")
            raise InputError(
                f"diffusion.loss={loss!r} on {process!r}: it spans noise levels [{lo:.4g}, "
                f"{hi:.4g}], but the student samples from sigma / alpha = {SCM_SIGMA_MAX:g} and "
                f"trains down to 0.002; use a wider process (e.g. 'flow') or {fix}.")
    teacher = distill.get("teacher")
    if loss in TEACHER_LOSSES and not teacher:
        raise InputError(f"diffusion.loss={loss!r} distils a trained run: give "
                         "--config.distill.teacher=WORKDIR (a jaxgen.train run folder).")
    if teacher and loss not in (*TEACHER_LOSSES, "scm"):
        raise InputError(f"distill.teacher={teacher!r} is read only by diffusion.loss 'cd', "
                         f"'scm', 'pd', 'reflow' or 'dmd2' (this run's loss is {loss!r}); drop "
                         "it or set the loss.")
    if distill.get("init_from_teacher") and not (teacher and (loss == "scm" or cd_view(config))):
        raise InputError("distill.init_from_teacher is for diffusion.loss='scm', or 'cd' on the "
                         "teacher's parametrisation (not precond='consistency'), with "
                         "distill.teacher set (pd, reflow and dmd2 always start from their "
                         "teacher); drop it.")
    steps = distill.get("teacher_steps")
    if loss == "pd" and not (isinstance(steps, int) and steps >= 2 and steps % 2 == 0):
        raise InputError(f"distill.teacher_steps={steps!r}: progressive distillation halves the "
                         "teacher's sampler steps; give an even number >= 2, e.g. 16.")
    if loss == "reflow" and not isinstance(process, Flow):
        raise InputError(f"diffusion.loss='reflow' straightens a flow (Liu et al. 2023): set "
                         f"diffusion.process='flow' (got {config.diffusion.process!r}).")
    if loss == "reflow" and not (isinstance(steps, int) and steps >= 1):
        raise InputError(f"distill.teacher_steps={steps!r}: reflow integrates the teacher's ODE "
                         "in that many distill.solver steps per pair; give an int >= 1, e.g. 8.")
    if loss == "dmd2":
        _check_dmd2(config, process)
    elif distill.get("generator_steps", 1) != 1:
        raise InputError(f"distill.generator_steps={distill.get('generator_steps')!r} is a DMD2 "
                         f"generator's steps; diffusion.loss={loss!r} has none: drop it.")
    w = distill.get("real_guidance", 1.0)
    if not (isinstance(w, int | float) and np.isfinite(w)):
        raise InputError(f"distill.real_guidance={w!r}: give a finite guidance weight (1: none).")
    if w != 1 and loss != "dmd2":
        raise InputError(f"distill.real_guidance={w} guides DMD2's real score; diffusion.loss="
                         f"{loss!r} has none: drop it.")
    mu = distill.get("target_ema") or 0.0
    if not (isinstance(mu, int | float) and 0 <= mu < 1):
        raise InputError(f"distill.target_ema={mu!r}: give the target network's EMA decay in "
                         "[0, 1) (0: the student itself; Song et al. 2023 use 0.95).")
    if mu and loss != "cd":
        raise InputError(f"distill.target_ema={mu} is CD's target network; diffusion.loss="
                         f"{loss!r} has none: drop it.")


def _check_dmd2(config: ml_collections.ConfigDict, process) -> None:
    """``distill.fake_updates`` and ``distill.generator_steps`` ints >= 1; a generator
    ``x0(sigma(t_max) z, t_max)`` that its prediction can give (not ``eps`` or ``score``
    where ``alpha(t_max) = 0``); the in-loop samples in ``eval.steps =
    distill.generator_steps`` (refused now rather than at the first evaluation)."""
    n = _distill(config).get("fake_updates", 5)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"distill.fake_updates={n!r}: give the fake-score updates per "
                         "generator update, an int >= 1 (DMD2 uses 5).")
    steps = _distill(config).get("generator_steps", 1)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"distill.generator_steps={steps!r}: give the DMD2 generator's "
                         "sampling steps, an int >= 1 (1: a one-step generator).")
    if config.eval.get("steps") != steps:
        raise InputError(f"eval.steps={config.eval.get('steps')!r}: this DMD2 run is a "
                         f"{steps}-step generator (distill.generator_steps={steps}); set "
                         f"eval.steps={steps}.")
    prediction = config.diffusion.prediction
    alpha = float(process.alpha(jnp.asarray(process.t_max, jnp.float32)))
    if config.diffusion.precond == "none" and prediction in ("eps", "score") and alpha == 0:
        raise InputError(f"diffusion.prediction={prediction!r}: DMD2's generator is the model's "
                         f"x0 at t_max, where alpha = 0 on {process!r} and {prediction!r} says "
                         "nothing of x0; distil an 'x0', 'v' or 'velocity' model.")


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
    without a teacher: sCT (:func:`scm_trainer_loss`). ``cd``, ``pd``, ``reflow``,
    ``dmd2`` and sCD: a loss that needs the teacher, which :func:`with_teacher` loads;
    the options are checked here already (on a stand-in identity teacher).
    """
    loss = config.diffusion.loss
    if loss == "ict":
        fn = functools.partial(ict_loss, total_steps=total_updates, process=process,
                               **_loss_kwargs(config, ict_loss))
        _dry_run(fn, step=jnp.zeros((), jnp.int32))
        return fn
    if loss == "scm":
        fn = scm_trainer_loss(config, process, prediction)
        _dry_run(fn, step=jnp.zeros((), jnp.int32))
        return _teacher_not_loaded if needs_teacher(config) else fn
    identity = lambda params, x, t, cond: x
    if loss == "cd":
        view = lambda model_fn, *a, **k: cd_loss(
            consistency_function(config, process, prediction, model_fn), *a, **k)
        _dry_run(functools.partial(view, teacher_step=lambda x, s_from, s_to, cond: x,
                                   process=cd_levels(config, process),
                                   **_loss_kwargs(config, cd_loss)))
    elif loss == "reflow":
        _dry_run(reflow_trainer_loss(config, process, prediction, identity), frozen=None)
    elif loss == "dmd2":
        _dry_run(dmd2_trainer_loss(config, process, prediction, identity), frozen=None,
                 fake_params=None)
    else:
        _dry_run(functools.partial(
            progressive_loss, teacher_fn=identity, teacher_params=None, process=process,
            prediction=prediction, student_steps=teacher_steps(config) // 2,
            **_loss_kwargs(config, progressive_loss)))
    return _teacher_not_loaded


def scm_sigma_data(config: ml_collections.ConfigDict, process) -> float:
    """TrigFlow's ``sigma_d`` of an sCM run: its :class:`TrigFlow`'s, else
    ``diffusion.sigma_data``."""
    return process.sigma_data if isinstance(process, TrigFlow) else config.diffusion.sigma_data


def scm_trainer_loss(config: ml_collections.ConfigDict, process, prediction: str,
                     velocity: Callable | None = None) -> Callable:
    """sCM's loss (:func:`jaxgen.diffusion.scm.scm_loss`) over the trainer's model.

    On TrigFlow (``diffusion.precond = "trigflow"``) the model returns the velocity
    ``sigma_d F(x_t / sigma_d, t)``; on any other process it is seen as a TrigFlow
    model at equal log-SNR (:func:`jaxgen.diffusion.scm.trigflow_velocity`; e.g. the
    default recipe's flow-matching network, so that sCD starts from such a teacher's
    weights). The loss's ``F(x_in, t)`` is that velocity at ``x_t = sigma_d x_in``,
    divided by ``sigma_d``. With ``distill.adaptive_weight`` the student's pass also
    returns the head's ``u(t)`` (``return_logvar=True``).

    Args:
      config: the run's configuration (``distill.loss_kwargs``: ``p_mean``, ``p_std``,
        ``warmup_steps``, ``tangent_c``).
      process: the run's process.
      prediction: what the run's model predicts.
      velocity: ``velocity(frozen) -> (x_t, t, cond) -> dx_t/dt``, the teacher's PF-ODE
        for sCD (:func:`jaxgen.diffusion.scm.teacher_velocity`); ``None`` for sCT.

    Returns:
      ``loss_fn(model_fn, params, x0, cond, key, *, step, frozen=None)``.
    """
    sd = scm_sigma_data(config, process)
    kwargs = _loss_kwargs(config, scm_loss)
    adaptive = adaptive_weight(config)

    def loss(model_fn, params, x0, cond, key, *, step, frozen=None):
        if not isinstance(process, TrigFlow):
            model_fn = trigflow_velocity(model_fn, process, prediction=prediction, sigma_data=sd)
        raw = lambda p, x_in, t, c: model_fn(p, sd * x_in, t, c) / sd

        def raw_logvar(p, x_in, t, c):
            v, u = model_fn(p, sd * x_in, t, c, return_logvar=True)
            return v / sd, u

        return scm_loss(raw, params, x0, cond, key, sigma_data=sd, step=step,
                        teacher=None if velocity is None else velocity(frozen),
                        raw_logvar_fn=raw_logvar if adaptive else None, **kwargs)

    return loss


def reflow_trainer_loss(config: ml_collections.ConfigDict, process, prediction: str,
                        teacher_fn: Callable) -> Callable:
    """Rectified-flow reflow (Liu et al. 2023, Algorithm 1) with pairs drawn at every step.

    ``key`` splits into ``(k_pairs, k_t)``: :func:`jaxgen.sampling.teacher.reflow_pairs`
    draws ``z`` from ``k_pairs`` and integrates the teacher's probability-flow ODE from
    ``sigma(t_max) z`` to ``x0`` in ``distill.teacher_steps`` steps of the deterministic
    ``distill.solver``, conditioned on ``cond`` (the batch's labels), without guidance;
    :func:`jaxgen.diffusion.distillation.reflow_loss` (its ``t`` from ``k_t``) fits the
    student to the straight path between ``z`` and ``x0``. Algorithm 1 draws the pairs
    once into a stored set; drawing them afresh every step is the same coupling with
    no reuse of a pair. The batch's images ``x0`` give only the shape.

    Args:
      config: the run's configuration (``distill.solver``, ``distill.teacher_steps``,
        ``distill.loss_kwargs``: ``time_sampler``).
      process: the flow both models run on.
      prediction: what teacher and student predict (checked equal).
      teacher_fn: the teacher's ``model_fn(params, x_t, t, cond)``.

    Returns:
      ``loss_fn(model_fn, params, x0, cond, key, *, frozen)``, ``frozen`` the teacher's weights.
    """
    solver = _distill(config).get("solver", "heun")
    steps = teacher_steps(config)
    kwargs = _loss_kwargs(config, reflow_loss)

    def loss(model_fn, params, x0, cond, key, *, frozen):
        k_pairs, k_t = jax.random.split(key)
        z, x1 = reflow_pairs(teacher_fn, frozen, process, k_pairs, x0.shape,
                             prediction=prediction, solver=solver, steps=steps, cond=cond)
        return reflow_loss(model_fn, params, z, x1, cond, k_t, process=process,
                           prediction=prediction, **kwargs)

    return loss


def dmd2_trainer_loss(config: ml_collections.ConfigDict, process, prediction: str,
                      teacher_fn: Callable, num_classes: int = 0) -> Callable:
    """DMD2's two losses (Yin et al. 2024, no GAN term) as one objective of the generator
    ``params`` and the fake score ``fake_params``.

    ``key`` splits into ``(k_z, k_fake, k_gen)``; ``z ~ N(0, I)`` from ``k_z`` and
    ``x = G(z)``, ``G`` = :func:`jaxgen.diffusion.distillation.few_step_generator` of the
    student on the ``distill.generator_steps`` times of
    :func:`jaxgen.sampling.generator_times` (at several steps, its backward simulation
    keyed by ``fold_in(key, 3)``; the fake score and the DMD gradient see the same ``x``).
    The value is ``mean fake_score_loss(fake_params; stopgrad x)`` (Eq. 6, with
    ``k_fake``) plus, when ``generator_step``, ``mean dmd_loss(params)`` (Eqs. 7-8, with
    ``k_gen``), whose fake score is held fixed: the gradient of the sum in
    ``(params, fake_params)`` is each network's own. The real score is the teacher, with
    classifier-free guidance ``w = distill.real_guidance`` when ``w != 1``:
    ``u + w (c - u)`` of its conditional and unconditional (label ``num_classes``)
    predictions, which is the same combination of their ``x0``.

    Args:
      config: the run's configuration (``distill.real_guidance``,
        ``distill.loss_kwargs``: ``time_sampler`` of both losses).
      process: the process of teacher and student (checked equal).
      prediction: what teacher and student predict (checked equal).
      teacher_fn: the teacher's ``model_fn(params, x_t, t, cond)``.
      num_classes: the teacher's classes (its null label, for guidance).

    Returns:
      ``loss_fn(model_fn, params, x0, cond, key, *, frozen, fake_params,
      generator_step=True) -> (scalar, {"fake_loss", "generator_loss", "dm_grad_norm"})``,
      the generator's terms 0 when ``generator_step`` is false; ``x0`` gives only the shape.
    """
    kwargs = _loss_kwargs(config, dmd_loss)
    w = real_guidance(config)
    ts = generator_times(process, generator_steps(config) or 1)

    def real_fn(params, x_t, t, cond):
        out = teacher_fn(params, x_t, t, cond)
        if w == 1 or cond is None:  # None: the build's dry run (with_teacher checks classes)
            return out
        uncond = teacher_fn(params, x_t, t, {"label": jnp.full_like(cond["label"], num_classes)})
        return uncond + w * (out - uncond)

    def loss(model_fn, params, x0, cond, key, *, frozen, fake_params, generator_step=True):
        k_z, k_fake, k_gen = jax.random.split(key, 3)
        z = jax.random.normal(k_z, x0.shape, x0.dtype)
        sample = few_step_generator(model_fn, process, prediction=prediction, ts=ts)
        k_sim = jax.random.fold_in(key, 3)
        generator = lambda p, noise, c: sample(p, noise, c, k_sim)
        fake, _ = fake_score_loss(model_fn, fake_params, generator(params, z, cond), cond, k_fake,
                                  process=process, prediction=prediction, **kwargs)
        value = jnp.mean(fake)
        zero = jnp.zeros((), value.dtype)
        metrics = {"fake_loss": value, "generator_loss": zero, "dm_grad_norm": zero}
        if generator_step:
            gen, m = dmd_loss(generator, params, z, cond, k_gen, real_fn=real_fn,
                              real_params=frozen, fake_fn=model_fn, fake_params=fake_params,
                              process=process, prediction=prediction, **kwargs)
            metrics.update(generator_loss=jnp.mean(gen), dm_grad_norm=m["grad_norm"])
            value = value + jnp.mean(gen)
        return value, metrics

    return loss


def generator_turn(config: ml_collections.ConfigDict, fake_count: jax.Array) -> jax.Array:
    """Whether a DMD2 step also updates the generator (DMD2's two time-scale update rule).

    Every step updates the fake score; the generator's turn is the step whose fake-score
    update is the ``F``-th since the generator's last, ``F = distill.fake_updates``: the
    micro-batches of the fake score's optimizer updates number ``F - 1, 2F - 1, ...``
    (``fake_count`` updates completed before the step). With ``F = 1`` every step is the
    generator's; its first turn comes after ``F - 1`` fake-score updates, when the fake
    score no longer equals the teacher (at equality the distribution-matching gradient
    is 0).
    """
    n = fake_updates(config)
    return fake_count % n == n - 1


def generator_terms_on_turn(metrics: dict, turn: jax.Array) -> dict:
    """The metrics of :func:`dmd2_trainer_loss` at ``generator_step=turn`` from those at
    ``generator_step=True``: off the generator's turns its terms (``generator_loss``,
    ``dm_grad_norm``) are 0 and ``loss`` is ``fake_loss`` alone, as the loss gives them.

    For a step that computes the generator's terms at every step and drops them off its
    turns (on XLA:CPU, where a gradient inside ``lax.cond`` is an order of magnitude
    slower than outside it); the fake score's terms are the same either way.
    """
    gate = lambda v: jnp.where(turn, v, jnp.zeros_like(v))
    out = dict(metrics, generator_loss=gate(metrics["generator_loss"]),
               dm_grad_norm=gate(metrics["dm_grad_norm"]))
    out["loss"] = out["fake_loss"] + out["generator_loss"]
    return out


def _noise_levels(process) -> tuple[float, float]:
    """The smallest and largest noise level ``sigma(t) / alpha(t)`` a process reaches."""
    t = jnp.asarray([process.t_min, process.t_max], jnp.float32)
    s = process.sigma(t) / process.alpha(t)
    return float(s[0]), float(s[1])


def _student_levels(student) -> tuple[float, float]:
    """The noise levels the student's teacher must reach: CD's ``[sigma_min, sigma_max]``
    (:func:`cd_levels`); sCM's ``[0.002, 80]`` (its sampler starts at ``arctan(80 /
    sigma_d)``)."""
    if isinstance(student.process, EDM) and not cd_view(student.config):
        return student.process.sigma_min, student.process.sigma_max
    return 0.002, SCM_SIGMA_MAX


def _fields(config: ml_collections.ConfigDict) -> dict:
    """``config`` flattened to dotted keys, as its ``config.json`` holds it."""
    flat = flatten_dict(json.loads(config.to_json_best_effort()))
    return {".".join(k): v for k, v in flat.items()}


def check_teacher(teacher, student, where: str) -> None:
    """Refuse a teacher run (:class:`jaxgen.train.RunParts`) the student cannot distil.

    Same image shape and class count; a diffusion or flow model (not itself a
    consistency model or a DMD2 generator). CD and sCM: its noise levels cover the
    student's. A student that starts from the teacher's weights (pd, reflow, dmd2; sCM
    with ``distill.init_from_teacher``):
    the same model (up to its dropout rates), process and parametrisation
    (:data:`_SAME_AS_TEACHER`) and
    prediction; a pd teacher that is itself a pd student samples in
    ``distill.teacher_steps`` steps.
    """
    if teacher.is_consistency:
        raise InputError(f"distill.teacher={where}: a consistency model; distil a diffusion or "
                         "flow model (its PF-ODE is the teacher).")
    if teacher.is_dmd2_generator:
        raise InputError(f"distill.teacher={where}: a DMD2 generator (no score or PF-ODE)"
                         "; distil a diffusion or flow model.")
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
    (:func:`jaxgen.diffusion.distillation.progressive_times`). ``reflow``:
    :func:`reflow_trainer_loss`. ``dmd2``: :func:`dmd2_trainer_loss` (also given
    ``fake_params``; see :attr:`jaxgen.train.TrainState.fake_params`).
    """
    loss_name = config.diffusion.loss
    process = student.process
    if loss_name == "reflow":
        return reflow_trainer_loss(config, teacher.process, teacher.prediction, teacher.model_fn)
    if loss_name == "dmd2":
        return dmd2_trainer_loss(config, teacher.process, teacher.prediction, teacher.model_fn,
                                 teacher.num_classes)
    if loss_name == "scm":
        velocity = lambda frozen: teacher_velocity(
            teacher.model_fn, frozen, teacher.process, prediction=teacher.prediction,
            sigma_data=scm_sigma_data(config, process))
        return scm_trainer_loss(config, process, student.prediction, velocity)
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

    levels = cd_levels(config, process)

    def cd(model_fn, params, x0, cond, key, *, frozen, target_params=None):
        f = consistency_function(config, process, student.prediction, model_fn)
        return cd_loss(f, params, x0, cond, key, teacher_step=teacher_step(frozen),
                       target_params=target_params, process=levels, **kwargs)

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
    if real_guidance(parts.config) != 1 and not teacher.parts.num_classes:
        raise InputError(f"distill.real_guidance={real_guidance(parts.config)}: classifier-free "
                         f"guidance needs a class-conditional teacher; {cfg.teacher} has no "
                         "classes: set it to 1.")
    check_teacher(teacher.parts, parts, cfg.teacher)
    loss = teacher_loss(parts.config, parts, teacher.parts)
    start = None
    if starts_from_teacher(parts.config):
        check_start(parts, teacher.params, cfg.teacher)
        start = teacher.params
    return dataclasses.replace(parts, loss_fn=loss, frozen=teacher.params, start=start)
