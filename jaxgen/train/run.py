"""Open a finished (or running) training run: its config, model and weights."""

from __future__ import annotations

import importlib
import json
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
from etils import epath
from flax.traverse_util import flatten_dict

from jaxgen.errors import InputError
from jaxgen.files import as_path
from jaxgen.models import load_weights
from jaxgen.parallel import make_mesh, replicated
from jaxgen.train.checkpoint import Checkpointer
from jaxgen.train.loop import build, model_shape
from jaxgen.train.phema import load_snapshot
from jaxgen.train.state import (
    RunParts,
    abstract_state,
    default_weights_name,
    ema_name,
    make_run_parts,
    phema_name,
    phema_sigma_rels,
    state_weights,
)


class Run(NamedTuple):
    """A run restored from its workdir.

    Attributes:
      parts: model, process, mesh and config (:class:`RunParts`), with the
        model's fixed collections (EDM2's buffers) bound.
      params: the chosen weights, sharded as training left them.
      step: the checkpoint's step.
      weights: which weights ``params`` are: an EMA key (``repr`` of its decay), a
        power EMA (``phema:<sigma_rel>``), ``params``, or the path of a snapshot file.
    """

    parts: RunParts
    params: Any
    step: int
    weights: str


def load_run(
    workdir: str | os.PathLike,
    ema: str | float | None = None,
    *,
    module: nn.Module | None = None,
) -> Run:
    """The latest checkpoint of a ``python -m jaxgen.train`` workdir (local or ``gs://``).

    Sample from it with ``run.parts.model_fn(run.params, x_t, t, cond)`` or
    :func:`jaxgen.train.sample_images`.

    Args:
      workdir: the run's folder, holding ``config.json`` and ``checkpoints/``.
      ema: which weights: an EMA decay (default the run's first,
        ``train.ema_decays[0]``; with none, its first power EMA), ``"params"``
        for the raw training weights, ``"phema:<sigma_rel>"`` for a power EMA
        the run keeps, or the path of a ``phema-<t>-<sigma_rel>.npz`` file (a
        power-EMA snapshot, or a reconstruction by ``python -m jaxgen.phema``).
      module: the Flax module the run was trained with, when it was given to
        :func:`jaxgen.train.train_and_evaluate` as ``module=`` (default: ``config.model``).

    Raises:
      InputError: no ``config.json``, no checkpoint, weights the run does not keep,
        or a snapshot file of another model.
    """
    workdir = epath.Path(workdir)
    config_path = workdir / "config.json"
    if not config_path.is_file():
        raise InputError(f"{config_path}: not found; give a jaxgen.train run folder.")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    parts, _ = build(config, module=module)
    checkpoints = Checkpointer(workdir / "checkpoints", writable=False)  # a reader writes nothing
    try:
        restored = checkpoints.restore_latest(abstract_state(parts))
    finally:
        checkpoints.close()
    if restored is None:
        raise InputError(f"{workdir / 'checkpoints'}: no checkpoint to restore.")
    state, _, step = restored
    parts = parts.with_constants(state.constants)
    if isinstance(ema, str | os.PathLike) and os.fspath(ema).endswith(".npz"):
        return Run(parts, _load_snapshot_like(ema, state.params), int(step), os.fspath(ema))
    name = _weights_name(config, ema)
    phemas = [phema_name(s) for s in phema_sigma_rels(config)]
    if name not in ("params", *state.ema, *phemas):
        raise InputError(
            f"ema={ema!r}: the run keeps EMAs with decays {sorted(state.ema)}"
            + (f", power EMAs {phemas}" if phemas else "") + ", or use 'params'."
        )
    return Run(parts, state_weights(state, config, name), int(step), name)


def recipe_config(recipe: str, *, model: str | None = None, vae: str | os.PathLike | None = None,
                  vae_model: str | None = None) -> ml_collections.ConfigDict:
    """The config of recipe ``jaxgen.configs.<recipe>``, with the model and VAE replaced.

    Raises:
      InputError: an unknown recipe.
    """
    from jaxgen.configs import RECIPES

    if recipe not in RECIPES:
        raise InputError(f"--recipe {recipe}: not a jaxgen recipe; use one of {list(RECIPES)}.")
    config = importlib.import_module(f"jaxgen.configs.{recipe}").get_config()
    if model is not None:
        config.model.name = model
    if vae is not None:
        config.latent.vae = os.fspath(vae)
    if vae_model is not None:
        config.latent.vae_model = vae_model
    return config


def load_released(config: ml_collections.ConfigDict, weights: str | os.PathLike) -> Run:
    """Released weights (DiT, SiT, any :func:`jaxgen.models.load_weights` file) as a
    :class:`Run` under ``config``'s model, process and latents, without a training workdir.

    The model computes in float32, its weights replicated over all devices.

    Raises:
      InputError: weights of another model (every mismatched tensor named).
    """
    config = ml_collections.ConfigDict(config.to_dict())
    config.train.compute_dtype = "float32"
    mesh = make_mesh()
    parts = make_run_parts(config, mesh, model_shape(config, None), 1)
    variables = load_weights(weights, parts.module)
    params = jax.device_put(variables["params"], replicated(mesh))
    return Run(parts.with_constants(variables.get("buffers")), params, 0, os.fspath(weights))


def _weights_name(config: ml_collections.ConfigDict, ema: str | float | None) -> str | None:
    """The :func:`jaxgen.train.state.state_weights` name ``load_run``'s ``ema`` means
    (``None``: not a name of any weights)."""
    if ema is None:
        return default_weights_name(config)
    if ema == "params":
        return ema
    text = str(ema)
    try:
        if text.startswith("phema:"):
            return phema_name(float(text.removeprefix("phema:")))
        return ema_name(float(text))
    except ValueError:
        return None


def _load_snapshot_like(path: str | os.PathLike, params: Any) -> Any:
    """A snapshot file's weights, checked against the run's parameters and sharded as they are."""
    if not as_path(path).is_file():
        raise InputError(f"{path}: no such snapshot file.")
    loaded = load_snapshot(path)
    want = {k: v.shape for k, v in flatten_dict(params).items()}
    got = {k: v.shape for k, v in flatten_dict(loaded).items()}
    if got != want:
        differ = sorted(set(got) ^ set(want)) or [k for k in want if got[k] != want[k]]
        raise InputError(f"{path}: its weights do not fit this run's model (first difference: "
                         f"{'/'.join(differ[0])}); give a snapshot of this run.")
    return jax.device_put(loaded, jax.tree.map(lambda p: p.sharding, params))
