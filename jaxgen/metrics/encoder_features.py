"""The feature passes of FD-DINOv2, CMMD and clean-FID, as ``FeatureExtractor`` forwards.

Each is ``forward(module, variables, uint8 images) -> {name: [N, D]}`` for
:class:`jaxgen.metrics.features.FeatureExtractor`, so they share its batching,
padding and sharding:

* :func:`dinov2_forward`: FD-DINOv2 as EDM2 and dgm-eval compute it (Stein et
  al. 2023): DINOv2 ViT-L/14 (torch hub weights), PIL bicubic resize to
  224 x 224, ImageNet mean/std, the normed CLS token (``dinov2`` [N, 1024]).
* :func:`clip_forward`: CMMD's embeddings (google-research ``cmmd``): CLIP
  ViT-L/14-336, centered square crop + PIL bicubic to 336, CLIP mean/std,
  L2-normalised projection (``clip`` [N, 768]).
* :func:`clean_inception_forward`: clean-fid's "clean" mode (Parmar et al.
  2022): each channel resized to 299 x 299 by PIL bicubic on float32 (mode
  ``"F"``), clipped to [0, 255], then the same TF-FID Inception as FID.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.encoders.clip import preprocess_cmmd
from jaxgen.encoders.dinov2 import preprocess_dgm_eval
from jaxgen.encoders.preprocess import rgb
from jaxgen.encoders.resize import resize_pil_float
from jaxgen.metrics.inception import INPUT_SIZE


def dinov2_forward(module, variables: dict, images: jax.Array) -> dict[str, jax.Array]:
    """FD-DINOv2 features ``{"dinov2": [N, width]}`` of uint8 NHWC images."""
    return {"dinov2": module.apply(variables, preprocess_dgm_eval(images))["cls"]}


def clip_forward(module, variables: dict, images: jax.Array) -> dict[str, jax.Array]:
    """CMMD embeddings ``{"clip": [N, embed_dim]}`` (unit norm) of uint8 NHWC images."""
    out = module.apply(variables, preprocess_cmmd(images, module.image_size))
    return {"clip": out["embedding"]}


def preprocess_clean(images: jax.Array) -> jax.Array:
    """clean-fid's ``make_resizer("PIL", False, "bicubic", (299, 299))`` then ``(x - 128) / 128``.

    uint8 NHWC (1 or 3 channels) in, float32 [N, 299, 299, 3] out.
    """
    x = resize_pil_float(rgb(images).astype(jnp.float32), (INPUT_SIZE, INPUT_SIZE))
    return (jnp.clip(x, 0.0, 255.0) - 128.0) / 128.0


def clean_inception_forward(module, variables: dict, images: jax.Array) -> dict[str, jax.Array]:
    """clean-FID features ``{"clean_pool3": [N, 2048]}`` of uint8 NHWC images."""
    return {"clean_pool3": module.apply(variables, preprocess_clean(images))["pool3"]}
