"""Released DINOv2 and CLIP weights -> Flax parameters, checked, converted once and cached.

Formats read (never executing code: safetensors through its NumPy API, torch
files through :func:`jaxgen.weights.read_torch_file`):

* DINOv2: torch hub's ``dinov2_<arch>_pretrain.pth`` (state dict; fused
  ``attn.qkv``) and ``transformers``' ``Dinov2Model`` /
  ``Dinov2WithRegistersModel`` (``model.safetensors`` or
  ``pytorch_model.bin``).
* CLIP: OpenAI's ``ViT-*.pt`` (TorchScript archive of the whole CLIP model,
  float16; fused ``in_proj``) and ``transformers``' ``CLIPModel`` /
  ``CLIPVisionModelWithProjection`` files (the text tower is ignored).

One table per format maps each Flax parameter onto its tensor; every shape is
checked, and missing or unexpected tensors are named. The architecture is
read off the tensors and must be one of the released ones. Converted
parameters are cached as ``.npz`` under ``$JAXGEN_CACHE/encoders`` keyed by
the file's SHA-256, so a file is converted once.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.cache import cache_dir
from jaxgen.encoders import clip as clip_lib
from jaxgen.encoders import dinov2 as dinov2_lib
from jaxgen.errors import InputError
from jaxgen.files import open_atomic, sha256
from jaxgen.weights.torch_pickle import read_torch_file

# A rule: (tensor name, how, part). how: "linear" (torch [out, in] -> [in, out]),
# "conv" (OIHW -> HWIO) or "copy" (same values, singleton axes may differ);
# part: None, or 0/1/2 = the query/key/value third of a fused projection.
Rule = tuple[str, str, int | None]

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_{arch}/dinov2_{arch}{reg}_pretrain.pth"
CLIP_FILES = {  # OpenAI's release names (clip/clip.py _MODELS)
    "vitb32": "ViT-B-32.pt",
    "vitl14": "ViT-L-14.pt",
    "vitl14_336": "ViT-L-14-336px.pt",
}
CLIP_HF = {"vitb32": "openai/clip-vit-base-patch32", "vitl14": "openai/clip-vit-large-patch14",
           "vitl14_336": "openai/clip-vit-large-patch14-336"}
DINOV2_HF = {"vits14": "facebook/dinov2-small", "vitb14": "facebook/dinov2-base",
             "vitl14": "facebook/dinov2-large", "vitg14": "facebook/dinov2-giant"}


def _leaf(name: str) -> str:
    return {"kernel": "weight", "scale": "weight", "bias": "bias"}[name]


def _block_rule(path: tuple[str, ...], prefix: str, table: dict, fused: str | None) -> Rule:
    """Rule of a parameter inside ``encoder/block_i`` given a per-format submodule table."""
    i = int(path[1].removeprefix("block_"))
    sub, leaf = path[2:-1], path[-1]
    if not sub:  # layer scales
        return f"{prefix}{i}.{table[leaf]}", "copy", None
    if sub[0] == "attn" and sub[1] in ("query", "key", "value") and fused is not None:
        part = ("query", "key", "value").index(sub[1])
        return f"{prefix}{i}.{fused}{'_weight' if leaf == 'kernel' else '_bias'}", "linear", part
    how = "linear" if leaf == "kernel" else "copy"
    return f"{prefix}{i}.{table[sub]}.{_leaf(leaf)}", how, None


def _top_rule(path: tuple[str, ...], table: dict) -> Rule:
    if len(path) == 1:
        return table[path[0]], "copy", None
    how = {"patch_embed": "conv", "proj": "linear"}.get(path[0], "copy") if path[-1] == "kernel" \
        else "copy"
    return f"{table[path[0]]}.{_leaf(path[-1])}", how, None


def dinov2_hf_rule(path: tuple[str, ...]) -> Rule:
    """``transformers`` ``Dinov2Model`` names."""
    if path[0] == "encoder":
        table = {("norm1",): "norm1", ("norm2",): "norm2",
                 ("attn", "query"): "attention.attention.query",
                 ("attn", "key"): "attention.attention.key",
                 ("attn", "value"): "attention.attention.value",
                 ("attn", "out"): "attention.output.dense",
                 ("mlp", "fc1"): "mlp.fc1", ("mlp", "fc2"): "mlp.fc2",
                 ("mlp", "w12"): "mlp.weights_in", ("mlp", "w3"): "mlp.weights_out",
                 "ls1": "layer_scale1.lambda1", "ls2": "layer_scale2.lambda1"}
        return _block_rule(path, "encoder.layer.", table, None)
    return _top_rule(path, {"patch_embed": "embeddings.patch_embeddings.projection",
                            "cls_token": "embeddings.cls_token",
                            "pos_embed": "embeddings.position_embeddings",
                            "register_tokens": "embeddings.register_tokens",
                            "norm": "layernorm"})


# transformers >= 5 renames Dinov2 tensors when loading (its conversion_mapping.py) and saves
# them so; the released files keep the names above. Inverse of that renaming:
_HF_V5_NAMES = (("attention.q_proj.", "attention.attention.query."),
                ("attention.k_proj.", "attention.attention.key."),
                ("attention.v_proj.", "attention.attention.value."),
                ("attention.o_proj.", "attention.output.dense."),
                ("mlp.down_proj.", "mlp.weights_out."))


def dinov2_hf_file_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``transformers`` >= 5 Dinov2 names -> the released files' names (SwiGLU's
    ``gate_proj``/``up_proj`` concatenated back into ``weights_in``)."""
    out = {}
    for name, t in tensors.items():
        if ".mlp.up_proj." in name:
            continue
        if ".mlp.gate_proj." in name:
            up = tensors[name.replace(".gate_proj.", ".up_proj.")]
            out[name.replace(".gate_proj.", ".weights_in.")] = np.concatenate([t, up])
            continue
        for new, old in _HF_V5_NAMES:
            name = name.replace(new, old)
        out[name] = t
    return out


def dinov2_hub_rule(path: tuple[str, ...]) -> Rule:
    """torch hub ``facebookresearch/dinov2`` names."""
    if path[0] == "encoder":
        table = {("norm1",): "norm1", ("norm2",): "norm2", ("attn", "out"): "attn.proj",
                 ("mlp", "fc1"): "mlp.fc1", ("mlp", "fc2"): "mlp.fc2",
                 ("mlp", "w12"): "mlp.w12", ("mlp", "w3"): "mlp.w3",
                 "ls1": "ls1.gamma", "ls2": "ls2.gamma"}
        i = path[1].removeprefix("block_")
        if path[2] == "attn" and path[3] in ("query", "key", "value"):
            part = ("query", "key", "value").index(path[3])
            return f"blocks.{i}.attn.qkv.{_leaf(path[-1])}", "linear", part
        return _block_rule(path, "blocks.", table, None)
    return _top_rule(path, {"patch_embed": "patch_embed.proj", "cls_token": "cls_token",
                            "pos_embed": "pos_embed", "register_tokens": "register_tokens",
                            "norm": "norm"})


def clip_hf_rule(path: tuple[str, ...]) -> Rule:
    """``transformers`` ``CLIPVisionModelWithProjection`` (or ``CLIPModel``) names."""
    if path[0] == "encoder":
        table = {("norm1",): "layer_norm1", ("norm2",): "layer_norm2",
                 ("attn", "query"): "self_attn.q_proj", ("attn", "key"): "self_attn.k_proj",
                 ("attn", "value"): "self_attn.v_proj", ("attn", "out"): "self_attn.out_proj",
                 ("mlp", "fc1"): "mlp.fc1", ("mlp", "fc2"): "mlp.fc2"}
        return _block_rule(path, "vision_model.encoder.layers.", table, None)
    return _top_rule(path, {"patch_embed": "vision_model.embeddings.patch_embedding",
                            "cls_token": "vision_model.embeddings.class_embedding",
                            "pos_embed": "vision_model.embeddings.position_embedding.weight",
                            "ln_pre": "vision_model.pre_layrnorm",
                            "ln_post": "vision_model.post_layernorm",
                            "proj": "visual_projection"})


def clip_openai_rule(path: tuple[str, ...]) -> Rule:
    """OpenAI ``clip`` names (``visual.*``); ``visual.proj`` is stored ``[width, embed]``."""
    if path[0] == "encoder":
        table = {("norm1",): "ln_1", ("norm2",): "ln_2", ("attn", "out"): "attn.out_proj",
                 ("mlp", "fc1"): "mlp.c_fc", ("mlp", "fc2"): "mlp.c_proj"}
        return _block_rule(path, "visual.transformer.resblocks.", table, "attn.in_proj")
    if path == ("proj", "kernel"):
        return "visual.proj", "copy", None
    return _top_rule(path, {"patch_embed": "visual.conv1", "cls_token": "visual.class_embedding",
                            "pos_embed": "visual.positional_embedding",
                            "ln_pre": "visual.ln_pre", "ln_post": "visual.ln_post"})


def expected_shapes(module, image_size: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax parameter path -> shape of ``module`` (computed without allocating)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    tree = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def _squeeze_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(s for s in shape if s != 1)


def convert(
    tensors: dict[str, np.ndarray],
    shapes: dict[tuple[str, ...], tuple[int, ...]],
    rule: Callable[[tuple[str, ...]], Rule],
    where: str,
    ignore: Callable[[str], bool],
) -> dict:
    """Flax params (float32) from ``tensors`` by ``rule``; every shape checked, leftovers named.

    Args:
      tensors: the file's tensors by name.
      shapes: the module's parameter shapes (:func:`expected_shapes`).
      rule: Flax path -> (tensor name, how, part), one of the ``*_rule`` tables.
      where: the file, for messages.
      ignore: tensor names that may be left over (e.g. the CLIP text tower).
    """
    used: set[str] = set()
    flat = {}
    for path, shape in shapes.items():
        name, how, part = rule(path)
        if name not in tensors:
            raise InputError(f"{where}: tensor '{name}' (for {'/'.join(path)}) is missing.")
        t = np.asarray(tensors[name], np.float32)
        used.add(name)
        if part is not None:
            rows = t.shape[0] // 3
            t = t[part * rows : (part + 1) * rows]
        if how == "linear" and t.ndim == 2:
            t = t.T
        elif how == "conv" and t.ndim == 4:
            t = t.transpose(2, 3, 1, 0)
        if t.shape != shape and _squeeze_shape(t.shape) == _squeeze_shape(shape):
            t = t.reshape(shape)
        if t.shape != shape:
            got = tensors[name].shape
            raise InputError(
                f"{where}: tensor '{name}' has shape {got}, which does not fit {'/'.join(path)} "
                f"{shape}; the weights are of another model or size."
            )
        if not np.all(np.isfinite(t)):
            raise InputError(f"{where}: tensor '{name}' contains NaN or inf.")
        flat[path] = t
    extra = sorted(k for k in tensors if k not in used and not ignore(k))
    if extra:
        raise InputError(f"{where}: unexpected tensors {extra[:5]}; the weights are of another "
                         "model or size.")
    return flax.traverse_util.unflatten_dict(flat)


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a ``.safetensors``, ``.pth``/``.bin`` or TorchScript ``.pt`` file."""
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    raw = path.read_bytes()
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load

        try:
            return load(raw)
        except (SafetensorError, ValueError, TypeError) as e:
            raise InputError(f"{path}: unreadable safetensors file ({e}).") from None
    try:
        tensors = read_torch_file(raw, str(path))
    except zipfile.BadZipFile as e:
        raise InputError(f"{path}: corrupt archive ({e}).") from None
    # A whole-model pickle (Dinov2ForImageClassification, TorchScript CLIP) nests the state.
    return {re.sub(r"^(model\.|module\.|state_dict\.)", "", k): v for k, v in tensors.items()}


def _strip(tensors: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """Names without ``prefix`` when every tensor carries it (``dinov2.`` in HF task models)."""
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k.removeprefix(prefix): v for k, v in tensors.items()}
    return tensors


def _width_depth(tensors: dict[str, np.ndarray], width_key: str, block: str) -> tuple[int, int]:
    width = int(np.prod(tensors[width_key].shape))
    depth = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(block, k)))
    return width, depth


def dinov2_arch_of(tensors: dict[str, np.ndarray], where: str) -> tuple[str, str]:
    """``(arch, format)`` of DINOv2 tensors, format ``"hub"`` or ``"hf"``."""
    if "cls_token" in tensors:
        fmt, cls, block, reg = "hub", "cls_token", r"blocks\.(\d+)\.", "register_tokens"
    elif "embeddings.cls_token" in tensors:
        fmt, cls, block, reg = ("hf", "embeddings.cls_token", r"encoder\.layer\.(\d+)\.",
                                "embeddings.register_tokens")
    else:
        raise InputError(f"{where}: neither torch hub nor transformers DINOv2 weights "
                         "(no 'cls_token' / 'embeddings.cls_token').")
    width, depth = _width_depth(tensors, cls, block)
    registers = tensors[reg].shape[1] if reg in tensors else 0
    for name, a in dinov2_lib.ARCHS.items():
        if (a.width, a.depth, a.registers) == (width, depth, registers):
            return name, fmt
    raise InputError(f"{where}: a ViT of width {width}, depth {depth}, {registers} registers is "
                     f"none of the released DINOv2 models {sorted(dinov2_lib.ARCHS)}.")


def clip_arch_of(tensors: dict[str, np.ndarray], where: str) -> tuple[str, str]:
    """``(arch, format)`` of CLIP tensors, format ``"openai"`` or ``"hf"``."""
    if "visual.class_embedding" in tensors:
        fmt, cls, block, conv = ("openai", "visual.class_embedding",
                                 r"visual\.transformer\.resblocks\.(\d+)\.", "visual.conv1.weight")
        pos = "visual.positional_embedding"
    elif "vision_model.embeddings.class_embedding" in tensors:
        fmt, cls, block = ("hf", "vision_model.embeddings.class_embedding",
                           r"vision_model\.encoder\.layers\.(\d+)\.")
        conv = "vision_model.embeddings.patch_embedding.weight"
        pos = "vision_model.embeddings.position_embedding.weight"
    else:
        raise InputError(f"{where}: neither OpenAI nor transformers CLIP weights (no "
                         "'visual.class_embedding' / 'vision_model.embeddings.class_embedding').")
    width, depth = _width_depth(tensors, cls, block)
    patch = tensors[conv].shape[-1]
    grid = round((tensors[pos].shape[-2] - 1) ** 0.5)
    for name, a in clip_lib.ARCHS.items():
        if (a.width, a.depth, a.patch, a.image_size) == (width, depth, patch, grid * patch):
            return name, fmt
    raise InputError(f"{where}: a ViT of width {width}, depth {depth}, patch {patch}, input "
                     f"{grid * patch} is none of the released CLIP towers "
                     f"{sorted(clip_lib.ARCHS)}.")


def dinov2_from_tensors(
    tensors: dict[str, np.ndarray], where: str, module: dinov2_lib.DINOv2 | None = None
) -> tuple[dinov2_lib.DINOv2, dict]:
    """``(module, params)`` from DINOv2 tensors of either format.

    Args:
      tensors: by name, as in the file.
      where: the file, for messages.
      module: the module to fill (default the released architecture the
        tensors have, with torch hub's position-embedding resampling).
    """
    tensors = dinov2_hf_file_names(_strip(tensors, "dinov2."))
    arch, fmt = dinov2_arch_of(tensors, where) if module is None else (None, None)
    if module is None:
        module = dinov2_lib.model(arch)
    else:
        fmt = "hub" if "cls_token" in tensors else "hf"
    rule = dinov2_hub_rule if fmt == "hub" else dinov2_hf_rule
    shapes = expected_shapes(module, dinov2_lib.PATCH * 2)
    params = convert(tensors, shapes, rule, where, lambda k: k.endswith("mask_token"))
    return module, params


def clip_from_tensors(
    tensors: dict[str, np.ndarray], where: str, module: clip_lib.CLIPVision | None = None
) -> tuple[clip_lib.CLIPVision, dict]:
    """``(module, params)`` from CLIP tensors of either format (the text tower is ignored).

    Args:
      tensors: by name, as in the file.
      where: the file, for messages.
      module: the module to fill (default the released architecture the tensors have).
    """
    if module is None:
        arch, fmt = clip_arch_of(tensors, where)
        module = clip_lib.model(arch)
    else:
        fmt = "openai" if "visual.class_embedding" in tensors else "hf"
    if fmt == "openai":
        rule, ignore = clip_openai_rule, lambda k: not k.startswith("visual.")
    else:
        rule = clip_hf_rule
        ignore = lambda k: (k.startswith(("text_model.", "text_projection.")) or
                            k in ("logit_scale", "vision_model.embeddings.position_ids"))
    shapes = expected_shapes(module, module.image_size)
    return module, convert(tensors, shapes, rule, where, ignore)



def _cached(kind: str, arch: str, module, size: int, path: Path,
            convert_file: Callable[[dict], tuple[str, dict]]) -> tuple[dict, str]:
    """``(params, sha256 prefix)`` of ``path`` for ``module``, converted once and cached.

    ``convert_file(tensors)`` returns the architecture the tensors have and the params.
    """
    digest = sha256(path)[:16]
    cache = cache_dir() / "encoders" / f"{kind}-{arch}-{digest}.npz"
    if cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as f:
                flat = {tuple(k.split("/")): f[k] for k in f.files}
            if {k: v.shape for k, v in flat.items()} == expected_shapes(module, size):
                return flax.traverse_util.unflatten_dict(flat), digest
        except (OSError, ValueError, zipfile.BadZipFile, EOFError):
            pass  # unreadable cache: rebuilt from the source file
    found, params = convert_file(read_tensors(path))
    if found != arch:
        raise InputError(f"{path}: holds {kind} {found} weights, not the requested {arch}.")
    flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
    with open_atomic(cache) as f:  # a reader never sees a half-written cache file
        np.savez(f, **flat)
    return params, digest


def _find(env: str, candidates: list[Path], missing: str) -> Path:
    if os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    for path in candidates:
        if path.is_file():
            return path
    raise InputError(missing)


def load_dinov2(
    source: str | os.PathLike | None = None, arch: str = "vitl14"
) -> tuple[dinov2_lib.DINOv2, dict, str]:
    """The DINOv2 module, its variables and an identity string for reports.

    Args:
      source: a weight file (torch hub ``.pth``; ``transformers``
        ``model.safetensors`` / ``pytorch_model.bin``) or a folder holding one.
        ``None`` takes ``$JAXGEN_DINOV2_WEIGHTS``, else torch hub's file for
        ``arch`` in ``$JAXGEN_CACHE``.
      arch: the architecture the weights must have (:data:`jaxgen.encoders.dinov2.ARCHS`).

    Returns:
      ``(module, {"params": ...}, "dinov2:<arch>:<sha256 prefix>")``; the
      module resamples position embeddings as torch hub does.

    Raises:
      InputError: no file (the message says which to get and where to put
        it), an unreadable one, or weights of another model or size.
    """
    if arch not in dinov2_lib.ARCHS:
        raise InputError(f"unknown DINOv2 architecture {arch!r}; choose from "
                         f"{sorted(dinov2_lib.ARCHS)}.")
    base, reg = arch.removesuffix("_reg"), "_reg4" if arch.endswith("_reg") else ""
    hub_file = f"dinov2_{base}{reg}_pretrain.pth"
    path = Path(source).expanduser() if source is not None else _find(
        "JAXGEN_DINOV2_WEIGHTS", [cache_dir() / hub_file],
        f"no DINOv2 {arch} weights: download {DINOV2_URL.format(arch=base, reg=reg)} to "
        f"{cache_dir() / hub_file}, or set JAXGEN_DINOV2_WEIGHTS to that file or to the "
        f"model.safetensors of {DINOV2_HF.get(base, 'facebook/dinov2-*')} (Hugging Face).",
    )
    path = _in_folder(path, ("model.safetensors", "pytorch_model.bin"))
    module = dinov2_lib.model(arch)

    def convert_file(tensors):
        found = dinov2_arch_of(dinov2_hf_file_names(_strip(tensors, "dinov2.")), str(path))[0]
        return found, dinov2_from_tensors(tensors, str(path), module)[1] if found == arch else {}

    params, digest = _cached("dinov2", arch, module, dinov2_lib.PATCH * 2, path, convert_file)
    return module, {"params": params}, f"dinov2:{arch}:{digest}"


def load_clip(
    source: str | os.PathLike | None = None, arch: str = "vitl14_336"
) -> tuple[clip_lib.CLIPVision, dict, str]:
    """The CLIP image tower, its variables and an identity string for reports.

    Args:
      source: a weight file (OpenAI's ``.pt``; ``transformers``
        ``model.safetensors`` / ``pytorch_model.bin``) or a folder holding
        one. ``None`` takes ``$JAXGEN_CLIP_WEIGHTS``, else OpenAI's file for
        ``arch`` in ``$JAXGEN_CACHE``.
      arch: the architecture the weights must have (:data:`jaxgen.encoders.clip.ARCHS`).

    Returns:
      ``(module, {"params": ...}, "clip:<arch>:<sha256 prefix>")``.

    Raises:
      InputError: as :func:`load_dinov2`.
    """
    if arch not in clip_lib.ARCHS:
        raise InputError(f"unknown CLIP architecture {arch!r}; choose from "
                         f"{sorted(clip_lib.ARCHS)}.")
    path = Path(source).expanduser() if source is not None else _find(
        "JAXGEN_CLIP_WEIGHTS", [cache_dir() / CLIP_FILES[arch]],
        f"no CLIP {arch} weights: put OpenAI's {CLIP_FILES[arch]} (the `clip` package's "
        f"download) at {cache_dir() / CLIP_FILES[arch]}, or set JAXGEN_CLIP_WEIGHTS to it or to "
        f"the model.safetensors of {CLIP_HF[arch]} (Hugging Face).",
    )
    path = _in_folder(path, ("model.safetensors", "pytorch_model.bin"))
    module = clip_lib.model(arch)

    def convert_file(tensors):
        found = clip_arch_of(tensors, str(path))[0]
        return found, clip_from_tensors(tensors, str(path), module)[1] if found == arch else {}

    params, digest = _cached("clip", arch, module, module.image_size, path, convert_file)
    return module, {"params": params}, f"clip:{arch}:{digest}"


def _in_folder(path: Path, names: tuple[str, ...]) -> Path:
    if not path.is_dir():
        return path
    for name in names:
        if (path / name).is_file():
            return path / name
    raise InputError(f"{path}: a folder without {' or '.join(names)}.")
