"""Write PyTorch checkpoint files from NumPy arrays, without torch, for the tests.

Produces what ``torch.save(state_dict, path)`` writes: the zip format
(``archive/data.pkl`` + ``archive/data/<key>``) or the legacy sequence of
pickles. ``Global`` objects are written as raw GLOBAL opcodes, which also
lets a test write a *malicious* pickle that asks for ``os.system``.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage"}


class Global:
    """A reference to ``module.name`` that the pickle will ask the loader for."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists a REDUCE target be callable
        raise TypeError("a Global is only a name to write into a pickle")


class Call:
    """``func(*args)`` at load time (a REDUCE)."""

    def __init__(self, func: Global, args: tuple) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


class _Storage:
    def __init__(self, key: str, array: np.ndarray) -> None:
        self.key, self.array = key, np.ascontiguousarray(array).reshape(np.shape(array))


class _Pickler(pickle._Pickler):  # the pure-Python pickler lets us emit raw globals
    def __init__(self, f, legacy: bool) -> None:
        super().__init__(f, protocol=2)
        self.legacy = legacy

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if not isinstance(obj, _Storage):
            return None
        storage_type = Global("torch", _STORAGE_NAMES[obj.array.dtype])
        pid = ("storage", storage_type, obj.key, "cpu", obj.array.size)
        return (*pid, None) if self.legacy else pid


def _tensor(storage: _Storage) -> Call:
    shape = storage.array.shape
    strides = tuple(s // storage.array.itemsize for s in storage.array.strides)
    args = (storage, 0, shape, strides, False, collections.OrderedDict())
    return Call(Global("torch._utils", "_rebuild_tensor_v2"), args)


def _state(tensors: dict[str, np.ndarray]) -> tuple[collections.OrderedDict, list[_Storage]]:
    storages = [_Storage(str(i), a) for i, a in enumerate(tensors.values())]
    state = collections.OrderedDict(
        (k, _tensor(s)) for k, s in zip(tensors, storages, strict=True)
    )
    return state, storages


def dumps(obj, legacy: bool = False) -> bytes:
    """Pickle ``obj`` as torch would (``Global``/``Call`` become GLOBAL/REDUCE)."""
    f = io.BytesIO()
    _Pickler(f, legacy).dump(obj)
    return f.getvalue()


def zip_file(tensors: dict[str, np.ndarray], root=None) -> bytes:
    """``torch.save`` zip format of a state dict (or of ``root`` when given)."""
    state, storages = _state(tensors)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", dumps(state if root is None else root))
        for s in storages:
            zf.writestr(f"archive/data/{s.key}", s.array.tobytes())
        zf.writestr("archive/version", "3\n")
    return out.getvalue()


def legacy_file(tensors: dict[str, np.ndarray]) -> bytes:
    """Pre-1.6 ``torch.save`` format of a state dict."""
    state, storages = _state(tensors)
    f = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, f, protocol=2)
    f.write(dumps(state, legacy=True))
    pickle.dump([s.key for s in storages], f, protocol=2)
    for s in storages:
        f.write(struct.pack("<q", s.array.size) + s.array.tobytes())
    return f.getvalue()
