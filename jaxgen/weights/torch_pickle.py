"""Read PyTorch checkpoint files as NumPy arrays, without torch and without running code.

Both of torch's on-disk formats are read: the zip archive (``torch.save``
since 1.6 and TorchScript ``.pt`` files: ``<prefix>/data.pkl`` plus one
record per storage under ``<prefix>/data/``) and the older sequence of
pickles (magic number, protocol, system info, the object pickle, the list
of storage keys, then each storage's raw bytes).

The pickles are read by a restricted unpickler: it builds tensors from the
archive's storages, plain containers, and inert attribute holders for
TorchScript module objects, and refuses every other global. A file that
asks for anything else (``os.system``, ``builtins.eval``, ...) is rejected
before any of its code could run.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile

import numpy as np

from jaxgen.errors import InputError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LIST_BUILDERS = {"build_intlist", "build_doublelist", "build_boollist", "build_tensorlist"}


class _StorageType:
    def __init__(self, dtype: type) -> None:
        self.dtype = np.dtype(dtype)


class Storage:
    """One storage: its dtype and element count, and its data once :meth:`fill` read it."""

    def __init__(self, dtype: np.dtype, numel: int) -> None:
        self.dtype, self.numel = dtype, numel
        self.data: np.ndarray | None = None  # filled when the raw bytes are read

    def fill(self, raw: bytes, where: str) -> None:
        if len(raw) != self.numel * self.dtype.itemsize:
            raise InputError(
                f"{where}: storage holds {len(raw)} bytes, expected "
                f"{self.numel} x {self.dtype.itemsize}; the file is truncated or corrupt."
            )
        self.data = np.frombuffer(raw, self.dtype.newbyteorder("<"))


class Tensor:
    """A tensor whose storage may not be read yet (legacy files store data last)."""

    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def numpy(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise InputError("a tensor refers to a storage the file never provides (corrupt file).")
        n = int(np.prod(self.size)) if self.size else 1
        steps = zip(self.size, self.stride, strict=True)
        extent = self.offset + sum((s - 1) * st for s, st in steps) + 1
        if n and extent > data.shape[0]:
            raise InputError("a tensor reaches past the end of its storage (corrupt file).")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=self.size,
            strides=tuple(st * data.itemsize for st in self.stride),
            writeable=False,
        )
        return np.array(view)  # own the memory, native byte order, C-contiguous


class ScriptObject:
    """Inert stand-in for a TorchScript module object: it only stores its attributes."""

    def __setstate__(self, state: object) -> None:
        self.__dict__["state"] = state


def _rebuild_tensor(storage, offset, size, stride, *unused) -> Tensor:
    if not isinstance(storage, Storage):
        raise pickle.UnpicklingError("tensor built from something other than a storage")
    return Tensor(storage, int(offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused):
    return data


class RestrictedUnpickler(pickle.Unpickler):
    """Builds tensors (storages from ``storage_loader``) and containers; refuses other globals."""

    def __init__(self, file: io.BytesIO, storage_loader) -> None:
        super().__init__(file)
        self._storage_loader = storage_loader

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch.jit._pickle" and name in _LIST_BUILDERS:
            return list
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject  # TorchScript class: attributes only, its code is never run
        raise pickle.UnpicklingError(
            f"refusing to load global '{module}.{name}': only tensors and containers are allowed"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"storage {key} has an unsupported type")
        return self._storage_loader(key, storage_type.dtype, int(pid[4]), pid[5:])


def _unpickle(data: bytes | io.BytesIO, storage_loader, where: str):
    f = data if isinstance(data, io.BytesIO) else io.BytesIO(data)
    try:
        return RestrictedUnpickler(f, storage_loader).load()
    except pickle.UnpicklingError as e:
        raise InputError(f"{where}: {e}.") from None
    except (EOFError, ValueError, TypeError, IndexError, KeyError, struct.error) as e:
        raise InputError(
            f"{where}: not a readable PyTorch pickle ({e!r}); the file is corrupt."
        ) from None


def read_zip(zf: zipfile.ZipFile, where: str):
    """The object pickled in a torch zip archive, its storages read from ``<name>/data/``."""
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
        raise InputError(
            f"{where}: zip archive without a single '<name>/data.pkl'; not a torch file."
        )
    prefix = pkls[0][: -len("data.pkl")]
    storages: dict[str, Storage] = {}

    def load(key: str, dtype: np.dtype, numel: int, view) -> Storage:
        if key not in storages:
            st = Storage(dtype, numel)
            try:
                raw = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise InputError(f"{where}: storage record data/{key} is missing.") from None
            st.fill(raw, f"{where} (storage {key})")
            storages[key] = st
        return storages[key]

    return _unpickle(zf.read(pkls[0]), load, where)


def read_legacy(raw: bytes, where: str):
    """The object of a legacy (pre-1.6) torch file, its storages filled from the bytes after it."""
    f = io.BytesIO(raw)
    no_storage = lambda *a: (_ for _ in ()).throw(pickle.UnpicklingError("unexpected storage"))
    magic = _unpickle(f, no_storage, where)
    if magic != _LEGACY_MAGIC:
        raise InputError(f"{where}: not a PyTorch file (bad magic number).")
    _unpickle(f, no_storage, where)  # protocol version
    sys_info = _unpickle(f, no_storage, where)
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise InputError(f"{where}: big-endian PyTorch files are not supported.")
    storages: dict[str, Storage] = {}

    def load(key: str, dtype: np.dtype, numel: int, view) -> Storage:
        if view and view[0] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        return storages.setdefault(key, Storage(dtype, numel))

    obj = _unpickle(f, load, where)
    keys = _unpickle(f, no_storage, where)
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise InputError(f"{where}: storage {key} listed but never used (corrupt file).")
        head = f.read(8)
        if len(head) != 8:
            raise InputError(f"{where}: file ends before storage {key} (truncated).")
        (numel,) = struct.unpack("<q", head)
        st.fill(f.read(numel * st.dtype.itemsize), f"{where} (storage {key})")
    return obj


def _flatten(obj, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(obj, Tensor):
        out[prefix] = obj.numpy()
    elif isinstance(obj, ScriptObject):
        _flatten(obj.__dict__.get("state", {}), prefix, out)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)


def read_torch_file(raw: bytes, where: str) -> dict[str, np.ndarray]:
    """All tensors of a torch file (state dict or TorchScript), by dotted name.

    Args:
      raw: the file's bytes.
      where: the file name, used in error messages.

    Raises:
      InputError: for a corrupt file, or one that asks for a disallowed global.
    """
    if raw[:4] == b"PK\x03\x04":
        try:
            zf = zipfile.ZipFile(io.BytesIO(raw))
        except zipfile.BadZipFile as e:
            raise InputError(f"{where}: corrupt zip archive ({e}).") from None
        try:
            obj = read_zip(zf, where)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise InputError(f"{where}: corrupt zip archive ({e}).") from None
    else:
        obj = read_legacy(raw, where)
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    if not out:
        raise InputError(f"{where}: holds no tensors.")
    return out
