"""safetensors, read and written by us (checked against the ``safetensors`` package
in the tests): an 8-byte little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}}``,
then the data. Reading memory-maps the file; every offset is checked against
the file, and the tensors must tile the data region without overlap or hole.
"""

from __future__ import annotations

import json
import math
import re
import os
from typing import Any, BinaryIO, Callable, Mapping

import numpy as np

from .atomic import atomic_write
from .dtypes import is_floating, ml_dtype, widen_bfloat16
from .errors import CheckpointError
from .files import map_bytes, open_regular
from .safe_pickle import short_repr
from .sink import Sink

MAX_HEADER = 100 * 1024 * 1024
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_OPEN, _CLOSE = np.frombuffer(b"[{", np.uint8), np.frombuffer(b"]}", np.uint8)
_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16",
    "U32": "uint32", "I32": "int32", "U64": "uint64", "I64": "int64", "F16": "float16",
    "F32": "float32", "F64": "float64", "C64": "complex64", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip
_NAMES = {v: k for k, v in _DTYPES.items()}


def _numpy_dtype(code: str, source: str) -> np.dtype:
    name = _DTYPES.get(code) if isinstance(code, str) else None
    if name is None:
        raise CheckpointError(f"{source}: unknown safetensors dtype {short_repr(code)}")
    if name.startswith(("bfloat", "float8")):
        return ml_dtype(name, source) or np.dtype(np.uint16)
    return np.dtype(name).newbyteorder("<")


def _json_depth(raw: bytes) -> int:
    """How deep the brackets of a JSON text nest (strings ignored), without recursion: the
    json module recurses in C, which a high recursion limit turns into a stack overflow."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), np.uint8)
    steps = np.isin(bare, _OPEN).astype(np.int64) - np.isin(bare, _CLOSE)
    return int(np.cumsum(steps).max(initial=0))


def _read_header(f: BinaryIO, size: int, source: str) -> tuple[dict, int]:
    head = f.read(8)
    if len(head) < 8:
        raise CheckpointError(f"{source}: truncated safetensors file ({size} bytes)")
    length = int.from_bytes(head, "little")
    if length > MAX_HEADER or 8 + length > size:
        raise CheckpointError(f"{source}: safetensors header of {length} bytes does not fit "
                              f"the {size}-byte file")  # fmt: skip
    raw = f.read(length)
    depth = _json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise CheckpointError(f"{source}: safetensors header nested {depth} deep (at most "
                              f"{MAX_JSON_DEPTH})")  # fmt: skip
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{source}: corrupted safetensors header ({error})") from None
    except RecursionError:
        raise CheckpointError(f"{source}: safetensors header nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{source}: safetensors header must be a JSON object")
    return header, 8 + length


def read_header(path: str, size: int | None = None) -> tuple[dict, int]:
    """(header dict, byte offset of the data region); nothing else is read."""
    f, size = open_regular(path)
    with f:
        return _read_header(f, size, str(path))


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**63


def _entry(name: str, info: Any, source: str) -> tuple[np.dtype, tuple[int, ...], int, int, str]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{source}: malformed entry for tensor {name!r}: expected the keys "
                              f"dtype, shape and data_offsets, but got {short_repr(info)}")  # fmt: skip
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and len(shape) <= 64 and all(map(_is_count, shape))):
        raise CheckpointError(f"{source}: malformed shape for tensor {name!r}: expected a list "
                              f"of at most 64 non-negative ints, but got {short_repr(shape)}")  # fmt: skip
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):  # fmt: skip
        raise CheckpointError(f"{source}: malformed data_offsets for tensor {name!r}: expected "
                              f"[begin, end] with 0 <= begin <= end, but got "
                              f"{short_repr(offsets)}")  # fmt: skip
    dtype = _numpy_dtype(info["dtype"], source)
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise CheckpointError(f"{source}: tensor {name!r} of shape {shape} and dtype {info['dtype']} "
                              f"needs {math.prod(shape) * dtype.itemsize} bytes, but its offsets "
                              f"span {end - begin}")  # fmt: skip
    return dtype, tuple(shape), begin, end, info["dtype"]


def read_safetensors(path: str, size: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(name -> array view of a memory map, ``__metadata__``)."""
    source = str(path)
    f, size = open_regular(path)
    with f:
        header, data_start = _read_header(f, size, source)
        _, mm = map_bytes(f, size, source)
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{source}: __metadata__ must map strings to strings")
    entries = {name: _entry(name, info, source) for name, info in header.items()}
    spans = sorted((begin, end, name) for name, (_, _, begin, end, _) in entries.items())
    cursor = 0
    for begin, end, name in spans:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a hole before it"
            raise CheckpointError(f"{source}: tensor {name!r} at bytes [{begin}, {end}) {what}")
        cursor = end
    if data_start + cursor != size:
        raise CheckpointError(f"{source}: the tensors cover {cursor} bytes but the data region holds "
                              f"{size - data_start}")  # fmt: skip
    tensors = {}
    for name, (dtype, shape, begin, end, code) in entries.items():
        try:
            array = mm[data_start + begin : data_start + end].view(dtype).reshape(shape)
        except ValueError as error:  # e.g. a zero-size tensor whose other dims overflow
            raise CheckpointError(f"{source}: tensor {name!r} of shape {shape} cannot be "
                                  f"built ({error})") from None  # fmt: skip
        if not dtype.isnative:
            array = array.astype(dtype.newbyteorder("="))
        if code == "BF16" and array.dtype == np.uint16:
            array = widen_bfloat16(array, source)
        tensors[name] = array
    return tensors, metadata


def _dtype_code(dtype: np.dtype, name: str) -> str:
    code = _NAMES.get(dtype.name)
    if code is None:
        raise TypeError(f"save_safetensors: tensor {name!r} has dtype {dtype}, which safetensors "
                        f"cannot store")  # fmt: skip
    return code


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None,
                      float_dtype: np.dtype | None = None,
                      progress: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """Write ``tensors`` atomically; ``metadata`` must map strings to strings;
    ``float_dtype`` casts the floating tensors; ``progress(nbytes)`` is called
    after each tensor is written.

    Tensors stream to disk one at a time through a :class:`~layouts.sink.Sink` (read from
    the source file where a tensor's bytes are already in a mapped checkpoint), so the
    checkpoint is never copied whole in memory."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise TypeError(
                f"save_safetensors: metadata must map str to str, but got {dict(metadata)!r}"
            )
        header["__metadata__"] = dict(metadata)

    def target(array: np.ndarray) -> np.dtype:
        return (
            np.dtype(float_dtype)
            if float_dtype is not None and is_floating(array.dtype)
            else array.dtype
        )

    names, offset = sorted(tensors), 0
    for name in names:
        array = tensors[name]
        nbytes = array.size * target(array).itemsize
        header[name] = {"dtype": _dtype_code(target(array), name), "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}  # fmt: skip
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data region starts 8-byte aligned
    with atomic_write(path) as f, Sink(f) as sink:
        sink.write(len(raw).to_bytes(8, "little") + raw)
        for name in names:
            array = tensors[name]
            sink.write_array(array, target(array).newbyteorder("<"))
            if progress is not None:
                progress(array.size * target(array).itemsize)
