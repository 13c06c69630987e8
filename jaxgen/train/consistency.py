"""Consistency models in the trainer: consistency training (iCT) and distillation (CD).

``diffusion.loss = "ict"`` trains a consistency function from data alone
(:func:`jaxgen.diffusion.consistency.ict_loss`, its curriculum ``N(k)`` read
from the train step); ``diffusion.loss = "cd"`` distils the jaxgen run named by
``distill.teacher`` (:func:`jaxgen.diffusion.consistency.cd_loss`), whose
weights reach the loss as the step's frozen argument and whose ODE step is any
deterministic jaxgen solver (``distill.solver``). Both need
``diffusion.precond = "consistency"`` on ``diffusion.process = "edm"``: the one
parametrisation (:func:`jaxgen.diffusion.consistency.consistency_precond`)
that the loss, the in-loop samples and ``python -m jaxgen.sample`` all use.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaxgen.diffusion.consistency import cd_loss, ict_loss
from jaxgen.diffusion.processes import EDM
from jaxgen.errors import InputError
from jaxgen.sampling.teacher import solver_step

CONSISTENCY_LOSSES = ("ict", "cd")
_SET_BY_TRAINER = {"step", "total_steps", "process", "teacher_step", "target_params"}


def _distill(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.distill`` (absent from configs saved before it existed: empty)."""
    return config.get("distill") or ml_collections.ConfigDict()


def check_consistency(config: ml_collections.ConfigDict, process) -> None:
    """Refuse a configuration whose loss, preconditioning, process and teacher disagree.

    ``diffusion.precond = "consistency"`` goes with ``diffusion.loss`` ``ict`` or
    ``cd`` (and back), on the EDM process; ``distill.teacher`` is set exactly for ``cd``.
    """
    loss = config.diffusion.get("loss", "denoising")
    precond = config.diffusion.precond
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
    teacher = _distill(config).get("teacher")
    if loss == "cd" and not teacher:
        raise InputError("diffusion.loss='cd' distils a trained run: give "
                         "--config.distill.teacher=WORKDIR (a jaxgen.train run folder).")
    if teacher and loss != "cd":
        raise InputError(f"distill.teacher={teacher!r} is read only by diffusion.loss='cd' "
                         f"(this run's loss is {loss!r}); drop it or set diffusion.loss='cd'.")


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
    identity = lambda params, x, t, cond: x
    x0 = jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    jax.eval_shape(lambda x, k: loss_fn(identity, None, x, None, k, **extra), x0, key)


def _teacher_not_loaded(*args, **kwargs):
    raise InputError(
        "diffusion.loss='cd': the teacher is not loaded; train_and_evaluate loads "
        "distill.teacher (from Python: parts = jaxgen.train.consistency.with_teacher(parts))."
    )


def consistency_loss(config: ml_collections.ConfigDict, process: EDM,
                     total_updates: int) -> Callable:
    """The :data:`jaxgen.train.state.LossFn` of ``diffusion.loss`` ``ict`` or ``cd``.

    ``ict``: :func:`~jaxgen.diffusion.consistency.ict_loss` with ``total_steps`` the
    run's optimizer updates (its curriculum ``N(k)``, Song & Dhariwal 2024 Sec. 3.4,
    follows the ``step`` the train step passes) and ``distill.loss_kwargs``. ``cd``:
    a loss that needs the teacher, which :func:`with_teacher` loads; the options are
    checked here already.
    """
    if config.diffusion.loss == "ict":
        loss = functools.partial(ict_loss, total_steps=total_updates, process=process,
                                 **_loss_kwargs(config, ict_loss))
        _dry_run(loss, step=jnp.zeros((), jnp.int32))
        return loss
    _dry_run(functools.partial(cd_loss, teacher_step=lambda x, s_from, s_to, cond: x,
                               process=process, **_loss_kwargs(config, cd_loss)))
    return _teacher_not_loaded


def _noise_levels(process) -> tuple[float, float]:
    """The smallest and largest noise level ``sigma(t) / alpha(t)`` a process reaches."""
    t = jnp.asarray([process.t_min, process.t_max], jnp.float32)
    s = process.sigma(t) / process.alpha(t)
    return float(s[0]), float(s[1])


def check_teacher(teacher, student, where: str) -> None:
    """Refuse a teacher run (:class:`jaxgen.train.RunParts`) the student cannot distil.

    Same image shape and class count; a diffusion or flow model (not itself a
    consistency model) whose noise levels cover the student's ``[sigma_min, sigma_max]``.
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
    lo, hi = _noise_levels(teacher.process)
    s_min, s_max = student.process.sigma_min, student.process.sigma_max
    if lo > s_min * (1 + 1e-6) or hi < s_max * (1 - 1e-6):
        raise InputError(
            f"distill.teacher={where}: its process {teacher.process!r} spans noise levels "
            f"[{lo:.4g}, {hi:.4g}], which does not cover the student's [{s_min:g}, {s_max:g}]; "
            "set diffusion.process_kwargs sigma_min and sigma_max inside it."
        )


def cd_teacher_loss(config: ml_collections.ConfigDict, process: EDM, teacher) -> Callable:
    """The CD loss with ``teacher`` (its :class:`jaxgen.train.RunParts`) as the ODE step.

    ``loss_fn(model_fn, params, x0, cond, key, *, frozen)``: ``frozen`` are the
    teacher's weights; one ``distill.solver`` step of the teacher
    (:func:`jaxgen.sampling.teacher.solver_step`) maps ``x_{n+1}`` to ``x^_n``
    (Song et al. 2023, Eq. 6). The target is the stop-gradient of the student
    itself (``mu = 0``, as iCT), not an EMA.
    """
    solver = _distill(config).get("solver", "heun")
    kwargs = _loss_kwargs(config, cd_loss)

    def teacher_step(frozen):
        return solver_step(teacher.model_fn, frozen, teacher.process,
                           prediction=teacher.prediction, solver=solver)

    teacher_step(None)  # checks the solver (known, deterministic) now

    def loss(model_fn, params, x0, cond, key, *, frozen):
        return cd_loss(model_fn, params, x0, cond, key, teacher_step=teacher_step(frozen),
                       process=process, **kwargs)

    return loss


def with_teacher(parts, *, teacher: Any = None):
    """``parts`` of a ``diffusion.loss = "cd"`` run with its teacher loaded.

    The teacher is ``load_run(distill.teacher, distill.teacher_weights)``
    (:func:`jaxgen.train.load_run`), checked by :func:`check_teacher`; its
    weights become :attr:`RunParts.frozen` (replicated, traced, never
    checkpointed: a resumed run loads them again from the folder its config names).

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
    loss = cd_teacher_loss(parts.config, parts.process, teacher.parts)
    return dataclasses.replace(parts, loss_fn=loss, frozen=teacher.params)
