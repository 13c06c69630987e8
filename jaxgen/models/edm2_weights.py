"""Read official EDM2 weights into :class:`~jaxgen.models.EDM2`: network pickles and state dicts.

The official names map one to one onto the Flax tree: ``unet.enc.64x64_block0.conv_res0.weight``
is ``params/unet/enc_64x64_block0/conv_res0/weight``; the Fourier ``freqs``
and ``phases`` are buffers (the ``buffers`` collection). Convolution weights
``[out, in, kh, kw]`` become HWIO ``[kh, kw, in, out]`` and linear weights
``[out, in]`` become ``[in, out]``. Every shape is checked against the module,
and missing or unexpected names are listed.

Neither torch nor any code in the files runs: ``torch.save(net.state_dict())``
of the official ``Precond`` is read by :func:`jaxgen.weights.read_torch_file`,
and the official network pickles (``edm2-img512-xs-2147483-0.135.pkl``,
training snapshots ``network-snapshot-*.pkl``, ``phema-*.pkl``) by
:func:`jaxgen.weights.persistence_pickle.read_network_pickle`, which takes
their ``ema`` network's tensors and never compiles the source code embedded
in them.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxgen.errors import InputError
from jaxgen.models.edm2 import EDM2
from jaxgen.weights import read_torch_file
from jaxgen.weights.persistence_pickle import read_network_pickle

_BUFFERS = ("freqs", "phases")


def _flax_path(name: str) -> tuple[str, ...]:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "unet" and parts[1] in ("enc", "dec"):
        parts = ["unet", f"{parts[1]}_{parts[2]}", *parts[3:]]
    return ("buffers" if parts[-1] in _BUFFERS else "params", *parts)


def _to_flax(array: np.ndarray) -> np.ndarray:
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def edm2_variables_from_torch(
    tensors: dict[str, np.ndarray], module: EDM2, where: str = "state dict"
) -> dict[str, Any]:
    """Variables of ``module`` from the tensors of an official ``Precond`` state dict.

    Args:
      tensors: dotted name → array, e.g. from :func:`jaxgen.weights.read_torch_file`.
      module: the :class:`EDM2` whose configuration the weights were trained with.
      where: the source's name, for error messages.

    Returns:
      ``{"params": ..., "buffers": ...}`` of float32 ``jnp`` arrays.

    Raises:
      InputError: naming missing or unexpected tensors, or any shape mismatch.
    """
    x = jax.ShapeDtypeStruct(
        (1, module.img_resolution, module.img_resolution, module.img_channels), jnp.float32)
    sigma = jax.ShapeDtypeStruct((1,), jnp.float32)
    cond = {"label": jax.ShapeDtypeStruct((1,), jnp.int32)} if module.num_classes else None
    expected = flatten_dict(
        nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x, sigma, cond)))
    got = {_flax_path(k): (k, v) for k, v in tensors.items()}
    missing = sorted(".".join(p[1:]) for p in expected.keys() - got.keys())
    unexpected = sorted(got[p][0] for p in got.keys() - expected.keys())
    if missing or unexpected:
        raise InputError(
            f"{where}: does not match this EDM2 configuration; missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}. Build the model with the "
            "configuration the weights were trained with (preset, num_classes, channels)."
        )
    flat = {}
    for path, spec in expected.items():
        name, array = got[path]
        value = _to_flax(np.asarray(array))
        if value.shape != spec.shape:
            raise InputError(
                f"{where}: {name} has shape {tuple(np.shape(array))} (Flax {value.shape}), "
                f"expected Flax shape {spec.shape}; the model configuration differs."
            )
        flat[path] = jnp.asarray(value, spec.dtype)
    return unflatten_dict(flat)


def load_edm2_weights(path: str | os.PathLike, module: EDM2) -> dict[str, Any]:
    """Read official EDM2 weights: a network pickle (``.pkl``) or a ``Precond`` state dict.

    Args:
      path: an official ``.pkl`` (its ``ema`` network; float16 weights become
        float32), or ``torch.save(net.state_dict())`` (``.pt``/``.pth``, any other name).
      module: the matching :class:`EDM2` (e.g. ``edm2("xs")`` for ``edm2-img512-xs-*.pkl``).

    Returns:
      Variables for ``module.apply``.

    Raises:
      InputError: for a missing or unreadable file, or weights of another configuration.
    """
    where = os.fspath(path)
    if not os.path.isfile(where):
        raise InputError(f"{where}: no such file; pass an EDM2 .pkl or a torch state dict file.")
    with open(where, "rb") as f:
        raw = f.read()
    read = read_network_pickle if where.endswith(".pkl") else read_torch_file
    return edm2_variables_from_torch(read(raw, where), module, where)
