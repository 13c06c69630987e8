"""The model contract: ``model_fn(params, x_t, t, cond) -> prediction``.

Every jaxgen model is called as ``module.apply(variables, x_t, t, cond,
train=False)`` with ``x_t`` NHWC float, ``t`` a float ``[B]`` array and
``cond`` ``None`` or ``{"label": [B] int}``: :func:`check_inputs` and
:func:`split_cond` check those inputs the same way in every model, and
:func:`as_model_fn` binds a module into the function losses and samplers take.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.errors import InputError

Array = jax.Array
Cond = Mapping[str, Array] | None
ModelFn = Callable[[Any, Array, Array, Cond], Array]  # model_fn(params, x_t, t, cond)


def split_cond(cond: Cond, num_classes: int, batch: int) -> Array | None:
    """The class labels of a ``cond`` dict, checked; the null class where none are given.

    Args:
      cond: ``None`` or a dict whose only key is ``"label"`` (``[B]`` ints in
        ``[0, num_classes]``; ``num_classes`` is the null class).
      num_classes: classes of the model; 0 for an unconditional model.
      batch: batch size, to build the all-null labels.

    Returns:
      ``[B]`` int32 labels, or ``None`` for an unconditional model.
    """
    cond = dict(cond or {})
    label = cond.pop("label", None)
    if cond:
        raise InputError(f"cond has unknown keys {sorted(cond)}; models accept only 'label'.")
    if num_classes == 0:
        if label is not None:
            raise InputError(
                "cond['label'] was given to a model built with num_classes=0; "
                "build it with num_classes > 0 for class conditioning."
            )
        return None
    if label is None:
        return jnp.full((batch,), num_classes, jnp.int32)
    label = jnp.asarray(label)
    if label.shape != (batch,) or not jnp.issubdtype(label.dtype, jnp.integer):
        raise InputError(
            f"cond['label'] must be an int array of shape ({batch},), "
            f"got {label.dtype}{label.shape}."
        )
    return label.astype(jnp.int32)


PERTURB_KEY = "perturb_attention"
"""``cond[PERTURB_KEY]``: ``[B]`` bool; where true, a model that supports it (DiT, U-Net)
replaces the self-attention maps of its ``pag_layers`` by the identity (PAG)."""


def split_perturb(cond: Cond, batch: int) -> tuple[Cond, Array | None]:
    """``cond`` without its :data:`PERTURB_KEY` entry, and that entry checked (or ``None``)."""
    cond = dict(cond or {})
    flag = cond.pop(PERTURB_KEY, None)
    if flag is not None and (jnp.shape(flag) != (batch,) or jnp.asarray(flag).dtype != bool):
        raise InputError(
            f"cond[{PERTURB_KEY!r}] must be a bool array of shape ({batch},), "
            f"got {jnp.asarray(flag).dtype}{jnp.shape(flag)}."
        )
    return cond or None, flag


def check_inputs(x: Array, t: Array) -> Array:
    """Check ``x`` is NHWC float and return ``t`` as a float ``[B]`` array (scalars broadcast)."""
    if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputError(f"x must be a float NHWC array [B, H, W, C], got {x.dtype}{x.shape}.")
    t = jnp.asarray(t, jnp.float32)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, x.shape[:1])
    if t.shape != x.shape[:1]:
        raise InputError(f"t must be a scalar or have shape ({x.shape[0]},), got {t.shape}.")
    return t


def as_model_fn(
    module: nn.Module,
    *,
    train: bool = False,
    rngs: Mapping[str, Array] | None = None,
    constants: Mapping[str, Any] | None = None,
    keep_variance: bool = False,
    **call_kwargs: Any,
) -> ModelFn:
    """A jaxgen model as ``model_fn(params, x_t, t, cond) -> prediction``.

    ``module.apply({"params": params, **constants}, x_t, t, cond, train=train,
    rngs=rngs, **call_kwargs)``, keeping, for a model with a learned variance
    (``learn_sigma=True``), only the prediction channels (the first ``C`` of
    ``2C``), which is what losses and samplers expect. The weights stay an
    argument: under ``jit`` they are traced, never baked into the program, so
    one compilation serves every checkpoint. Build the function once and reuse
    it (compiled samplers are cached on its identity).

    Args:
      module: a :class:`~jaxgen.models.DiT`, :class:`~jaxgen.models.UNet`,
        :class:`~jaxgen.models.EDM2`, or any module with that call signature.
      train: training mode (dropout, label dropout); needs ``rngs={"dropout": key}``.
      rngs: RNG streams for training mode.
      constants: the module's variable collections other than ``params``, read
        by every call and never trained (EDM2's ``buffers``: its fixed Fourier
        frequencies and phases); ``None`` for a module with none.
      keep_variance: return all ``2C`` channels of a ``learn_sigma`` model: the
        prediction, then the variance interpolation ``v`` of IDDPM's learned range
        (:mod:`jaxgen.diffusion.vlb`). Also a keyword of each call, which is how the
        hybrid loss and the ``ddpm_learned`` solver ask for it while every other
        consumer keeps the prediction alone; refused for a model without those channels.
      **call_kwargs: further keywords of the module's call, e.g. EDM2's
        ``return_logvar=True`` (then ``model_fn`` returns ``(denoised, logvar)``).

    Returns:
      ``model_fn(params, x_t [B,H,W,C] float, t [B] float, cond dict or None, **per_call)``;
      ``per_call`` are more keywords of the module's call for this call alone (the
      feature cache of DiT and U-Net: ``fill_cache=True``, ``cache=features``).
    """
    learn_sigma = getattr(module, "learn_sigma", False)
    constants = dict(constants or {})
    default_keep = keep_variance

    def model_fn(params: Any, x_t: Array, t: Array, cond: Cond = None, *,
                 keep_variance: bool = default_keep, **per_call: Any) -> Array:
        if keep_variance and not learn_sigma:
            raise InputError(f"keep_variance=True: {type(module).__name__} has no variance "
                             "channels; build it with learn_sigma=True.")
        out = module.apply({"params": params, **constants}, x_t, t, cond, train=train,
                           rngs=rngs, **call_kwargs, **per_call)
        if not learn_sigma or keep_variance:
            return out
        if isinstance(out, tuple):  # (prediction, extra outputs), e.g. REPA's tokens
            return (out[0][..., : x_t.shape[-1]], *out[1:])
        return out[..., : x_t.shape[-1]]

    return model_fn
