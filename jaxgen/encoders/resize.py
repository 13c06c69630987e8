"""The image resizes of the reference preprocessors, reproduced exactly in JAX.

Three kernels, each as the reference computes it:

* PIL's bicubic ``Image.resize`` (``libImaging/Resample.c``): a separable,
  antialiased filter (Keys cubic, ``a = -0.5``, support widened by the
  downscale factor), in two passes. On uint8 images PIL works in fixed point
  (22 fractional bits) and rounds the intermediate image to uint8;
  :func:`resize_pil_uint8` does the same integer arithmetic, so its output is
  bit-identical to PIL's. The order of the passes matters then: Pillow >= 13
  (python-pillow/Pillow#9549) runs the vertical pass first when the height
  loses more than twice as many pixels as the width (:func:`vertical_first`),
  earlier versions always run the horizontal one first. We follow Pillow 13;
  the two differ by a few levels on some pixels of such images only, never
  for square-to-square resizes. On float images (mode ``"F"``, clean-fid) PIL sums
  in double and stores float32; :func:`resize_pil_float` does the sums in
  float32 at full precision (differences ~1e-5 of a 0-255 pixel).
* torch's ``F.interpolate(mode="bicubic", align_corners=False)`` (Keys cubic,
  ``a = -0.75``, border-clamped taps), with or without ``antialias`` (the
  antialiased kernel is PIL's filter in float): :func:`torch_bicubic_matrix`,
  used to interpolate ViT position embeddings as DINOv2 does.

Each 1-D resize is a matrix ``[out, in]`` computed in NumPy float64 from the
reference's formulas; the images never leave the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PIL_PRECISION_BITS = 22  # Resample.c: 32 - 8 (pixel) - 2 (headroom for negative lobes)


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel (Keys 1981, eq. 15) with parameter ``a``."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """PIL's bicubic resampling weights ``[out, in]`` (``precompute_coeffs`` in Resample.c).

    The same weights as torch's ``interpolate(..., mode="bicubic", antialias=True)``.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale  # bicubic support 2, widened when downscaling
    m = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = (i + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)  # int() truncates toward zero, as C does
        hi = min(int(center + support + 0.5), in_size)
        w = _keys_cubic((np.arange(lo, hi) - center + 0.5) / filterscale, -0.5)
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0.0 else w
    return m


def torch_bicubic_matrix(
    in_size: int,
    out_size: int,
    scale_factor: float | None = None,
    antialias: bool = False,
) -> np.ndarray:
    """Weights ``[out, in]`` of torch's ``F.interpolate(mode="bicubic", align_corners=False)``.

    Args:
      in_size, out_size: lengths along the axis.
      scale_factor: when the caller passed ``scale_factor`` to ``interpolate``,
        torch maps coordinates with ``1 / scale_factor`` instead of
        ``in / out`` (DINOv2's position-embedding interpolation relies on it).
      antialias: torch's antialiased kernel, which is PIL's filter.
    """
    if antialias:
        if scale_factor is not None:
            raise ValueError("antialias with an explicit scale_factor is not needed here")
        return pil_bicubic_matrix(in_size, out_size)
    scale = 1.0 / scale_factor if scale_factor is not None else in_size / out_size
    src = scale * (np.arange(out_size) + 0.5) - 0.5  # not clamped for cubic
    base = np.floor(src)
    t = src - base
    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    for k in range(4):  # taps base-1 .. base+2, clamped to the border
        idx = np.clip(base.astype(np.int64) - 1 + k, 0, in_size - 1)
        np.add.at(m, (rows, idx), _keys_cubic(t + 1.0 - k, -0.75))
    return m


def _fixed_point_taps(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per output pixel, the input indices and PIL's fixed-point coefficients of its taps.

    ``normalize_coeffs_8bpc``: round half away from zero of ``w * 2**22``.
    """
    nonzero = [np.flatnonzero(row) for row in m]
    width = max(len(nz) for nz in nonzero)
    idx = np.zeros((m.shape[0], width), np.int32)
    coef = np.zeros((m.shape[0], width), np.int32)
    for i, nz in enumerate(nonzero):
        w = m[i, nz] * (1 << PIL_PRECISION_BITS)
        idx[i, : len(nz)] = nz
        coef[i, : len(nz)] = np.trunc(w + np.where(w < 0, -0.5, 0.5)).astype(np.int32)
    return idx, coef


def _pass_uint8(x: jax.Array, axis: int, out_size: int) -> jax.Array:
    """One PIL 8-bit pass along ``axis`` of int32 pixels: ``clip8(2**21 + sum(p * k))``."""
    in_size = x.shape[axis]
    if in_size == out_size:
        return x
    idx, coef = _fixed_point_taps(pil_bicubic_matrix(in_size, out_size))
    shape = [1] * x.ndim
    shape[axis] = out_size
    acc = jnp.full((), 1 << (PIL_PRECISION_BITS - 1), jnp.int32)
    for t in range(idx.shape[1]):  # a few taps: int32 products, exact on every backend
        acc = acc + jnp.take(x, idx[:, t], axis=axis) * coef[:, t].reshape(shape)
    return jnp.clip(acc >> PIL_PRECISION_BITS, 0, 255)


def vertical_first(in_size: tuple[int, int], out_size: tuple[int, int]) -> bool:
    """Whether Pillow >= 13 resamples rows before columns (``(height, width)`` sizes).

    Found by comparing Pillow 13.0's output with both orders over a grid of sizes.
    """
    (h_in, w_in), (h, w) = in_size, out_size
    return h < h_in and w != w_in and h_in - h > 2 * (w_in - w)


def resize_pil_uint8(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PIL ``Image.resize(size, BICUBIC)`` of uint8 NHWC images, bit-exact.

    Args:
      images: uint8 ``[N, H, W, C]``.
      size: ``(height, width)`` of the output (note: PIL's own argument is (width, height)).

    Returns:
      uint8 ``[N, height, width, C]``.
    """
    x = images.astype(jnp.int32)
    passes = [(2, size[1]), (1, size[0])]  # the first pass rounds to a uint8 image
    for axis, n in passes[:: -1 if vertical_first(images.shape[1:3], size) else 1]:
        x = _pass_uint8(x, axis, n)
    return x.astype(jnp.uint8)


def resize_pil_float(images: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PIL ``Image.resize(size, BICUBIC)`` of float (mode ``"F"``) NHWC images.

    Args:
      images: float ``[N, H, W, C]`` (each channel is one PIL ``"F"`` image).
      size: ``(height, width)`` of the output.
    """
    x = images.astype(jnp.float32)
    passes = [(2, size[1]), (1, size[0])]
    for axis, n in passes[:: -1 if vertical_first(images.shape[1:3], size) else 1]:
        if x.shape[axis] != n:
            m = jnp.asarray(pil_bicubic_matrix(x.shape[axis], n), jnp.float32)
            x = jnp.moveaxis(jnp.tensordot(m, x, ((1,), (axis,)),
                                           precision=jax.lax.Precision.HIGHEST), 0, axis)
    return x
