"""A restricted unpickler for network checkpoints that must never run code.

EDM's checkpoints (`*.pkl`) are plain pickles whose networks are `torch_utils.persistence` objects: each one
is stored as a call `_reconstruct_persistent_obj(meta)` where `meta` carries the class's whole module source
(`module_src`), the class name and the instance state. Loading them the normal way `exec`s that source.
Here nothing is imported or executed: the unpickler resolves only a fixed list of names (tensor rebuilders,
plain containers, numpy scalars) and turns persistent objects and `torch.nn` modules into inert records that
hold their state. Every other global is refused with `UnsafePickleError` before anything is called.

Supported containers: a raw pickle stream (EDM's `.pkl`), torch's zip format (`torch.save`, with the
storages read from the archive) and torch's legacy format (delegated to `torch.load(weights_only=True)`).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["UnsafePickleError", "PersistentObject", "ModuleRecord", "DictRecord", "safe_load", "module_state"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asked for something outside the allow-list; nothing from it was executed."""


@dataclass
class PersistentObject:
    """A `torch_utils.persistence` object, kept as data: its class source is never executed."""

    class_name: str
    state: dict
    version: Any = None
    module_src: str = field(default="", repr=False)


class ModuleRecord:
    """Stands in for a `torch.nn` module class (e.g. `ModuleDict`): records the instance state only."""

    _qualname = "torch.nn.Module"

    def __init__(self, *args, **kwargs):  # NEWOBJ may pass no args; the state arrives through BUILD
        self.state: dict = {}

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise UnsafePickleError(f"unexpected state of type {type(state).__name__} for {self._qualname}")
        self.state = state

    @property
    def class_name(self) -> str:
        return self._qualname.rsplit(".", 1)[-1]

    def __repr__(self):
        return f"ModuleRecord({self._qualname})"


class DictRecord(dict):
    """Stands in for dict subclasses such as `dnnlib.EasyDict`."""

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.update(state)


_module_record_classes: dict[str, type] = {}


def _module_record_class(qualname: str) -> type:
    cls = _module_record_classes.get(qualname)
    if cls is None:
        cls = type(qualname.rsplit(".", 1)[-1], (ModuleRecord,), {"_qualname": qualname})
        _module_record_classes[qualname] = cls
    return cls


def module_state(obj) -> tuple[str, dict] | None:
    """(class name, state dict) for a persistent object or module record; None for anything else."""
    if isinstance(obj, PersistentObject):
        return obj.class_name, obj.state
    if isinstance(obj, ModuleRecord):
        return obj.class_name, obj.state
    return None


# ----------------------------------------------------------------------------------------------------------
# Safe replacements for the callables a weights pickle needs.

def _reconstruct_persistent_obj(meta):
    # Deliberately does not look at meta["module_src"] beyond keeping it as a string.
    if not isinstance(meta, dict) or not isinstance(meta.get("state"), dict):
        raise UnsafePickleError("malformed torch_utils.persistence record (expected a dict with a 'state' dict)")
    if meta.get("type", "class") != "class":
        raise UnsafePickleError(f"unsupported persistent object type {meta.get('type')!r}")
    src = meta.get("module_src", "")
    return PersistentObject(class_name=str(meta.get("class_name", "?")), state=dict(meta["state"]),
                            version=meta.get("version"), module_src=src if isinstance(src, str) else "")


def _check_storage(storage):
    if not isinstance(storage, torch.storage.TypedStorage):
        raise UnsafePickleError(f"tensor rebuilt from a {type(storage).__name__}, expected a torch storage")
    return storage


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    storage = _check_storage(storage)
    t = torch.empty((0,), dtype=storage.dtype)
    t.set_(storage._untyped_storage, int(storage_offset), tuple(size), tuple(stride))
    return t


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    # Hooks and metadata are dropped on purpose: weights need neither.
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
    if not isinstance(data, torch.Tensor):
        raise UnsafePickleError("parameter rebuilt from a non-tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in (_rebuild_tensor_v2, _rebuild_parameter, _rebuild_tensor) or new_type not in (
            torch.Tensor, torch.nn.Parameter):
        raise UnsafePickleError("tensor subclass reconstruction is not allowed")
    return func(*args)


def _load_from_bytes(data):
    # A storage pickled outside torch.save is a nested legacy torch.save blob; torch's own weights-only
    # unpickler reads it.
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("storage payload is not bytes")
    obj = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    return _check_storage(obj)


def _safe_reconstructor(cls, base, state):
    # copyreg._reconstructor for protocol-0/1 style object records: only our inert record classes.
    if isinstance(cls, type) and issubclass(cls, ModuleRecord) and base is object:
        return cls()
    if isinstance(cls, type) and issubclass(cls, DictRecord) and base is dict:
        return cls(state or {})
    raise UnsafePickleError(f"copyreg._reconstructor on {cls!r} is not allowed")


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("only plain numeric numpy scalars are allowed")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0]


def _np_dtype(spec, align=False, copy=False):
    dt = np.dtype(spec)
    if dt.hasobject:
        raise UnsafePickleError("numpy object dtypes are not allowed")
    return dt


def _np_reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise UnsafePickleError("only plain numpy arrays are allowed")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _codecs_encode(text, encoding="utf-8"):
    # Protocol-2 pickles (torch.save) store bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is only allowed for latin1-encoded bytes")
    return text.encode("latin1")


class _StorageType:
    """What `torch.FloatStorage` & co. resolve to: only their dtype matters."""

    def __init__(self, dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
_TORCH_DTYPES = {name: getattr(torch, name) for name in (
    "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")}

_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "object"): object,  # only meaningful as `base` for _safe_reconstructor
    ("builtins", "dict"): dict,
    ("copyreg", "_reconstructor"): _safe_reconstructor,
    ("_codecs", "encode"): _codecs_encode,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("torch", "Size"): torch.Size,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("numpy", "dtype"): _np_dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): DictRecord,
    ("dnnlib", "EasyDict"): DictRecord,
}


class RestrictedUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` only hands out the allow-list above."""

    def __init__(self, file, *, source: str = "<pickle>", storage_reader=None):
        super().__init__(file)
        self._source = source
        self._storage_reader = storage_reader

    def find_class(self, module, name):
        # Protocol-2 pickles (torch.save) use Python 2 names; the stock find_class maps them, ours must too.
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        key = (module, name)
        if key in _ALLOWED:
            return _ALLOWED[key]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        # nn containers (ModuleDict, ModuleList, ...) and stock layers appear inside EDM's networks;
        # they become inert records, their classes are never instantiated.
        if module.startswith("torch.nn.modules.") and name.isidentifier() and name[:1].isupper():
            return _module_record_class(f"{module}.{name}")
        raise UnsafePickleError(
            f"refusing to load {self._source}: the pickle references {module}.{name}, which a weights file "
            "never needs; calling it could run arbitrary code, so nothing from this file was executed")

    def persistent_load(self, pid):
        if self._storage_reader is None:
            raise UnsafePickleError(f"{self._source}: unexpected persistent id in a plain pickle")
        return self._storage_reader(pid)


# ----------------------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_torch_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: zip file is not a torch checkpoint (no single */data.pkl)")
        prefix = pkl[0].rsplit("/", 1)[0]
        order = f"{prefix}/byteorder"
        if order in names and zf.read(order).decode().strip() != "little":
            raise ValueError(f"{path}: big-endian torch checkpoints are not supported")
        cache: dict[str, torch.storage.TypedStorage] = {}

        def read_storage(pid):
            if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
                raise UnsafePickleError(f"{path}: unexpected persistent id {pid!r}")
            _, stype, key, _location, _numel = pid[:5]
            if not isinstance(stype, _StorageType):
                raise UnsafePickleError(f"{path}: storage of unexpected type {stype!r}")
            key = str(key)
            if key not in cache:
                raw = bytearray(zf.read(f"{prefix}/data/{key}"))
                untyped = torch.frombuffer(raw, dtype=torch.uint8).untyped_storage() if raw else \
                    torch.UntypedStorage(0)
                cache[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=stype.dtype, _internal=True)
            return cache[key]

        with zf.open(pkl[0]) as f:
            return RestrictedUnpickler(io.BytesIO(f.read()), source=path, storage_reader=read_storage).load()


def safe_load(path: str | os.PathLike) -> Any:
    """Load a pickle / torch checkpoint without executing any code from it.

    Raises `UnsafePickleError` for anything outside the allow-list (the file's code is never run).
    """
    path = os.fspath(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty, not a network pickle; download it again")
    try:
        if zipfile.is_zipfile(path):
            return _load_torch_zip(path)
        with open(path, "rb") as f:
            up = RestrictedUnpickler(f, source=path)
            obj = up.load()
            if isinstance(obj, int) and obj == _LEGACY_MAGIC:
                # torch's legacy (pre-1.6) serialization: a sequence of pickles plus raw storages.
                return torch.load(path, weights_only=True, map_location="cpu")
        return obj
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, KeyError, IndexError, struct.error,
            UnicodeDecodeError, RuntimeError) as e:  # truncated, or another kind of file
        raise ValueError(f"{path} is not a readable network pickle (truncated or another kind of file: "
                         f"{type(e).__name__}); download it again") from None
