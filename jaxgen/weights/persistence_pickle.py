"""Read NVlabs network pickles (EDM, EDM2 ``*.pkl``) as tensors, without torch or running code.

Those files are ``pickle.dump`` of a dict (``{"ema": net, "loss_fn": ..., "encoder": ...}``)
whose modules are ``torch_utils.persistence`` classes: each pickles as
``_reconstruct_persistent_obj(meta)``, where ``meta["module_src"]`` is the
*source code* of the class's module, which ``pickle.load`` compiles and runs,
and ``meta["state"]`` its ``__dict__``. Tensors inside are
``torch.storage._load_from_bytes(b)``, ``b`` a nested ``torch.save`` of one
storage.

Here a restricted unpickler maps ``_reconstruct_persistent_obj`` to an inert
record of ``meta["state"]`` (the source is kept as a string, never compiled),
``torch.nn.ModuleDict`` and ``dnnlib.util.EasyDict`` to plain holders, the
NumPy scalars of the encoder's settings to inert values, and builds tensors
with :mod:`jaxgen.weights.torch_pickle`; any other global is refused.
"""

from __future__ import annotations

import io
import pickle
import zipfile

import numpy as np

from jaxgen.errors import InputError
from jaxgen.weights.torch_pickle import (
    RestrictedUnpickler,
    Storage,
    Tensor,
    read_legacy,
    read_zip,
)


class _Inert:
    """A value this reader does not need (NumPy scalars, dtypes): accepts and ignores anything."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass


class _Module:
    """A torch module's ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, ...), inert."""

    def __init__(self, state=None, class_name: str = "") -> None:
        self.state, self.class_name = state if isinstance(state, dict) else {}, class_name

    def __setstate__(self, state) -> None:
        self.state = state if isinstance(state, dict) else {}


class _AttrDict(dict):
    """``dnnlib.util.EasyDict``: its items are what matters; attribute state is ignored."""

    def __setstate__(self, state) -> None:
        pass


def _reconstruct_persistent_obj(meta) -> _Module:
    if not isinstance(meta, dict):
        raise pickle.UnpicklingError("persistent object without its meta dict")
    return _Module(meta.get("state"), str(meta.get("class_name", "")))


def _storage_from_bytes(raw, where: str) -> Storage:
    if not isinstance(raw, bytes):
        raise pickle.UnpicklingError("storage record is not bytes")
    if raw[:4] == b"PK\x03\x04":
        storage = read_zip(zipfile.ZipFile(io.BytesIO(raw)), where)
    else:
        storage = read_legacy(raw, where)
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("storage record holds something other than a storage")
    return storage


_INERT = {
    ("numpy", "dtype"), ("numpy", "ndarray"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
}


class _PersistenceUnpickler(RestrictedUnpickler):
    def __init__(self, file: io.BytesIO, where: str) -> None:
        super().__init__(file, self._no_storage)
        self._where = where

    @staticmethod
    def _no_storage(*args):
        raise pickle.UnpicklingError("unexpected persistent storage id in a network pickle")

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch_utils.persistence", "_reconstruct_persistent_obj"):
            return _reconstruct_persistent_obj
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return lambda raw: _storage_from_bytes(raw, self._where)
        if (module, name) == ("dnnlib.util", "EasyDict"):
            return _AttrDict
        if module.startswith("torch.nn.modules."):
            return _Module  # e.g. ModuleDict: built empty, its state set by BUILD
        if (module, name) in _INERT:
            return _Inert
        return super().find_class(module, name)


def _module_tensors(module: _Module, prefix: str, out: dict[str, np.ndarray]) -> None:
    state = module.state
    skip = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if isinstance(value, Tensor) and name not in skip:
                out[prefix + name] = value.numpy()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, _Module):
            _module_tensors(child, f"{prefix}{name}.", out)


def read_network_pickle(raw: bytes, where: str, key: str = "ema") -> dict[str, np.ndarray]:
    """The state dict (dotted names, as ``net.state_dict()``) of the module ``data[key]``.

    Args:
      raw: the ``.pkl`` file's bytes.
      where: the file name, for error messages.
      key: which entry of the pickled dict holds the network (``"ema"`` in
        EDM/EDM2 snapshots and released models).

    Raises:
      InputError: for a corrupt file, one that asks for a disallowed global, or
        one without a module under ``key``.
    """
    try:
        data = _PersistenceUnpickler(io.BytesIO(raw), where).load()
    except pickle.UnpicklingError as e:
        raise InputError(f"{where}: {e}.") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        raise InputError(f"{where}: not a readable network pickle ({e!r}).") from None
    net = data.get(key) if isinstance(data, dict) else None
    if not isinstance(net, _Module):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise InputError(f"{where}: no network under {key!r} (found {found}).")
    out: dict[str, np.ndarray] = {}
    _module_tensors(net, "", out)
    if not out:
        raise InputError(f"{where}: the network under {key!r} holds no tensors.")
    return out
