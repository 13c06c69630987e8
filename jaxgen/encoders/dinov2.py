"""DINOv2 image towers (Oquab et al. 2024), ViT-S/B/L/g-14, with or without registers.

The network of ``facebookresearch/dinov2`` (torch hub) and ``transformers``'
``Dinov2Model`` / ``Dinov2WithRegistersModel``: 14x14 patches, a CLS token,
optionally 4 register tokens (Darcet et al. 2024) placed after the CLS token
and carrying no position embedding, pre-LN blocks with layer scale, a final
LayerNorm (eps 1e-6). The outputs are the normed CLS token (``cls``, what
FD-DINOv2 uses: the hub's ``x_norm_clstoken``) and the normed patch tokens
(``patch``, REPA's target: the hub's ``x_norm_patchtokens``), row-major over
the patch grid.

Position embeddings are learnt on a 37x37 grid (518 px) and resampled to the
input's grid with torch's bicubic ``interpolate``, as the references do:

* torch hub, no registers (the FD-DINOv2 network): ``scale_factor = (g +
  0.1) / 37`` without antialias (``interpolate_offset = 0.1``);
* torch hub with registers, and ``transformers`` ``Dinov2WithRegistersModel``:
  ``size = g`` with antialias;
* ``transformers`` >= 5 ``Dinov2Model``: ``size = g`` without antialias.

The embeddings are used as learnt when the grid is 37x37 and the image square.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.encoders.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    normalize,
    resize_shortest_edge_crop,
    resize_square,
    rgb,
)
from jaxgen.encoders.resize import torch_bicubic_matrix
from jaxgen.encoders.vit import HIGHEST, Encoder, patchify, swiglu_hidden

PATCH = 14
POS_GRID = 37  # position embeddings learnt at 518 x 518
INPUT_SIZE = 224


@dataclasses.dataclass(frozen=True)
class Arch:
    """Hyper-parameters of one released DINOv2 model."""

    width: int
    depth: int
    heads: int
    mlp: str = "gelu"
    registers: int = 0

    @property
    def mlp_hidden(self) -> int:
        return swiglu_hidden(self.width) if self.mlp == "swiglu" else 4 * self.width


_BASE = {
    "vits14": Arch(384, 12, 6),
    "vitb14": Arch(768, 12, 12),
    "vitl14": Arch(1024, 24, 16),
    "vitg14": Arch(1536, 40, 24, "swiglu"),
}
# torch hub's names: dinov2_vitl14, dinov2_vitl14_reg, ...
ARCHS = {**_BASE, **{f"{k}_reg": dataclasses.replace(a, registers=4) for k, a in _BASE.items()}}


class DINOv2(nn.Module):
    """DINOv2 ViT on normalised float NHWC images (:func:`preprocess_dgm_eval`, ``_hf``).

    Attributes:
      width, depth, heads, mlp, registers: the architecture (:data:`ARCHS`).
      mlp_hidden: the MLP's hidden size (``4 * width``; SwiGLU's for ViT-g).
      pos_offset: torch hub's ``interpolate_offset`` (0.1 without registers,
        else 0); 0 reproduces ``transformers``.
      pos_antialias: torch hub's ``interpolate_antialias`` (True with registers).
      dtype: compute dtype of the matrix products.
    """

    width: int
    depth: int
    heads: int
    mlp: str = "gelu"
    registers: int = 0
    mlp_hidden: int | None = None
    pos_offset: float = 0.1
    pos_antialias: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """``{"cls": [N, width], "patch": [N, (H // 14) * (W // 14), width]}``."""
        n, h, w, _ = x.shape
        d = self.width
        tokens = patchify(x.astype(self.dtype), PATCH, d, True, self.dtype)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d), jnp.float32)
        pos = self.param("pos_embed", nn.initializers.zeros, (1, 1 + POS_GRID**2, d), jnp.float32)
        pos = self._resample(pos, h, w)
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)), tokens], axis=1) + pos
        if self.registers:
            reg = self.param("register_tokens", nn.initializers.zeros,
                             (1, self.registers, d), jnp.float32)
            tokens = jnp.concatenate(
                [tokens[:, :1], jnp.broadcast_to(reg, (n, self.registers, d)), tokens[:, 1:]], 1
            )
        hidden = self.mlp_hidden or (swiglu_hidden(d) if self.mlp == "swiglu" else 4 * d)
        tokens = Encoder(self.depth, self.heads, hidden, self.mlp, True, 1e-6, self.dtype,
                         name="encoder")(tokens)
        tokens = nn.LayerNorm(1e-6, dtype=jnp.float32, name="norm")(tokens)
        return {"cls": tokens[:, 0], "patch": tokens[:, 1 + self.registers :]}

    def _resample(self, pos: jax.Array, h: int, w: int) -> jax.Array:
        """Position embeddings for an ``h x w`` image (module docstring)."""
        gh, gw = h // PATCH, w // PATCH
        if (gh, gw) == (POS_GRID, POS_GRID) and h == w:
            return pos
        if self.pos_offset and not self.pos_antialias:
            factor = lambda g: (g + self.pos_offset) / POS_GRID
            mh, mw = (torch_bicubic_matrix(POS_GRID, g, scale_factor=factor(g)) for g in (gh, gw))
        else:
            mh, mw = (torch_bicubic_matrix(POS_GRID, g, antialias=self.pos_antialias)
                      for g in (gh, gw))
        grid = pos[0, 1:].reshape(POS_GRID, POS_GRID, -1)
        grid = jnp.einsum("ia,jb,abd->ijd", jnp.asarray(mh, jnp.float32),
                          jnp.asarray(mw, jnp.float32), grid, precision=HIGHEST)
        return jnp.concatenate([pos[:, :1], grid.reshape(1, gh * gw, -1)], axis=1)


def model(arch: str, *, hub: bool = True, dtype: jnp.dtype = jnp.float32) -> DINOv2:
    """The module of a released model: ``arch`` in :data:`ARCHS` (``"vitl14"``, ``"vitb14_reg"``).

    Args:
      arch: architecture name, torch hub's without the ``dinov2_`` prefix.
      hub: resample position embeddings as torch hub does (else as
        ``transformers`` >= 5 does; they differ only without registers).
      dtype: compute dtype.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown DINOv2 architecture {arch!r}; choose from {sorted(ARCHS)}")
    a = ARCHS[arch]
    offset = 0.1 if hub and not a.registers else 0.0
    return DINOv2(a.width, a.depth, a.heads, a.mlp, a.registers, a.mlp_hidden, offset,
                  bool(a.registers), dtype)


def preprocess_hf(images: jax.Array) -> jax.Array:
    """``transformers``' DINOv2 processor (``BitImageProcessor``): shortest edge 256 (PIL
    bicubic), center crop 224, ImageNet mean/std. uint8 NHWC in, float32 [N, 224, 224, 3] out."""
    return normalize(resize_shortest_edge_crop(images, 256, INPUT_SIZE), IMAGENET_MEAN,
                     IMAGENET_STD)


def preprocess_dgm_eval(images: jax.Array) -> jax.Array:
    """FD-DINOv2's input (dgm-eval; EDM2's ``resize_mode="pil"``): PIL bicubic to 224 x 224,
    ImageNet mean/std. uint8 NHWC in, float32 [N, 224, 224, 3] out."""
    return normalize(resize_square(images, INPUT_SIZE), IMAGENET_MEAN, IMAGENET_STD)


def preprocess_repa(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """REPA's encoder input (Yu et al. 2025, ``preprocess_raw_image``): ``x / 255``, ImageNet
    mean/std, then torch's bicubic ``interpolate`` (no antialias) to ``size x size``.

    uint8 NHWC in, float32 [N, size, size, 3] out. REPA runs torch hub's model with its
    position embeddings resampled once by timm (bicubic, antialiased): use the module with
    ``pos_offset=0.0, pos_antialias=True``.
    """
    x = normalize(rgb(images), IMAGENET_MEAN, IMAGENET_STD)
    mh, mw = (jnp.asarray(torch_bicubic_matrix(n, size), jnp.float32) for n in x.shape[1:3])
    return jnp.einsum("ih,jw,nhwc->nijc", mh, mw, x, precision=HIGHEST)
