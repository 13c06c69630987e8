"""Decoding image files to uint8 arrays, the one center-crop/resize rule and the one padding.

Mode rule (what a decoded file becomes), the same for every folder source:

- gray modes stay one channel: ``L``; ``1`` (bilevel) maps to 0/255; ``LA``
  drops its alpha; 16-bit integer gray (``I;16*``, and ``I`` clipped to
  [0, 65535]) keeps its high byte, ``v >> 8``, as libpng's ``strip_16`` and
  Pillow's own reading of 16-bit RGB PNGs do;
- every other mode becomes RGB through Pillow's ``convert("RGB")``: alpha
  (``RGBA``, ``PA``, palette transparency) is dropped and the stored colour
  kept, as pytorch-fid and clean-fid do; ``P`` expands its palette; ``CMYK``,
  ``YCbCr``, ``LAB`` and ``HSV`` are converted by Pillow.

A source whose files are all gray has one channel; one that mixes gray and
colour files repeats gray to three channels. EXIF orientation tags are not
applied (pixels are read as stored, as pytorch-fid and clean-fid read them).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from jaxgen.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N"})

# Named resampling filters for `center_crop_resize` (Pillow's antialiased ones).
RESIZE_METHODS = {
    "nearest": Image.Resampling.NEAREST,
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "hamming": Image.Resampling.HAMMING,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}

ADM_CROP = "adm"
"""The method name of :func:`adm_center_crop` (ADM/DiT's preprocessing), accepted wherever a
key of :data:`RESIZE_METHODS` is."""


def check_resize_method(method: str) -> None:
    """Raise :class:`InputError` unless ``method`` is a key of :data:`RESIZE_METHODS` or
    :data:`ADM_CROP`."""
    if method not in RESIZE_METHODS and method != ADM_CROP:
        raise InputError(
            f"Unknown resize method {method!r}; use one of {', '.join(RESIZE_METHODS)} or "
            f"{ADM_CROP}."
        )


def pil_to_array(image: Image.Image, channels: int) -> np.ndarray:
    """A decoded Pillow image as uint8 ``[H, W, channels]`` by the module's mode rule."""
    if image.mode.startswith("I"):
        a = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
    elif image.mode in ("L", "RGB"):
        a = np.asarray(image)
    elif image.mode in GRAY_MODES:
        a = np.asarray(image.convert("L"))
    else:
        a = np.asarray(image.convert("RGB"))
    if a.ndim == 2:
        a = a[:, :, None]
    if a.shape[2] != channels:
        a = np.repeat(a, channels, axis=2)
    return a


def center_crop_resize(image: np.ndarray, resolution: int, method: str = "lanczos") -> np.ndarray:
    """Crop the centered square of side ``min(H, W)``, then resize it to ``resolution``.

    This is EDM's ``dataset_tool.py --transform=center-crop`` rule. A square
    image of the right size is returned unchanged. ``method`` :data:`ADM_CROP`
    is ADM/DiT's rule instead (:func:`adm_center_crop`: resize, then crop).

    Args:
      image: uint8 ``[H, W, C]`` with ``C`` in {1, 3}.
      resolution: side of the square output.
      method: a key of :data:`RESIZE_METHODS`, or :data:`ADM_CROP`.

    Returns:
      uint8 ``[resolution, resolution, C]``.
    """
    h, w, c = image.shape
    if h == w == resolution:
        return image
    if method == ADM_CROP:
        return adm_center_crop(image, resolution)
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    square = image[top : top + s, left : left + s]
    pil = Image.fromarray(square[:, :, 0] if c == 1 else square)
    out = np.asarray(pil.resize((resolution, resolution), RESIZE_METHODS[method]))
    return out.reshape(resolution, resolution, c)


def adm_center_crop(image: np.ndarray, resolution: int) -> np.ndarray:
    """ADM's ``center_crop_arr`` (guided-diffusion ``image_datasets.py``, DiT's ``train.py``).

    While the short side is at least ``2 * resolution`` the image is halved with a
    BOX filter; then it is resized with BICUBIC so that its short side is
    ``resolution`` (the long side rounded), and the centered square is cropped.

    Args:
      image: uint8 ``[H, W, C]`` with ``C`` in {1, 3}.
      resolution: side of the square output.

    Returns:
      uint8 ``[resolution, resolution, C]``.
    """
    c = image.shape[2]
    pil = Image.fromarray(image[:, :, 0] if c == 1 else image)
    while min(pil.size) >= 2 * resolution:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.Resampling.BOX)
    scale = resolution / min(pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(pil).reshape(pil.size[1], pil.size[0], c)
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top : top + resolution, left : left + resolution]


def decode_image(
    file: Path | bytes, channels: int, resolution: int | None, method: str, name: str, fix: str
) -> np.ndarray:
    """Decode an image file (path or encoded bytes) by the mode rule, then crop/resize it.

    Args:
      file: the file's path or its encoded bytes.
      channels: 1 or 3, the source's channel count (gray is repeated to 3).
      resolution: center-crop and resize to this square size (``None``: as is).
      method: a key of :data:`RESIZE_METHODS`.
      name: what to call the image in messages.
      fix: what to do about an undecodable file, for the message.

    Raises:
      InputError: when Pillow cannot decode the file.
    """
    try:
        with Image.open(io.BytesIO(file) if isinstance(file, bytes) else file) as im:
            image = pil_to_array(im, channels)
    except Exception as e:  # Pillow raises many types for bad files; any means a bad file.
        raise InputError(f"{name}: cannot decode image ({type(e).__name__}: {e}); {fix}.") from e
    return image if resolution is None else center_crop_resize(image, resolution, method)


def pad_images(images: np.ndarray, side: int | None) -> np.ndarray:
    """Zero-pad uint8 NHWC ``images`` symmetrically to ``side`` x ``side`` (``None``: as is).

    The extra pixel of an odd margin goes to the bottom/right (e.g. 28 -> 32
    pads 2 on each side).
    """
    if side is None:
        return images
    h, w = images.shape[1:3]
    top, left = (side - h) // 2, (side - w) // 2
    return np.pad(images, ((0, 0), (top, side - h - top), (left, side - w - left), (0, 0)))
