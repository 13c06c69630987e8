"""Released checkpoints into jaxgen models, without torch and without executing code.

:func:`load_weights` reads a file or a diffusers folder, recognises its format
from its tensor names, maps every tensor onto the Flax parameter tree through
that format's name table, checks every shape, and reports all missing,
unexpected and mis-shaped tensors by name in one :class:`InputError`.
:func:`export_weights` is the exact inverse (same tables), for a bit-exact
round trip and for handing jaxgen weights to the PyTorch tools.

Formats, one name table each:

- :class:`AutoencoderKL`: ``"diffusers"`` (diffusers' ``AutoencoderKL``:
  stabilityai/sd-vae-ft-ema, sd-vae-ft-mse, sdxl-vae; the deprecated
  attention names ``query/key/value/proj_attn`` of older uploads are accepted)
  and ``"ldm"`` (CompVis LDM / Stable Diffusion names: the ``*-original``
  VAE files, or the ``first_stage_model.*`` part of a full SD checkpoint).
- :class:`DiT`: ``"dit"`` (facebookresearch/DiT and willisma/SiT ``models.py``:
  ``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``, ``SiT-XL-2-256x256.pt``; an
  ``ema`` sub-dict of a training checkpoint is used when present) and
  ``"diffusers"`` (``DiTTransformer2DModel``, facebook/DiT-XL-2-256 ``transformer/``).
- :class:`UNet`: ``"diffusers"`` (``UNet2DModel``, google/ddpm-cifar10-32).
- :class:`EDM2`: ``"edm2"`` (NVlabs/edm2's ``Precond``, whose names map one to
  one: ``unet.enc.64x64_block0.conv_res0.weight`` is
  ``unet/enc_64x64_block0/conv_res0/weight``; the Fourier ``freqs`` and
  ``phases`` are buffers, returned in the ``buffers`` collection).

Files: ``*.safetensors`` (through ``safetensors.numpy``), ``*.bin`` / ``*.pt`` /
``*.pth`` / ``*.ckpt`` (through :func:`jaxgen.weights.read_torch_file`, which
refuses any pickle that asks for code), NVlabs network pickles ``*.pkl`` (EDM2's
released ``edm2-img512-xs-2147483-0.135.pkl``, snapshots, ``phema-*.pkl``: their
``ema`` network through
:func:`jaxgen.weights.persistence_pickle.read_network_pickle`, which never
compiles the source code embedded in them), or a diffusers folder (its
``diffusion_pytorch_model.*``, also in the ``vae/``, ``transformer/`` or ``unet/``
subfolder of a pipeline, sharded files through their ``.index.json``).
:func:`convert_state_dict` does the same from tensors already in memory.

What differs between the released networks and jaxgen's modules:

- diffusers' ``DiTTransformer2DModel`` embeds ``t`` with frequencies
  ``10000^(-i / (128 - 1))`` (``downscale_freq_shift=1``) where the official
  DiT, its checkpoints and jaxgen use ``10000^(-i / 128)``, and its ``norm2``
  uses the config's ``norm_eps`` (1e-5 by default, DiT: 1e-6); the weights
  (converted from the official ones) load unchanged and jaxgen computes the
  official DiT with them. diffusers repeats the timestep and class embedders
  in every block: they must be identical (they are in converted checkpoints).
- DDPM's CIFAR-10 model (diffusers ``UNet2DModel`` of google/ddpm-cifar10-32)
  embeds ``t`` with ``10000^(-i / (64 - 1))`` as ``[sin, cos]``, uses
  GroupNorm eps 1e-6 and pads its stride-2 convolutions on the bottom/right
  only; jaxgen's ``unet-ddpm-cifar10`` uses ``10000^(-i / 64)`` as ``[cos, sin]``
  (the reader reorders the halves), eps 1e-5 and symmetric padding, so the
  imported weights load with every shape checked but do not reproduce DDPM's
  outputs exactly.
- Official DiT files store the fixed ``pos_embed`` table; jaxgen recomputes it
  for the input size, so it is checked for width and otherwise not used, and
  :func:`export_weights` does not write it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from jaxgen.errors import InputError
from jaxgen.models.autoencoder import AutoencoderKL
from jaxgen.models.dit import DiT
from jaxgen.models.edm2 import EDM2
from jaxgen.models.unet import UNet
from jaxgen.weights import read_torch_file
from jaxgen.weights.persistence_pickle import read_network_pickle

Tensors = dict[str, np.ndarray]
ParamPath = tuple[str, ...]

KNOWN_FILES: dict[str, str] = {
    "DiT-XL-2-256x256.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-256x256.pt "
    "(facebookresearch/DiT)",
    "DiT-XL-2-512x512.pt": "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-512x512.pt "
    "(facebookresearch/DiT)",
    "SiT-XL-2-256x256.pt": "willisma/SiT's download.py: https://www.dl.dropboxusercontent.com/scl/"
    "fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt?rlkey=uxzxmpicu46coq3msb17b9ofa",
    "vae-ft-mse-840000-ema-pruned.safetensors": "stabilityai/sd-vae-ft-mse-original on the "
    "Hugging Face Hub",
    "vae-ft-mse-840000-ema-pruned.ckpt": "stabilityai/sd-vae-ft-mse-original on the Hugging "
    "Face Hub",
    "vae-ft-ema-560000-ema-pruned.safetensors": "stabilityai/sd-vae-ft-ema-original on the "
    "Hugging Face Hub",
    "vae-ft-ema-560000-ema-pruned.ckpt": "stabilityai/sd-vae-ft-ema-original on the Hugging "
    "Face Hub",
    "sdxl_vae.safetensors": "stabilityai/sdxl-vae on the Hugging Face Hub",
}
"""Where the released files :func:`load_weights` knows by name come from."""

_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NETWORK_PICKLE = ".pkl"


# ---------------------------------------------------------------------------
# Layout conversions (PyTorch ↔ Flax), each with its exact inverse.


def _to_flax(kind: str, arrays: list[np.ndarray]) -> np.ndarray:
    """The Flax value of one parameter from its source tensors (several: a fused projection)."""
    if kind == "copy":  # norms, biases of single tensors, embedding tables
        return arrays[0]
    if kind == "conv":  # OIHW → HWIO
        return arrays[0].transpose(2, 3, 1, 0)
    if kind == "bias":  # biases of fused projections
        return np.concatenate(arrays)
    if kind == "linear_swap":
        # [sin, cos] input halves (DDPM) → jaxgen's [cos, sin]: swap the rows' halves.
        return np.roll(arrays[0].T, arrays[0].shape[1] // 2, axis=0)
    if kind == "conv1x1":  # [out, in, 1, 1] → Dense [in, out]
        arrays = [a.reshape(a.shape[:2]) for a in arrays]
    return np.concatenate(arrays, axis=0).T  # "linear": [out, in] (stacked) → [in, out]


def _from_flax(kind: str, value: np.ndarray, n: int) -> list[np.ndarray]:
    """The ``n`` source tensors of one Flax parameter: the inverse of :func:`_to_flax`."""
    if kind == "copy":
        return [value]
    if kind == "conv":
        return [value.transpose(3, 2, 0, 1)]
    if kind == "bias":
        return np.split(value, n)
    if kind == "linear_swap":
        return [np.roll(value, value.shape[0] // 2, axis=0).T]
    parts = np.split(value.T, n, axis=0)
    return [p[:, :, None, None] for p in parts] if kind == "conv1x1" else parts


def _leaf(path: ParamPath, prefix: str, weight_kind: str,
          names: tuple[str, ...] | None = None) -> list[tuple[tuple[str, ...], str]]:
    """Source keys and kind of a leaf (``kernel``/``bias``/``scale``/``embedding``) of a module.

    ``names`` (instead of ``prefix``) lists source modules whose outputs jaxgen
    fuses into one projection (diffusers' ``to_q``, ``to_k``, ``to_v``).
    """
    leaf = path[-1]
    suffix = "bias" if leaf == "bias" else "weight"
    keys = tuple(f"{p}.{suffix}" for p in (names or (prefix,)))
    if leaf == "kernel":
        return [(keys, weight_kind)]
    if leaf == "bias":
        return [(keys, "bias" if len(keys) > 1 else "copy")]
    return [(keys, "copy")]  # GroupNorm scale, embedding table


# ---------------------------------------------------------------------------
# Name tables: Flax module path → source module name, one function per format.


def _vae_module(mod: list[str], levels: int, ldm: bool) -> str:
    """Source name of an :class:`AutoencoderKL` module (``mod`` without the leaf)."""
    top, *rest = mod
    if not rest:  # quant_conv / post_quant_conv
        return top
    name, *inner = rest
    block = {"norm_out": "norm_out" if ldm else "conv_norm_out"}.get(name, name)
    if m := re.fullmatch(r"down(\d+)_res(\d+)", name):
        block = (f"down.{m[1]}.block.{m[2]}" if ldm
                 else f"down_blocks.{m[1]}.resnets.{m[2]}")
    elif m := re.fullmatch(r"down(\d+)_down", name):
        block = f"down.{m[1]}.downsample.conv" if ldm else f"down_blocks.{m[1]}.downsamplers.0.conv"
    elif m := re.fullmatch(r"up(\d+)_res(\d+)", name):
        block = (f"up.{m[1]}.block.{m[2]}" if ldm
                 else f"up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}")
    elif m := re.fullmatch(r"up(\d+)_up", name):
        block = (f"up.{m[1]}.upsample.conv" if ldm
                 else f"up_blocks.{levels - 1 - int(m[1])}.upsamplers.0.conv")
    elif m := re.fullmatch(r"mid_res(\d)", name):
        block = f"mid.block_{int(m[1]) + 1}" if ldm else f"mid_block.resnets.{m[1]}"
    elif name == "mid_attn":
        block = "mid.attn_1" if ldm else "mid_block.attentions.0"
    inner_names = (
        {"shortcut": "nin_shortcut", "proj": "proj_out"} if ldm
        else {"shortcut": "conv_shortcut", "norm": "group_norm", "q": "to_q", "k": "to_k",
              "v": "to_v", "proj": "to_out.0"}
    )
    return ".".join([top, block, *(inner_names.get(i, i) for i in inner)])


def _vae_table(fmt: str, model: AutoencoderKL) -> Callable[[ParamPath], list]:
    ldm = fmt == "ldm"

    def source(path: ParamPath) -> list:
        prefix = _vae_module(list(path[:-1]), len(model.channels), ldm)
        if path[-2] in ("q", "k", "v", "proj"):  # the mid-block attention's projections
            return _leaf(path, prefix, "conv1x1" if ldm else "linear")
        return _leaf(path, prefix, "conv")

    return source


_DIT_OFFICIAL = {
    "patch_embed": "x_embedder.proj", "t_embedder/fc1": "t_embedder.mlp.0",
    "t_embedder/fc2": "t_embedder.mlp.2", "y_embedder/table": "y_embedder.embedding_table",
    "final_adaLN": "final_layer.adaLN_modulation.1", "final": "final_layer.linear",
    "adaLN": "adaLN_modulation.1", "attn/qkv": "attn.qkv", "attn/proj": "attn.proj",
    "fc1": "mlp.fc1", "fc2": "mlp.fc2",
}
_DIT_DIFFUSERS = {
    "patch_embed": "pos_embed.proj", "t_embedder/fc1": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder/fc2": "norm1.emb.timestep_embedder.linear_2",
    "y_embedder/table": "norm1.emb.class_embedder.embedding_table", "final_adaLN": "proj_out_1",
    "final": "proj_out_2", "adaLN": "norm1.linear", "attn/proj": "attn1.to_out.0",
    "fc1": "ff.net.0.proj", "fc2": "ff.net.2",
}


def _dit_table(fmt: str, model: DiT) -> Callable[[ParamPath], list]:
    names = _DIT_OFFICIAL if fmt == "dit" else _DIT_DIFFUSERS

    def source(path: ParamPath) -> list:
        mod = "/".join(path[:-1])
        kind = "conv" if mod == "patch_embed" else "linear"
        if m := re.fullmatch(r"block(\d+)/(.+)", mod):
            i, inner = m[1], m[2]
            if fmt == "dit":
                return _leaf(path, f"blocks.{i}.{names[inner]}", kind)
            if inner == "attn/qkv":
                qkv = tuple(f"transformer_blocks.{i}.attn1.to_{c}" for c in "qkv")
                return _leaf(path, "", kind, names=qkv)
            return _leaf(path, f"transformer_blocks.{i}.{names[inner]}", kind)
        if fmt == "diffusers" and mod.startswith(("t_embedder", "y_embedder")):
            # diffusers keeps one copy of the shared embedders in every block.
            return [e for i in range(model.depth)
                    for e in _leaf(path, f"transformer_blocks.{i}.{names[mod]}", kind)]
        return _leaf(path, names[mod], kind)

    return source


def _unet_table(fmt: str, model: UNet) -> Callable[[ParamPath], list]:
    del fmt
    levels = len(model.ch_mult)
    inner_names = {"emb_proj": "time_emb_proj", "skip": "conv_shortcut", "norm": "group_norm",
                   "attn/proj": "to_out.0"}

    def source(path: ParamPath) -> list:
        mod = "/".join(path[:-1])
        if mod == "t_embedder/fc1":
            return _leaf(path, "time_embedding.linear_1", "linear_swap")
        if mod in ("t_embedder/fc2", "y_embedder/table"):
            name = "time_embedding.linear_2" if mod.endswith("fc2") else "class_embedding"
            return _leaf(path, name, "linear")
        head, _, inner = mod.partition("/")
        kind = "conv" if path[-2].startswith("conv") or head.endswith("resample") else "linear"
        if path[-2] == "skip":
            kind = "conv1x1"
        if m := re.fullmatch(r"(down|up)(\d+)_(res|attn)(\d+)", head):
            level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
            block = f"{m[1]}_blocks.{level}.{'resnets' if m[3] == 'res' else 'attentions'}.{m[4]}"
        elif m := re.fullmatch(r"(down|up)(\d+)_resample", head):
            level = int(m[2]) if m[1] == "down" else levels - 1 - int(m[2])
            block = f"{m[1]}_blocks.{level}.{m[1]}samplers.0.conv"
        elif m := re.fullmatch(r"mid_(res|attn)(\d?)", head):
            block = f"mid_block.resnets.{m[2]}" if m[1] == "res" else "mid_block.attentions.0"
        else:
            block = {"norm_out": "conv_norm_out"}.get(head, head)
        if inner == "attn/qkv":
            return _leaf(path, "", kind, names=tuple(f"{block}.to_{c}" for c in "qkv"))
        prefix = ".".join([block, inner_names.get(inner, inner)]) if inner else block
        return _leaf(path, prefix, kind)

    return source


def _edm2_table(fmt: str, model: EDM2) -> Callable[[ParamPath], list]:
    del fmt, model

    def source(path: ParamPath) -> list:
        head, *rest = path
        if head == "unet" and rest[0].startswith(("enc_", "dec_")):  # enc.64x64_block0
            rest = [*rest[0].split("_", 1), *rest[1:]]
        keys = (".".join([head, *rest]),)
        if path[-1] != "weight":  # gains, Fourier frequencies and phases
            return [(keys, "copy")]
        # MPConv weights: linear (kernel 0) in the embeddings and the logvar head, else conv.
        linear = path[-2] in ("emb_noise", "emb_label", "emb_linear", "logvar_linear")
        return [(keys, "linear" if linear else "conv")]

    return source


class _Format(NamedTuple):
    family: type
    name: str
    marker: str  # a tensor only this format has
    table: Callable[[str, Any], Callable[[ParamPath], list]]
    ignored: tuple[str, ...] = ()  # tensors of the file that jaxgen recomputes
    subfolder: str = ""
    collections: tuple[str, ...] = ("params",)  # the model's variables the file holds

    def sources(self, model: Any) -> Callable[[ParamPath], list]:
        """``path → [(source keys, kind), ...]`` for ``model``'s parameters in this format."""
        table = self.table(self.name, model)

        def source(path: ParamPath) -> list:
            try:
                return table(path)
            except KeyError:
                raise InputError(
                    f"jaxgen's {type(model).__name__} parameter {'/'.join(path)} has no "
                    f"counterpart in the {self.name} format; this configuration has no "
                    "released checkpoints."
                ) from None

        return source


FORMATS: tuple[_Format, ...] = (
    _Format(AutoencoderKL, "diffusers", "encoder.conv_norm_out.weight", _vae_table,
            subfolder="vae"),
    _Format(AutoencoderKL, "ldm", "encoder.norm_out.weight", _vae_table),
    _Format(DiT, "dit", "x_embedder.proj.weight", _dit_table, ignored=("pos_embed",)),
    _Format(DiT, "diffusers", "pos_embed.proj.weight", _dit_table, subfolder="transformer"),
    _Format(UNet, "diffusers", "time_embedding.linear_1.weight", _unet_table, subfolder="unet"),
    _Format(EDM2, "edm2", "unet.emb_fourier.freqs", _edm2_table,
            collections=("params", "buffers")),
)
"""Every checkpoint format :func:`load_weights` reads, per model class."""

_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _formats_of(model: Any) -> list[_Format]:
    found = [f for f in FORMATS if isinstance(model, f.family)]
    if not found:
        known = sorted({f.family.__name__ for f in FORMATS})
        raise InputError(
            f"load_weights: no checkpoint format for a {type(model).__name__}; "
            f"released weights exist for {known}."
        )
    return found


# ---------------------------------------------------------------------------
# Reading files.


def read_state_dict(path: str | os.PathLike, subfolder: str = "") -> Tensors:
    """All tensors of a weight file or diffusers folder, by name, as NumPy arrays.

    Args:
      path: a ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` / ``.ckpt`` file, an
        NVlabs network pickle ``.pkl`` (its ``ema`` network), or a folder holding
        ``diffusion_pytorch_model.*`` (itself or in ``subfolder``).
      subfolder: the pipeline subfolder to look in when ``path`` is a pipeline
        folder (``"vae"``, ``"transformer"``, ``"unet"``).

    Raises:
      InputError: a missing file (saying where the known ones come from), an
        unknown suffix, a corrupt file, or a pickle that asks for code.
    """
    path = Path(path)
    if path.is_dir():
        return _read_folder(path, subfolder)
    if not path.exists():
        source = KNOWN_FILES.get(path.name)
        raise InputError(
            f"{path}: no such file"
            + (f"; download it from {source}." if source else
               "; pass a .safetensors/.bin/.pt/.pth/.ckpt/.pkl file or a diffusers folder.")
        )
    if path.suffix == ".safetensors":
        try:
            return dict(safetensors.numpy.load_file(str(path)))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise InputError(f"{path}: not a readable safetensors file ({e}).") from None
    if path.suffix in _TORCH_SUFFIXES:
        return read_torch_file(path.read_bytes(), str(path))
    if path.suffix == _NETWORK_PICKLE:
        return read_network_pickle(path.read_bytes(), str(path))
    raise InputError(
        f"{path}: unknown weight file type {path.suffix!r}; expected .safetensors, one of "
        f"{list(_TORCH_SUFFIXES)} (PyTorch), {_NETWORK_PICKLE} (NVlabs network pickle), or a "
        "diffusers folder."
    )


def _read_folder(folder: Path, subfolder: str) -> Tensors:
    for where in (folder, folder / subfolder) if subfolder else (folder,):
        for name in _DIFFUSERS_FILES:
            index = where / f"{name}.index.json"
            if index.exists():
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                return {k: v for s in shards for k, v in read_state_dict(where / s).items()}
            if (where / name).exists():
                return read_state_dict(where / name)
    looked = [str(folder), *([str(folder / subfolder)] if subfolder else [])]
    raise InputError(
        f"{folder}: no {' or '.join(_DIFFUSERS_FILES)} (or sharded .index.json) in {looked}; "
        "download the model folder from the Hugging Face Hub (e.g. stabilityai/sd-vae-ft-ema)."
    )


def _unwrap(tensors: Tensors, model: Any) -> Tensors:
    """The model's own tensors of a checkpoint that wraps them (Lightning, full SD, EMA)."""
    for prefix in ("state_dict.", "first_stage_model." if isinstance(model, AutoencoderKL)
                   else "ema."):
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if isinstance(model, AutoencoderKL):
        # Older diffusers uploads name the mid-block attention query/key/value/proj_attn.
        pattern = re.compile(r"(mid_block\.attentions\.0\.)(query|key|value|proj_attn)\.")
        tensors = {pattern.sub(lambda m: f"{m[1]}{_DEPRECATED_ATTENTION[m[2]]}.", k): v
                   for k, v in tensors.items()}
    return tensors


# ---------------------------------------------------------------------------
# Conversion.


def _abstract_variables(
    model: Any, in_channels: int, collections: tuple[str, ...]
) -> dict[ParamPath, jax.ShapeDtypeStruct]:
    """Flat ``{(collection, *path): ShapeDtypeStruct}`` of the model's variables in
    ``collections`` (per-block DiT layout)."""
    if getattr(model, "scan_blocks", False):
        model = model.clone(scan_blocks=False)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    if isinstance(model, AutoencoderKL):
        x = jax.ShapeDtypeStruct((1, model.factor, model.factor, model.in_channels), jnp.float32)
        tree = jax.eval_shape(model.init, key, x)
    else:
        size = (model.patch if isinstance(model, DiT)
                else model.img_resolution if isinstance(model, EDM2)  # it checks the input size
                else 2 ** (len(model.ch_mult) - 1))
        x = jax.ShapeDtypeStruct((1, size, size, in_channels), jnp.float32)
        t = jax.ShapeDtypeStruct((1,), jnp.float32)
        cond = {"label": jax.ShapeDtypeStruct((1,), jnp.int32)} if model.num_classes else None
        tree = jax.eval_shape(lambda k, x, t, c: model.init(k, x, t, c), key, x, t, cond)
    flat = flax.traverse_util.flatten_dict(flax.linen.unbox(tree))
    return {path: shape for path, shape in flat.items() if path[0] in collections}


def _in_channels(model: Any, fmt: _Format, tensors: Tensors, where: str) -> int:
    """Image channels of the checkpoint (DiT and U-Net take them from their input)."""
    if isinstance(model, AutoencoderKL):
        return model.in_channels
    if isinstance(model, EDM2):
        return model.img_channels
    name = fmt.marker if isinstance(model, DiT) else "conv_in.weight"
    if name not in tensors or tensors[name].ndim != 4:
        raise InputError(f"{where}: no 4-D tensor {name!r}, the input convolution of this format.")
    return int(tensors[name].shape[1])


def _detect(tensors: Tensors, model: Any, where: str) -> _Format:
    formats = _formats_of(model)
    for fmt in formats:
        if fmt.marker in tensors:
            return fmt
    raise InputError(
        f"{where}: not a {type(model).__name__} checkpoint in any known format "
        f"({', '.join(f'{f.name} (has {f.marker})' for f in formats)}); its first tensors are "
        f"{sorted(tensors)[:5]}. Are these the weights of another model?"
    )


def _listing(names: list[str], limit: int = 20) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_weights(path: str | os.PathLike, model: Any) -> dict[str, Any]:
    """Variables for ``model.apply`` from a released checkpoint (see the module docstring).

    Args:
      path: a weight file or a diffusers (model or pipeline) folder.
      model: the jaxgen module the weights are for, e.g. ``create_model("vae-sd")``,
        ``create_model("DiT-XL/2")`` or ``edm2("xs")``; its configuration must
        match the file's.

    Returns:
      ``{"params": ...}`` (for EDM2 also ``"buffers"``) float arrays in the
      model's ``param_dtype``.

    Raises:
      InputError: a missing or unreadable file, weights of another model or
        configuration (missing, unexpected and mis-shaped tensors are all
        named), or diffusers DiT blocks whose shared embedders differ.
    """
    subfolder = next((f.subfolder for f in _formats_of(model) if f.subfolder), "")
    return convert_state_dict(read_state_dict(path, subfolder), model, str(path))


def convert_state_dict(tensors: Tensors, model: Any, where: str = "state dict") -> dict[str, Any]:
    """Variables for ``model.apply`` from a released checkpoint's tensors already in memory.

    What :func:`load_weights` does once the file is read: the same formats,
    checks and errors.

    Args:
      tensors: name → array, e.g. from :func:`read_state_dict`.
      model: the jaxgen module the weights are for (as for :func:`load_weights`).
      where: the tensors' origin, for error messages.

    Returns:
      As :func:`load_weights`.

    Raises:
      InputError: as :func:`load_weights`, for the tensors.
    """
    tensors = _unwrap(tensors, model)
    fmt = _detect(tensors, model, where)
    shapes = _abstract_variables(model, _in_channels(model, fmt, tensors, where), fmt.collections)
    source = fmt.sources(model)
    flat: dict[ParamPath, np.ndarray] = {}
    used = {k for k in tensors if k.split(".")[0] in fmt.ignored}
    missing, mismatched, untied = [], [], []
    for path_ in shapes:
        for keys, kind in source(path_[1:]):
            absent = [k for k in keys if k not in tensors]
            missing += absent
            used.update(keys)
            if absent:
                continue
            want = shapes[path_]
            try:
                value = _to_flax(kind, [np.asarray(tensors[k]) for k in keys])
            except ValueError:  # source tensors that cannot even be laid out (wrong rank)
                value = None
            if value is None or value.shape != want.shape:
                got = "unusable" if value is None else value.shape
                mismatched.append(f"{'+'.join(keys)} {tuple(tensors[keys[0]].shape)} → "
                                  f"{'/'.join(path_[1:])} {got} but the model has {want.shape}")
                continue
            value = value.astype(want.dtype)
            if path_ in flat and not np.array_equal(flat[path_], value):
                untied.append("+".join(keys))
            flat.setdefault(path_, value)
    unexpected = sorted(set(tensors) - used)
    if missing or unexpected or mismatched or untied:
        parts = [f"missing {_listing(missing)}" if missing else "",
                 f"unexpected {_listing(unexpected)}" if unexpected else "",
                 f"wrong shape: {_listing(mismatched, 5)}" if mismatched else "",
                 f"per-block embedders differ from block 0 (jaxgen's DiT shares one): "
                 f"{_listing(untied, 5)}" if untied else ""]
        raise InputError(
            f"{where}: does not fit {type(model).__name__}({_config(model)}) as a {fmt.name} "
            f"checkpoint: {'; '.join(p for p in parts if p)}. Build the model with the "
            "checkpoint's configuration."
        )
    variables = flax.traverse_util.unflatten_dict(flat)
    if getattr(model, "scan_blocks", False):
        from jaxgen.models.dit import stack_blocks

        variables["params"] = stack_blocks(variables["params"], model.depth)
    return jax.tree.map(jnp.asarray, variables)


def export_weights(variables: Any, model: Any, fmt: str | None = None) -> Tensors:
    """The state dict of ``variables`` in a released format, the inverse of :func:`load_weights`.

    ``safetensors.numpy.save_file(export_weights(variables, model), path)``
    writes a file that :func:`load_weights` (and the format's own code, e.g.
    diffusers' ``from_pretrained``) reads back bit-exactly.

    Args:
      variables: ``{"params": ...}`` of ``model`` (for EDM2 also ``"buffers"``).
      model: the module the variables belong to.
      fmt: a format name of the model's class (:data:`FORMATS`); default the
        first (``"diffusers"`` for autoencoders and U-Nets, ``"dit"`` for DiT).

    Returns:
      ``{name: float array}`` in PyTorch layouts.

    Raises:
      InputError: an unknown format for this model, or variables without a
        collection the format holds.
    """
    formats = _formats_of(model)
    chosen = next((f for f in formats if fmt in (None, f.name)), None)
    if chosen is None:
        raise InputError(f"export_weights: format {fmt!r} unknown for a {type(model).__name__}; "
                         f"expected one of {[f.name for f in formats]}.")
    lacking = [c for c in chosen.collections if c not in variables]
    if lacking:
        raise InputError(f"export_weights: the variables lack {lacking}, which the "
                         f"{chosen.name} format holds; pass all of model.init's variables.")
    variables = {c: flax.linen.unbox(variables[c]) for c in chosen.collections}
    if "blocks" in variables["params"] and isinstance(model, DiT):
        from jaxgen.models.dit import unstack_blocks

        variables["params"] = unstack_blocks(variables["params"])
    source = chosen.sources(model)
    out: Tensors = {}
    for path_, value in flax.traverse_util.flatten_dict(variables).items():
        for keys, kind in source(path_[1:]):
            for key, part in zip(keys, _from_flax(kind, np.asarray(value), len(keys)), strict=True):
                out[key] = np.ascontiguousarray(part)
    return out


def _config(model: Any) -> str:
    fields = ("channels", "latent_channels", "patch", "hidden", "depth", "num_classes",
              "learn_sigma", "ch", "ch_mult", "img_resolution", "img_channels", "model_channels",
              "channel_mult", "num_blocks", "logvar_channels")
    return ", ".join(f"{f}={getattr(model, f)}" for f in fields if hasattr(model, f))
