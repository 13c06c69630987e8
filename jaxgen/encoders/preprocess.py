"""uint8 images -> encoder input, exactly as each reference pipeline prepares them.

Building blocks (all take uint8 NHWC, 1 or 3 channels, any size, and run under jit):

* :func:`resize_shortest_edge_crop`: ``transformers``' image processors
  (``BitImageProcessor`` for DINOv2, ``CLIPImageProcessor``): PIL bicubic
  resize so the shorter side is ``edge`` (the longer side ``int(edge * long /
  short)``), then a center crop with ``top = (H - crop) // 2``.
* :func:`resize_square`: EDM2 / dgm-eval's FD-DINOv2: PIL bicubic straight
  to ``size x size`` (the aspect ratio is not kept).
* :func:`crop_square_resize`: google-research ``cmmd``'s ``io_util``: the
  centered ``min(H, W)`` square, then PIL bicubic to ``size x size``.
* :func:`normalize`: ``(x / 255 - mean) / std`` per channel, in float32.

The resizes are :func:`jaxgen.encoders.resize.resize_pil_uint8`, bit-exact with
PIL, so these equal the references' float inputs up to float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen.encoders.resize import resize_pil_uint8

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def rgb(images: jax.Array) -> jax.Array:
    """Grayscale repeated to 3 channels (PIL's ``convert("RGB")``); RGB unchanged."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"expected [N, H, W, 1 or 3] images, got shape {images.shape}")
    return jnp.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def resize_shortest_edge_crop(images: jax.Array, edge: int, crop: int) -> jax.Array:
    """``transformers``' ``resize(shortest_edge=edge)`` then ``center_crop(crop, crop)``, uint8."""
    _, h, w, _ = images.shape
    short, long = min(h, w), max(h, w)
    long_new = int(edge * long / short)  # transformers' get_resize_output_image_size
    size = (long_new, edge) if h > w else (edge, long_new)
    x = resize_pil_uint8(rgb(images), size)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return x[:, top : top + crop, left : left + crop]


def resize_square(images: jax.Array, size: int) -> jax.Array:
    """PIL bicubic resize to ``size x size`` (EDM2 / dgm-eval's DINOv2 input), uint8."""
    return resize_pil_uint8(rgb(images), (size, size))


def crop_square_resize(images: jax.Array, size: int) -> jax.Array:
    """``cmmd``'s ``_center_crop_and_resize``: centered square crop, then PIL bicubic, uint8."""
    _, h, w, _ = images.shape
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_pil_uint8(rgb(images[:, top : top + side, left : left + side]), (size, size))


def normalize(images: jax.Array, mean: tuple[float, ...], std: tuple[float, ...]) -> jax.Array:
    """``(x / 255 - mean) / std`` per channel, float32."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
