"""PyTorch checkpoints without torch: the zip format (``torch.save`` >= 1.6) and the
legacy format (magic number, pickles, raw storages).

Zip: ``<archive>/data.pkl`` is a pickle whose tensors are
``_rebuild_tensor_v2(storage, offset, size, stride, ...)`` (or ``_v3`` with a
dtype, for untyped storages) with persistent ids
``('storage', StorageType, key, location, numel)``; storage ``key`` is the
uncompressed record ``<archive>/data/<key>``, read through a memory map;
``<archive>/byteorder`` says ``little`` or ``big``.

Legacy: pickles of the magic number, the protocol version and sys_info, then
the object (same persistent ids), then the list of storage keys, then for
each key an int64 element count and the raw elements.

Every tensor is a view into a memory map when it is contiguous (zero copy)
and a copy otherwise. Sizes, strides and offsets are checked against the
storage before anything is read; storage sizes against the file.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .dtypes import ml_dtype, widen_bfloat16
from .errors import CheckpointError, UnsafePickleError
from . import module_records, torchscript, zip_records
from .files import map_bytes, open_regular
from .safe_pickle import (CONTAINER_GLOBALS, NUMPY_GLOBALS, Inert, short_repr, load_pickle_at,
                          rebuild, restricted_load)  # fmt: skip

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_SMALL_RECORD = 64 << 20  # data.pkl, byteorder: inflated at most to this

# torch dtype name -> numpy dtype (None: needs ml_dtypes)
_TORCH_DTYPES = {
    "float64": "float64", "double": "float64", "float32": "float32", "float": "float32",
    "float16": "float16", "half": "float16", "bfloat16": None, "int64": "int64", "long": "int64",
    "int32": "int32", "int": "int32", "int16": "int16", "short": "int16", "int8": "int8",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64", "bool": "bool",
    "complex64": "complex64", "cfloat": "complex64", "complex128": "complex128",
    "cdouble": "complex128", "float8_e4m3fn": None, "float8_e5m2": None,
    "float8_e4m3fnuz": None, "float8_e5m2fnuz": None,
}  # fmt: skip
_STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
}  # fmt: skip


class TorchDType(Inert):
    """Stand-in for a ``torch.<dtype>`` global (immutable: a pickle cannot change it)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self._init(name=name)

    def __eq__(self, other: Any) -> bool:
        return type(other) is TorchDType and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def numpy(self, source: str) -> np.dtype:
        """The numpy dtype; raw uint16 bits for bfloat16 without ml_dtypes."""
        plain = _TORCH_DTYPES[self.name]
        if plain is not None:
            return np.dtype(plain)
        return ml_dtype(self.name, source) or np.dtype(np.uint16)


class StorageType(Inert):
    """Stand-in for ``torch.FloatStorage`` & co; ``dtype`` None for ``UntypedStorage``."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: TorchDType | None):
        self._init(dtype=dtype)

    def __eq__(self, other: Any) -> bool:
        return type(other) is StorageType and other.dtype == self.dtype

    def __hash__(self) -> int:
        return hash(self.dtype)

    def __repr__(self) -> str:
        return f"StorageType({self.dtype!r})"


class StorageHandle(Inert):
    """What persistent_load returns for a storage; located in the file afterwards."""

    __slots__ = ()


class TensorRef(Inert):
    """A tensor seen in the pickle, resolved into an array once storages are located."""

    __slots__ = ("storage", "offset", "size", "stride", "dtype")

    def __init__(self, storage: Any, offset: Any, size: tuple, stride: tuple,
                 dtype: TorchDType | None):  # fmt: skip
        self._init(storage=storage, offset=offset, size=size, stride=stride, dtype=dtype)


def _as_ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64 or not all(
        type(v) is int and 0 <= v < 2**63 for v in value
    ):
        raise CheckpointError(f"tensor {what} must be a tuple of at most 64 non-negative ints "
                              f"below 2**63, but got {short_repr(value)}")  # fmt: skip
    return tuple(value)


def _torch_size(items: Any = ()) -> tuple[int, ...]:
    return _as_ints(items, "size")


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return TensorRef(storage, offset, _as_ints(size, "size"), _as_ints(stride, "stride"), None)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, TorchDType):
        raise CheckpointError(
            f"_rebuild_tensor_v3 expects a torch dtype, but got {short_repr(dtype)}"
        )
    return TensorRef(storage, offset, _as_ints(size, "size"), _as_ints(stride, "stride"), dtype)


def _rebuild_v1(storage, offset, size, stride):
    return _rebuild_v2(storage, offset, size, stride)


class _Parameter:
    """Stand-in for ``torch.nn.Parameter`` (only ever passed as a type marker)."""


TORCH_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_v1,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_v3,
    ("torch._utils", "_rebuild_parameter"): lambda data, requires_grad, hooks: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, grad, hooks, state: data,
    ("torch.nn.parameter", "Parameter"): _Parameter,
    ("torch", "Size"): _torch_size,
    ("torch", "device"): lambda *args: ":".join(short_repr(a) for a in args),
    ("torch.storage", "UntypedStorage"): StorageType(None),
    **{("torch", name): StorageType(TorchDType(dt)) for name, dt in _STORAGE_TYPES.items()},
    **{("torch", name): TorchDType(name) for name in _TORCH_DTYPES},
    **CONTAINER_GLOBALS,
    **NUMPY_GLOBALS,
}


def _rebuild_from_type_v2(func, new_type, args, state):
    """Tensor subclasses (Parameter) pickle as ``func(*args)`` plus a type; keep the tensor."""
    if not callable(func) or not isinstance(args, tuple):
        raise CheckpointError(
            f"malformed _rebuild_from_type_v2 record: {short_repr(func)}, {short_repr(args)}"
        )
    return func(*args)


TORCH_GLOBALS[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2


def _storage_array(raw: np.ndarray, marker: TorchDType, big_endian: bool,
                   source: str) -> np.ndarray:  # fmt: skip
    """A storage's bytes as native elements: a view, or one copy of the storage (never
    more) when its bytes must be swapped or its bfloat16 bits widened."""
    dtype = marker.numpy(source).newbyteorder(">" if big_endian else "<")
    if dtype.isnative:
        dtype = dtype.newbyteorder("=")
    if raw.nbytes % dtype.itemsize:
        raise CheckpointError(
            f"{source}: storage of {raw.nbytes} bytes does not hold {dtype} elements"
        )
    data = raw.view(dtype)
    if not dtype.isnative:
        data = data.astype(dtype.newbyteorder("="))
    if marker.name == "bfloat16" and data.dtype == np.uint16:
        data = widen_bfloat16(data, source)
    return data


def _resolve_tensor(ref: TensorRef, storages: dict, big_endian: bool, source: str,
                    converted: dict) -> np.ndarray:  # fmt: skip
    """TensorRef -> ndarray: a read-only view of its storage, whatever its strides. A
    stride-0 (expanded) or overlapping tensor stays a view: a 1 KB file holding
    ``torch.zeros(1).expand(2**26)`` does not become 256 MiB."""
    if not isinstance(ref.storage, StorageHandle) or ref.storage not in storages:
        raise CheckpointError(
            f"{source}: a tensor refers to {short_repr(ref.storage)}, not to a storage"
        )
    raw, storage_type = storages[ref.storage]
    marker = ref.dtype or storage_type.dtype
    if marker is None:
        raise CheckpointError(f"{source}: an untyped storage is used without a dtype")
    if type(ref.offset) is not int or not 0 <= ref.offset < 2**63 or len(ref.size) != len(
            ref.stride):  # fmt: skip
        raise CheckpointError(f"{source}: malformed tensor record size={list(ref.size)} stride="
                              f"{list(ref.stride)} offset={short_repr(ref.offset)}")  # fmt: skip
    key = (ref.storage, marker)
    if key not in converted:
        converted[key] = _storage_array(raw, marker, big_endian, source)
    data = converted[key]
    numel = math.prod(ref.size)
    if numel == 0:
        try:
            return np.zeros(0, data.dtype).reshape(ref.size)
        except ValueError as error:
            raise CheckpointError(f"{source}: an empty tensor of size {list(ref.size)} ({error})"
                                  ) from None  # fmt: skip
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= data.size:
        raise CheckpointError(
            f"{source}: tensor of size {list(ref.size)}, stride {list(ref.stride)} at offset "
            f"{ref.offset} reaches element {last} of a storage of {data.size} elements"
        )
    # every stride that matters is now below the storage size; size-1 dims get stride 0
    strides = tuple(0 if n == 1 else s * data.itemsize for n, s in zip(ref.size, ref.stride))
    view = np.lib.stride_tricks.as_strided(data[ref.offset :], ref.size, strides, writeable=False)
    return view.view(np.ndarray) if view.flags.c_contiguous else view


def resolve_tensors(obj: Any, storages: dict, big_endian: bool, source: str) -> Any:
    """Replace every TensorRef inside dicts/lists/tuples by its array."""
    converted: dict = {}

    def leaf(item: Any) -> Any:
        if isinstance(item, TensorRef):
            return _resolve_tensor(item, storages, big_endian, source, converted)
        return item

    return rebuild(obj, leaf, source)


def _check_pid(pid: Any, source: str) -> tuple[StorageType, str, int]:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise CheckpointError(f"{source}: unexpected persistent id {short_repr(pid)}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, StorageType) or not isinstance(key, str):
        raise CheckpointError(f"{source}: malformed storage record {short_repr(pid)}")
    if type(numel) is not int or not 0 <= numel < 2**63:
        raise CheckpointError(f"{source}: malformed storage size in {short_repr(pid)}")
    return storage_type, key, numel


def _element_size(storage_type: StorageType, source: str) -> int:
    if storage_type.dtype is None:
        return 1
    return storage_type.dtype.numpy(source).itemsize


# -- zip ------------------------------------------------------------------------------------


def read_torch_zip(path: str, size: int | None = None) -> tuple[Any, dict]:
    """The object saved by ``torch.save`` (zip format), tensors as ndarrays."""
    source = str(path)
    f, size = open_regular(path)
    with f:
        infos = zip_records.directory(f, source)
        _, mm = map_bytes(f, size, source)
    pickles = [name for name in infos if name.endswith("/data.pkl") or name == "data.pkl"]
    if len(pickles) != 1:
        raise CheckpointError(
            f"{source}: expected one data.pkl record in the zip, found {len(pickles)}"
        )
    prefix = pickles[0][: -len("data.pkl")]
    order = infos.get(prefix + "byteorder")
    byteorder = (
        zip_records.read_record(mm, order, source, 16).decode(errors="replace")
        if order
        else "little"
    )
    if byteorder not in ("little", "big"):
        raise CheckpointError(
            f"{source}: byteorder record must be 'little' or 'big', but got {byteorder!r}"
        )
    storages: dict[StorageHandle, tuple[np.ndarray, StorageType]] = {}
    by_key: dict[str, StorageHandle] = {}
    used: list[tuple[int, int, str]] = []

    def persistent_load(pid):
        storage_type, key, numel = _check_pid(pid, source)
        if key in by_key:
            return by_key[key]
        info = infos.get(f"{prefix}data/{key}")
        if info is None:
            raise CheckpointError(f"{source}: storage record data/{key} is missing")
        if numel * _element_size(storage_type, source) != info.file_size:
            raise CheckpointError(
                f"{source}: storage data/{key} declares {numel} elements but holds "
                f"{info.file_size} bytes"
            )
        record = zip_records.stored_record(mm, info, source)
        start = zip_records.data_offset(mm, info, source)
        used.append((start, start + info.file_size, key))
        handle = StorageHandle()
        storages[handle] = (record, storage_type)
        by_key[key] = handle
        return handle

    data = zip_records.read_record(mm, infos[pickles[0]], source, size + _SMALL_RECORD)
    scripted = torchscript.is_torchscript(infos, prefix)
    allowed = {**TORCH_GLOBALS, **torchscript.TORCHSCRIPT_GLOBALS} if scripted else TORCH_GLOBALS
    obj, modules = module_records.load_modules(
        lambda table: restricted_load(data, source, table, persistent_load), data, allowed)
    _check_no_overlap(used, source)
    meta = {"format": "torchscript" if scripted else "torch-zip", "byteorder": byteorder}
    if modules:
        code = torchscript.read_code(mm, infos, prefix, source) if scripted else None
        obj, specs, _ = module_records.replace_modules(obj, lambda x: isinstance(x, TensorRef), code)
        meta["_specs"] = specs
    result = resolve_tensors(obj, storages, byteorder == "big", source)
    return result, meta


def _check_no_overlap(ranges: list[tuple[int, int, str]], source: str) -> None:
    ranges = sorted(ranges)
    for (_, end, key), (start, _, other) in zip(ranges, ranges[1:]):
        if start < end:
            raise CheckpointError(f"{source}: storages {key} and {other} overlap in the file")


# -- legacy ---------------------------------------------------------------------------------


def read_torch_legacy(path: str, size: int | None = None) -> tuple[Any, dict]:
    """The object saved by ``torch.save(..., _use_new_zipfile_serialization=False)``."""
    source = str(path)
    records: dict[str, tuple[StorageType, int, Any]] = {}
    views: list[tuple[Any, Any, int, int]] = []

    def persistent_load(pid):
        storage_type, key, numel = _check_pid(pid, source)
        if key not in records:
            records[key] = (storage_type, numel, StorageHandle())
        elif records[key][1] != numel or records[key][0] != storage_type:
            raise CheckpointError(f"{source}: storage {key} is declared twice with different sizes")
        view = pid[5] if len(pid) > 5 else None
        if view is None:
            return records[key][2]
        if not (isinstance(view, tuple) and len(view) == 3 and type(view[1]) is int
                and type(view[2]) is int):  # fmt: skip
            raise CheckpointError(f"{source}: malformed storage view {short_repr(view)}")
        handle = StorageHandle()
        views.append((handle, records[key][2], view[1], view[2]))
        return handle

    f, size = open_regular(path)
    with f:
        buffer, mm = map_bytes(f, size, source)
    position = 0

    def next_pickle(allowed, persistent=None):
        nonlocal position
        obj, position = load_pickle_at(buffer, position, source, allowed, persistent)
        return obj

    if next_pickle({}) != LEGACY_MAGIC:
        raise CheckpointError(f"{source}: not a PyTorch legacy checkpoint (wrong magic number)")
    version = next_pickle({})
    if version != 1001:
        raise CheckpointError(f"{source}: unsupported legacy protocol version {short_repr(version)}")
    sys_info = next_pickle({})
    big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
    try:
        obj = next_pickle(TORCH_GLOBALS, persistent_load)
    except UnsafePickleError as error:  # a whole model in the legacy format: not read as records
        hint = module_records.STATE_DICT_HINT if module_records.holds_modules(buffer) else ""
        raise UnsafePickleError(f"{error}{hint}") from None
    keys = next_pickle({})
    if not isinstance(keys, list) or len(keys) != len(records) or set(map(str, keys)) != set(
            records):  # fmt: skip
        raise CheckpointError(
            f"{source}: the storage key list does not match the pickled tensors"
        )
    storages: dict[StorageHandle, tuple[np.ndarray, StorageType]] = {}
    for key in map(str, keys):
        storage_type, numel, handle = records[key]
        if position + 8 > size:
            raise CheckpointError(f"{source}: truncated before storage {key}")
        stored = int.from_bytes(
            mm[position : position + 8].tobytes(), "big" if big_endian else "little"
        )
        nbytes = numel * _element_size(storage_type, source)
        if stored != numel or position + 8 + nbytes > size:
            raise CheckpointError(f"{source}: storage {key} declares {stored} elements (expected "
                                  f"{numel}) or runs past the end of the file")  # fmt: skip
        storages[handle] = (mm[position + 8 : position + 8 + nbytes], storage_type)
        position += 8 + nbytes
    for handle, base, offset, count in views:
        raw, storage_type = storages[base]
        item = _element_size(storage_type, source)
        if offset < 0 or count < 0 or (offset + count) * item > raw.size:
            raise CheckpointError(f"{source}: storage view ({offset}, {count}) is out of range")
        storages[handle] = (raw[offset * item : (offset + count) * item], storage_type)
    result = resolve_tensors(obj, storages, big_endian, source)
    return result, {"format": "torch-legacy"}
