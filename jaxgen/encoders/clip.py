"""OpenAI CLIP image towers (Radford et al. 2021): ViT-B/32, ViT-L/14, ViT-L/14-336.

The network of OpenAI's ``clip`` package and ``transformers``'
``CLIPVisionModelWithProjection``: patches (no bias), a CLS token, learnt
position embeddings (no resampling: the input size is fixed), a LayerNorm
before the blocks (``ln_pre``), pre-LN blocks with quick-GELU MLPs, a
LayerNorm on the CLS token (``ln_post``) and a linear projection without
bias. :class:`CLIPVision` returns the image embedding divided by its L2 norm
(``embedding``, what CMMD uses) and the projection before normalisation
(``projected``, ``transformers``' ``image_embeds``). LayerNorm eps 1e-5.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxgen.encoders.preprocess import (
    CLIP_MEAN,
    CLIP_STD,
    crop_square_resize,
    normalize,
    resize_shortest_edge_crop,
)
from jaxgen.encoders.vit import HIGHEST, Encoder, patchify


class CLIPVision(nn.Module):
    """CLIP image tower on normalised float NHWC ``image_size`` images (:func:`preprocess_hf`).

    Attributes:
      width, depth, heads, patch, image_size, embed_dim: the architecture (:data:`ARCHS`).
      mlp_hidden: the MLP's hidden size (``4 * width`` in every released model).
      dtype: compute dtype of the matrix products.
    """

    width: int
    depth: int
    heads: int
    patch: int
    image_size: int
    embed_dim: int
    mlp_hidden: int | None = None
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        """``{"embedding": [N, embed_dim] (unit norm), "projected": [N, embed_dim]}``."""
        n, h, w, _ = x.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"CLIP input must be {self.image_size}x{self.image_size}, got {h}x{w}")
        d = self.width
        grid = self.image_size // self.patch
        tokens = patchify(x.astype(self.dtype), self.patch, d, False, self.dtype)
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, d), jnp.float32)
        pos = self.param("pos_embed", nn.initializers.zeros, (1, 1 + grid**2, d), jnp.float32)
        tokens = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)), tokens], axis=1) + pos
        tokens = nn.LayerNorm(1e-5, dtype=jnp.float32, name="ln_pre")(tokens)
        tokens = Encoder(self.depth, self.heads, self.mlp_hidden or 4 * d, "quick_gelu", False,
                         1e-5, self.dtype, name="encoder")(tokens)
        pooled = nn.LayerNorm(1e-5, dtype=jnp.float32, name="ln_post")(tokens[:, 0])
        projected = nn.Dense(self.embed_dim, use_bias=False, dtype=self.dtype, precision=HIGHEST,
                             name="proj")(pooled).astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(projected), axis=-1, keepdims=True))
        return {"embedding": projected / norm, "projected": projected}


ARCHS = {
    "vitb32": CLIPVision(768, 12, 12, 32, 224, 512),
    "vitl14": CLIPVision(1024, 24, 16, 14, 224, 768),
    "vitl14_336": CLIPVision(1024, 24, 16, 14, 336, 768),
}
"""The released image towers (float32 modules, unbound), by name."""


def model(arch: str, *, dtype: jnp.dtype = jnp.float32) -> CLIPVision:
    """The module of a released image tower: ``arch`` in :data:`ARCHS`."""
    if arch not in ARCHS:
        raise ValueError(f"unknown CLIP architecture {arch!r}; choose from {sorted(ARCHS)}")
    return ARCHS[arch].clone(dtype=dtype)


def preprocess_hf(images: jax.Array, size: int) -> jax.Array:
    """``transformers``' ``CLIPImageProcessor``: shortest edge ``size`` (PIL bicubic), center
    crop ``size``, CLIP mean/std. uint8 NHWC in, float32 [N, size, size, 3] out."""
    return normalize(resize_shortest_edge_crop(images, size, size), CLIP_MEAN, CLIP_STD)


def preprocess_cmmd(images: jax.Array, size: int = 336) -> jax.Array:
    """google-research ``cmmd``'s input: centered square crop, PIL bicubic to ``size``, CLIP
    mean/std (its later ``jax.image.resize`` to the same size is the identity)."""
    return normalize(crop_square_resize(images, size), CLIP_MEAN, CLIP_STD)
