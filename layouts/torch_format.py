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

import struct
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from .dtypes import ml_dtype, widen_bfloat16
from .errors import CheckpointError
from .safe_pickle import CONTAINER_GLOBALS, NUMPY_GLOBALS, restricted_load

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ZIP_LOCAL_HEADER = struct.Struct("<4s5H3I2H")

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


@dataclass(frozen=True)
class TorchDType:
    """Stand-in for a ``torch.<dtype>`` global."""

    name: str

    def numpy(self, source: str) -> np.dtype:
        """The numpy dtype; raw uint16 bits for bfloat16 without ml_dtypes."""
        plain = _TORCH_DTYPES[self.name]
        if plain is not None:
            return np.dtype(plain)
        return ml_dtype(self.name, source) or np.dtype(np.uint16)


@dataclass(frozen=True)
class StorageType:
    """Stand-in for ``torch.FloatStorage`` & co; ``dtype`` None for ``UntypedStorage``."""

    dtype: TorchDType | None


class StorageHandle:
    """What persistent_load returns for a storage; located in the file afterwards."""


@dataclass
class TensorRef:
    """A tensor seen in the pickle, resolved into an array once storages are located."""

    storage: Any
    offset: int
    size: tuple
    stride: tuple
    dtype: TorchDType | None


def _as_ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise CheckpointError(
            f"tensor {what} must be a tuple of non-negative ints, but got {value!r}"
        )
    return tuple(value)


def _rebuild_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return TensorRef(storage, offset, _as_ints(size, "size"), _as_ints(stride, "stride"), None)


def _rebuild_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, TorchDType):
        raise CheckpointError(f"_rebuild_tensor_v3 expects a torch dtype, but got {dtype!r}")
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
    ("torch", "Size"): lambda items=(): tuple(items),
    ("torch", "device"): lambda *args: ":".join(str(a) for a in args),
    ("torch.storage", "UntypedStorage"): StorageType(None),
    **{("torch", name): StorageType(TorchDType(dt)) for name, dt in _STORAGE_TYPES.items()},
    **{("torch", name): TorchDType(name) for name in _TORCH_DTYPES},
    **CONTAINER_GLOBALS,
    **NUMPY_GLOBALS,
}


def _rebuild_from_type_v2(func, new_type, args, state):
    """Tensor subclasses (Parameter) pickle as ``func(*args)`` plus a type; keep the tensor."""
    if not callable(func) or not isinstance(args, tuple):
        raise CheckpointError(f"malformed _rebuild_from_type_v2 record: {func!r}, {args!r}")
    return func(*args)


TORCH_GLOBALS[("torch._tensor", "_rebuild_from_type_v2")] = _rebuild_from_type_v2


def _resolve_tensor(ref: TensorRef, storages: dict, big_endian: bool, source: str):
    """TensorRef -> ndarray: a view of the storage when contiguous, else a copy."""
    if not isinstance(ref.storage, StorageHandle) or ref.storage not in storages:
        raise CheckpointError(f"{source}: a tensor refers to {ref.storage!r}, not to a storage")
    raw, storage_type = storages[ref.storage]
    dtype_marker = ref.dtype or storage_type.dtype
    if dtype_marker is None:
        raise CheckpointError(f"{source}: an untyped storage is used without a dtype")
    dtype = dtype_marker.numpy(source).newbyteorder(">" if big_endian else "<")
    if dtype.isnative:
        dtype = dtype.newbyteorder("=")
    if raw.nbytes % dtype.itemsize:
        raise CheckpointError(
            f"{source}: storage of {raw.nbytes} bytes does not hold {dtype} elements"
        )
    data = raw.view(dtype)
    if len(ref.size) != len(ref.stride) or not isinstance(ref.offset, int) or ref.offset < 0:
        raise CheckpointError(f"{source}: malformed tensor record size={ref.size} stride={ref.stride} "
                              f"offset={ref.offset!r}")  # fmt: skip
    numel = int(np.prod(ref.size, dtype=np.int64)) if ref.size else 1
    if numel == 0:
        array = np.empty(ref.size, dtype=dtype)
    else:
        last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
        if last >= data.size:
            raise CheckpointError(
                f"{source}: tensor of size {list(ref.size)}, stride {list(ref.stride)} at offset "
                f"{ref.offset} reaches element {last} of a storage of {data.size} elements"
            )
        contiguous = tuple(
            int(np.prod(ref.size[i + 1 :], dtype=np.int64)) for i in range(len(ref.size))
        )
        if all(n == 1 or s == c for n, s, c in zip(ref.size, ref.stride, contiguous)):
            array = data[ref.offset : ref.offset + numel].reshape(ref.size)
        else:
            view = np.lib.stride_tricks.as_strided(
                data[ref.offset :], ref.size, tuple(s * dtype.itemsize for s in ref.stride),
                writeable=False,
            )  # fmt: skip
            array = np.array(view)
    if big_endian or not dtype.isnative:
        array = array.astype(dtype.newbyteorder("="))
    if dtype_marker.name == "bfloat16" and array.dtype == np.uint16:
        array = widen_bfloat16(array, source)
    return array


def resolve_tensors(obj: Any, storages: dict, big_endian: bool, source: str) -> Any:
    """Replace every TensorRef inside dicts/lists/tuples by its array."""

    def walk(item):
        if isinstance(item, TensorRef):
            return _resolve_tensor(item, storages, big_endian, source)
        if isinstance(item, dict):
            return type(item)((k, walk(v)) for k, v in item.items())
        if isinstance(item, (list, tuple)):
            return type(item)(walk(v) for v in item)
        return item

    return walk(obj)


def _check_pid(pid: Any, source: str) -> tuple[StorageType, str, int]:
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
        raise CheckpointError(f"{source}: unexpected persistent id {pid!r}")
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(storage_type, StorageType) or not isinstance(key, str):
        raise CheckpointError(f"{source}: malformed storage record {pid!r}")
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise CheckpointError(f"{source}: malformed storage size in {pid!r}")
    return storage_type, key, numel


def _element_size(storage_type: StorageType, source: str) -> int:
    if storage_type.dtype is None:
        return 1
    return storage_type.dtype.numpy(source).itemsize


# -- zip ------------------------------------------------------------------------------------


def _zip_record_offset(mm: np.ndarray, info: zipfile.ZipInfo, source: str) -> int:
    """Byte offset of a stored record's data, from its local header."""
    start = info.header_offset
    if start < 0 or start + _ZIP_LOCAL_HEADER.size > mm.size:
        raise CheckpointError(f"{source}: zip record {info.filename!r} starts outside the file")
    header = _ZIP_LOCAL_HEADER.unpack(mm[start : start + _ZIP_LOCAL_HEADER.size].tobytes())
    if header[0] != b"PK\x03\x04":
        raise CheckpointError(
            f"{source}: zip record {info.filename!r} has a corrupted local header"
        )
    name_start = start + _ZIP_LOCAL_HEADER.size
    if mm[name_start : name_start + header[9]].tobytes() != info.filename.encode():
        raise CheckpointError(f"{source}: zip record {info.filename!r} points at the local header of "
                              "another record")  # fmt: skip
    data = name_start + header[9] + header[10]
    if data + info.file_size > mm.size:
        raise CheckpointError(
            f"{source}: zip record {info.filename!r} claims {info.file_size} bytes at offset {data}, "
            f"beyond the end of the {mm.size}-byte file"
        )
    return data


def _read_small_record(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, source: str
) -> bytes:
    """A metadata record (data.pkl, byteorder); sizes are checked before reading."""
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > 100 * max(
        info.compress_size, 1
    ):
        raise CheckpointError(
            f"{source}: record {info.filename!r} claims an implausible compression ratio"
        )
    if info.file_size > size * 100:
        raise CheckpointError(f"{source}: record {info.filename!r} claims {info.file_size} bytes")
    return archive.read(info)


def read_torch_zip(path: str, size: int) -> tuple[Any, dict]:
    """The object saved by ``torch.save`` (zip format), tensors as ndarrays."""
    try:
        return _read_torch_zip(path, size)
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, NotImplementedError, UnicodeError, OSError, ValueError, EOFError,
            struct.error, KeyError) as error:  # fmt: skip
        # zipfile reports a damaged archive in many ways
        raise CheckpointError(
            f"{path}: not a readable zip archive ({type(error).__name__}: {error})"
        ) from None


def _read_torch_zip(path: str, size: int) -> tuple[Any, dict]:
    source = str(path)
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [name for name in infos if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise CheckpointError(
                f"{source}: expected one data.pkl record in the zip, found {len(pickles)}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        order = infos.get(prefix + "byteorder")
        byteorder = (
            _read_small_record(archive, order, size, source).decode(errors="replace")
            if order
            else "little"
        )
        if byteorder not in ("little", "big"):
            raise CheckpointError(
                f"{source}: byteorder record must be 'little' or 'big', but got {byteorder!r}"
            )
        mm = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
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
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{source}: storage record data/{key} is compressed; "
                                      "torch.save writes them uncompressed")  # fmt: skip
            if numel * _element_size(storage_type, source) != info.file_size:
                raise CheckpointError(
                    f"{source}: storage data/{key} declares {numel} elements but holds "
                    f"{info.file_size} bytes"
                )
            start = _zip_record_offset(mm, info, source)
            used.append((start, start + info.file_size, key))
            handle = StorageHandle()
            storages[handle] = (mm[start : start + info.file_size], storage_type)
            by_key[key] = handle
            return handle

        data = _read_small_record(archive, infos[pickles[0]], size, source)
        obj = restricted_load(data, source, TORCH_GLOBALS, persistent_load)
        _check_no_overlap(used, source)
        result = resolve_tensors(obj, storages, byteorder == "big", source)
        return result, {"format": "torch-zip", "byteorder": byteorder}


def _check_no_overlap(ranges: list[tuple[int, int, str]], source: str) -> None:
    ranges = sorted(ranges)
    for (_, end, key), (start, _, other) in zip(ranges, ranges[1:]):
        if start < end:
            raise CheckpointError(f"{source}: storages {key} and {other} overlap in the file")


# -- legacy ---------------------------------------------------------------------------------


def read_torch_legacy(path: str, size: int) -> tuple[Any, dict]:
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
        if not (isinstance(view, tuple) and len(view) == 3 and isinstance(view[1], int)
                and isinstance(view[2], int)):  # fmt: skip
            raise CheckpointError(f"{source}: malformed storage view {view!r}")
        handle = StorageHandle()
        views.append((handle, records[key][2], view[1], view[2]))
        return handle

    with open(path, "rb") as f:
        magic = restricted_load(f, source, {})
        if magic != LEGACY_MAGIC:
            raise CheckpointError(f"{source}: not a PyTorch legacy checkpoint (wrong magic number)")
        version = restricted_load(f, source, {})
        if version != 1001:
            raise CheckpointError(f"{source}: unsupported legacy protocol version {version!r}")
        sys_info = restricted_load(f, source, {})
        big_endian = isinstance(sys_info, dict) and sys_info.get("little_endian") is False
        obj = restricted_load(f, source, TORCH_GLOBALS, persistent_load)
        keys = restricted_load(f, source, {})
        if not isinstance(keys, list) or set(keys) != set(records) or len(keys) != len(records):
            raise CheckpointError(
                f"{source}: the storage key list does not match the pickled tensors"
            )
        position = f.tell()
    mm = np.memmap(path, dtype=np.uint8, mode="r").view(np.ndarray)
    storages: dict[StorageHandle, tuple[np.ndarray, StorageType]] = {}
    for key in keys:
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
