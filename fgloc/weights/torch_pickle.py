"""Read PyTorch checkpoints (``torch.save`` files) into numpy without importing torch.

Both on-disk formats are supported:

* the zip format (torch >= 1.6): ``archive/data.pkl`` plus one raw file per storage;
* the legacy format: a stream of pickles (magic number, protocol version, system info, the
  object, the storage keys) followed by each storage's raw bytes, each preceded by its element
  count as little-endian int64.

A restricted unpickler only admits the handful of globals a state dict needs (``OrderedDict``,
``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``, the typed storage classes and
dtypes); anything else is refused with an error naming the global, so a checkpoint can never run
code.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from typing import Any

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES: dict[str, Any] = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TORCH_DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "float": np.float32,
    "float64": np.float64,
    "double": np.float64,
    "float16": np.float16,
    "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "long": np.int64,
    "int32": np.int32,
    "int": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}


class CheckpointError(ValueError):
    """The file is not a readable PyTorch checkpoint (the message names the file)."""


class _StorageType:
    def __init__(self, name: str, dtype: Any):
        self.name, self.dtype = name, np.dtype(dtype)


class _Storage:
    """A storage whose bytes arrive later (legacy format) or are read lazily (zip format)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.array: np.ndarray | None = None


class _Tensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialise(self) -> np.ndarray:
        data = self.storage.array
        if data is None:
            raise CheckpointError(f"storage {self.storage.key} was never read")
        if not self.size:
            return np.array(data[self.offset])
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :],
            shape=tuple(self.size),
            strides=tuple(s * item for s in self.stride),
            writeable=False,
        )
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    return _Tensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    return data


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, path: str, storages: dict[str, _Storage]):
        super().__init__(file)
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str):
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return np.dtype(_TORCH_DTYPES[name])
        raise CheckpointError(
            f"{self._path}: refusing to unpickle global {module}.{name} "
            "(only plain state dicts of tensors are accepted)"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise CheckpointError(f"{self._path}: unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
        if len(pid) > 5 and pid[5] is not None:
            raise CheckpointError(f"{self._path}: storage views are not supported")
        if isinstance(storage_type, _StorageType):
            dtype = storage_type.dtype
        elif isinstance(storage_type, np.dtype):
            dtype = storage_type
        else:
            raise CheckpointError(f"{self._path}: unknown storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(key, dtype, numel)
        return self._storages[key]


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _Tensor):
        return obj.materialise()
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise CheckpointError(f"{path}: zip file without data.pkl is not a torch checkpoint")
        root = pkl[0][: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), path, storages).load()
        big_endian = f"{root}byteorder" in names and zf.read(f"{root}byteorder") == b"big"
        for key, st in storages.items():
            raw = zf.read(f"{root}data/{key}")
            dtype = st.dtype.newbyteorder(">") if big_endian else st.dtype
            st.array = np.frombuffer(raw, dtype=dtype).astype(st.dtype)
    return obj


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        try:
            magic = pickle.load(f)
        except Exception as e:
            raise CheckpointError(f"{path}: not a torch checkpoint ({e})") from None
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a torch checkpoint (bad magic number)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # sys info
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(f, path, storages).load()
        keys = pickle.load(f)
        for key in keys:
            st = storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            nbytes = numel * st.dtype.itemsize
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise CheckpointError(f"{path}: truncated storage {key}")
            st.array = np.frombuffer(raw, dtype=st.dtype)
    return obj


def load_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a ``torch.save``-d state dict as ``{name: numpy array}``, without torch.

    Accepts a bare state dict or the common wrappers ``{"state_dict": ...}`` /
    ``{"model": ...}``; a ``module.`` prefix (DataParallel) is stripped.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      CheckpointError: if it is not a torch checkpoint or holds anything but tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    obj = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
    obj = _materialise(obj)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"{path}: entry {k!r} is {type(v).__name__}, not a tensor")
        out[k.removeprefix("module.")] = v
    return out
