"""OneFlow checkpoints without oneflow (never imported), read as ``oneflow.load`` reads them
(``python/oneflow/framework/check_point_v2.py``).

Legacy directory (OneFlow <= 0.5 ``flow.checkpoint.save`` / ``flow.save``; ``nn.Graph`` saves;
later versions load any directory without ``pickled_data`` this way): ``snapshot_done`` and, per
variable, ``os.path.join(dir, name)`` holding ``meta`` (text-format ``VariableMetaInfo``, e.g.
``shape { dim: 2 dim: 3 } data_type: kFloat``) and ``out`` (raw little-endian C-order bytes;
for ``kBFloat16`` OneFlow 0.9.0 writes ``tensor.numpy()``, i.e. float32, and cannot load it
back: both sizes are accepted). ``flow.save`` of a compiled ``nn.Graph`` (0.9.0; the same code
in 0.6) writes this layout without ``snapshot_done``, plus ``model.mlir``; names are
``<graph attribute>.<parameter name>``.
A '/' in a name made nested directories, dots did not; names are the path below ``dir``.

Pickled directory (OneFlow 0.6 - 0.9 ``flow.save(obj, dir)``; 1.0 with
``save_as_external_data=True``): ``pickled_data`` = ``pickle.dumps({"protocol_version": 1,
[magic: None,] "data": obj})``; a tensor pickles (NEWOBJ of its class, then BUILD with its
``__getstate__``) as ``{"path": "tensor_<n>"}``, a sibling directory laid out as above.

Single file (OneFlow 1.0 ``flow.save(obj, file)``): the same dict with the magic key
``"__oneflow__"`` (``"oneflow"`` in the first builds that wrote single files); a tensor's state
is ``{"data": ndarray, "dtype": oneflow.dtype, "device": "cpu"}``, where ``oneflow.dtype``
(pybind11 ``py::pickle``) pickles as its ``DataType`` number.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np

from . import module_records
from .dtypes import ml_dtype, widen_bfloat16
from .errors import CheckpointError
from .files import inside, map_bytes, open_regular
from .safe_pickle import (CONTAINER_GLOBALS, NUMPY_GLOBALS, plain_array, rebuild,
                          restricted_load, short_repr)  # fmt: skip

SNAPSHOT_DONE, META, DATA, PICKLE = "snapshot_done", "meta", "out", "pickled_data"
MAGIC_KEYS = ("__oneflow__", "oneflow")
_META_LIMIT = 1 << 20
MAX_DIR_DEPTH = 64

# oneflow/core/common/data_type.proto: number -> (name, numpy dtype; "": holds no plain array)
_DATA_TYPES = {
    0: ("kInvalidDataType", ""), 1: ("kChar", "i1"), 2: ("kFloat", "<f4"), 3: ("kDouble", "<f8"),
    4: ("kInt8", "i1"), 5: ("kInt32", "<i4"), 6: ("kInt64", "<i8"), 7: ("kUInt8", "u1"),
    8: ("kOFRecord", ""), 9: ("kFloat16", "<f2"), 10: ("kTensorBuffer", ""),
    11: ("kBFloat16", "bfloat16"), 12: ("kBool", "?"), 13: ("kUInt16", "<u2"),
    14: ("kUInt32", "<u4"), 15: ("kUInt64", "<u8"), 16: ("kUInt128", ""), 17: ("kInt16", "<i2"),
    18: ("kInt128", ""), 19: ("kComplex32", ""), 20: ("kComplex64", "<c8"),
    21: ("kComplex128", "<c16"),
}  # fmt: skip
_BY_NAME = {name: code for code, (name, _) in _DATA_TYPES.items()}


class _Stub:
    """NEWOBJ makes an empty one, BUILD hands it the pickled state."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


class _Tensor(_Stub):
    """Stand-in for ``oneflow.Tensor`` / ``nn.Parameter``: the state ``tensor_getstate`` wrote."""


class _DType(_Stub):
    """Stand-in for ``oneflow.dtype``: the state is the ``DataType`` number."""


ONEFLOW_GLOBALS: dict[tuple[str, str], Any] = {
    # the C heap types of later releases: tensor.cpp sets __module__ "oneflow" / "oneflow.nn"
    ("oneflow", "Tensor"): _Tensor,
    ("oneflow.nn", "Parameter"): _Tensor,
    # earlier builds: pybind11 classes, named after the extension module
    ("oneflow._oneflow_internal", "Tensor"): _Tensor,
    ("oneflow._oneflow_internal.nn", "Parameter"): _Tensor,
    ("oneflow._oneflow_internal", "dtype"): _DType,
    **CONTAINER_GLOBALS,
    **NUMPY_GLOBALS,
}


def _numpy_dtype(code: Any, source: str) -> tuple[np.dtype, bool]:
    """DataType number -> (numpy dtype to read, raw bfloat16 bits to widen?)."""
    if not isinstance(code, int) or isinstance(code, bool) or code not in _DATA_TYPES:
        raise CheckpointError(f"{source}: unknown OneFlow data_type {code!r}")
    name, plain = _DATA_TYPES[code]
    if not plain:
        raise CheckpointError(f"{source}: OneFlow data_type {name} holds no plain array")
    if plain != "bfloat16":
        return np.dtype(plain), False
    bf16 = ml_dtype("bfloat16", source)
    return (bf16, False) if bf16 is not None else (np.dtype("<u2"), True)


# separators (',' ';') are optional in text format: read as blanks; junk fails in take()
_TOKEN = re.compile(
    r"[\s,;]+|#[^\n]*|([A-Za-z_]\w*)|(-?(?:0[xX][0-9a-fA-F]+|\d+))|([{}<>:\[\]])|(.)", re.S
)
_KINDS = (None, "a field name", "an integer", "punctuation", "junk")


def _parse_meta(text: str, source: str) -> tuple[tuple[int, ...], Any]:
    """Text-format ``VariableMetaInfo`` -> (shape, DataType number). Fields: ``shape``,
    ``data_type`` (enum name or number) and, in some versions, ``stride`` (ignored:
    ``out`` is always written C-contiguous by ``tensor.numpy().tobytes()``)."""
    tokens = [
        (_KINDS[m.lastindex], m.group(m.lastindex)) for m in _TOKEN.finditer(text) if m.lastindex
    ]
    tokens, pos, fields = tokens + [("end", "")], 0, {}

    def take(*want: str) -> tuple[str, str]:
        nonlocal pos
        kind, value = tokens[pos]
        if value not in want and kind not in want:
            raise CheckpointError(f"{source}: malformed meta: expected {' or '.join(want)}, "
                                  f"but found {value or 'the end'!r}")  # fmt: skip
        pos += 1
        return kind, value

    def integer() -> int:
        text = take("an integer")[1]
        return int(text, 16 if "x" in text.lower() else 10)

    while tokens[pos][0] != "end":
        name = take("a field name")[1]
        if name not in ("shape", "stride", "data_type") or name in fields:
            raise CheckpointError(f"{source}: malformed meta: unexpected or repeated "
                                  f"field {name!r}")  # fmt: skip
        if name == "data_type":
            take(":")
            if tokens[pos][0] == "an integer":
                fields[name] = integer()
            else:
                fields[name] = _BY_NAME.get(tokens[pos][1], tokens[pos][1])
                take("a field name")
        else:  # shape { dim: 2 dim: 3 }, also `shape: <dim: [2, 3]>`
            if tokens[pos][1] == ":":
                take(":")
            close = {"{": "}", "<": ">"}[take("{", "<")[1]]
            dims: list[int] = []
            while tokens[pos][1] != close:
                take("dim")
                take(":")
                if tokens[pos][1] == "[":
                    take("[")
                    while tokens[pos][1] != "]":
                        dims.append(integer())
                    take("]")
                else:
                    dims.append(integer())
            take(close)
            fields[name] = tuple(dims)
    if "data_type" not in fields:
        raise CheckpointError(f"{source}: malformed meta: no data_type")
    shape = fields.get("shape", ())  # protobuf may omit an empty shape {} (a scalar)
    if len(shape) > 64 or any(d < 0 for d in shape):
        raise CheckpointError(f"{source}: meta declares an invalid shape {list(shape)}")
    return shape, fields["data_type"]


def _read_variable(var_dir: str, real_root: str) -> np.ndarray:
    """One ``meta`` + ``out`` directory -> an array (a read-only memory map when non-empty)."""
    meta_path, out_path = os.path.join(var_dir, META), os.path.join(var_dir, DATA)
    for path in (meta_path, out_path):
        if not inside(real_root, path):
            raise CheckpointError(f"{path}: a symlink that leaves the checkpoint directory")
    f, size = open_regular(meta_path, "the variable's shape and data_type")
    with f:
        if size > _META_LIMIT:
            raise CheckpointError(f"{meta_path}: implausibly large for a meta file")
        try:
            text = f.read(_META_LIMIT).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{meta_path}: malformed meta: not UTF-8 text") from None
        except OSError as error:
            raise CheckpointError(f"{meta_path}: cannot be read ({error.strerror})") from None
    shape, code = _parse_meta(text, meta_path)
    dtype, bf16_bits = _numpy_dtype(code, meta_path)
    out, size = open_regular(out_path, "the variable's data")
    numel = math.prod(shape)
    f32_bf16 = code == _BY_NAME["kBFloat16"] and numel > 0 and size == numel * 4
    if f32_bf16:  # OneFlow 0.9.0 writes a bfloat16 tensor's numpy(): float32
        dtype, bf16_bits = np.dtype("<f4"), False
    if numel * dtype.itemsize != size:  # checked before anything is mapped or allocated
        raise CheckpointError(
            f"{out_path}: meta declares shape {list(shape)} of {_DATA_TYPES[code][0]} "
            f"({numel * dtype.itemsize} bytes), but the file holds {size} bytes"
            + (" (truncated)" if size < numel * dtype.itemsize else "")
        )
    with out:
        _, raw = map_bytes(out, size, out_path)
    try:
        array = raw.view(dtype).reshape(shape)
    except ValueError as error:
        raise CheckpointError(f"{out_path}: cannot be mapped as {list(shape)} ({error})") from None
    if not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    if f32_bf16:  # exact: the values came from bfloat16; stay float32 without ml_dtypes
        bf16 = ml_dtype("bfloat16", out_path)
        return array.astype(bf16) if bf16 is not None else array
    return widen_bfloat16(array, out_path) if bf16_bits else array


def _walk(root: str):
    """``os.walk`` in sorted order without recursion (symlinked directories are not
    entered), refusing folders nested deeper than MAX_DIR_DEPTH."""
    todo = [(root, 0)]
    while todo:
        folder, depth = todo.pop()
        if depth > MAX_DIR_DEPTH:
            raise CheckpointError(f"{folder}: folders nested more than {MAX_DIR_DEPTH} deep")
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            raise CheckpointError(f"{folder}: cannot be listed ({error.strerror})") from None
        dirs = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        files = [e.name for e in entries if not e.is_dir(follow_symlinks=False)]
        yield folder, dirs, files
        todo.extend((os.path.join(folder, d), depth + 1) for d in reversed(dirs))


def _read_legacy(root: str) -> tuple[dict[str, Any], dict]:
    real_root, tensors = os.path.realpath(root), {}
    for dirpath, dirnames, filenames in _walk(root):
        for entry in dirnames + filenames:
            full = os.path.join(dirpath, entry)
            if os.path.islink(full) and not inside(real_root, full):
                raise CheckpointError(f"{full}: a symlink that leaves the checkpoint "
                                      f"directory {root}")  # fmt: skip
        if DATA in filenames:
            rel = os.path.relpath(dirpath, root)
            name = os.path.basename(real_root) if rel == "." else rel.replace(os.sep, "/")
            tensors[name] = _read_variable(dirpath, real_root)
    done = os.path.exists(os.path.join(root, SNAPSHOT_DONE))
    if not tensors and not done:
        raise CheckpointError(f"{root}: not a OneFlow checkpoint (no variables, no snapshot_done)")
    return dict(sorted(tensors.items())), {"format": "oneflow-legacy", "snapshot_done": done}


def _tensor_array(item: Any, base_dir: str | None, source: str) -> Any:
    """A tensor stand-in -> its array; anything else unchanged."""
    if not isinstance(item, _Tensor):
        return item
    state = item.state
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: a tensor's pickled state is "
                              f"{type(state).__name__}, not a dict")  # fmt: skip
    if "path" in state:
        rel = state["path"]
        if base_dir is None:
            raise CheckpointError(f"{source}: a tensor refers to the directory {short_repr(rel)}, "
                                  "but a single-file checkpoint has none")  # fmt: skip
        real_root = os.path.realpath(base_dir)
        if (not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel)
                or ".." in re.split(r"[\\/]", rel)
                or not inside(real_root, os.path.join(base_dir, rel))):  # fmt: skip
            raise CheckpointError(f"{source}: refusing the tensor path {short_repr(rel)}: it must name "
                                  f"a directory inside {base_dir}")  # fmt: skip
        return _read_variable(os.path.join(base_dir, rel), real_root)
    data = plain_array(state.get("data"), source)
    if not isinstance(data, np.ndarray):
        raise CheckpointError(f"{source}: a tensor's state has neither 'path' nor an array "
                              f"'data' (keys {sorted(map(short_repr, state))})")  # fmt: skip
    if isinstance(state.get("dtype"), _DType):  # OneFlow rebuilds flow.tensor(data, dtype=dtype)
        dtype, bf16_bits = _numpy_dtype(state["dtype"].state, source)
        try:
            data = data.astype(np.float32 if bf16_bits else dtype.newbyteorder("="), copy=False)
        except (TypeError, ValueError) as error:
            raise CheckpointError(
                f"{source}: a {data.dtype} tensor is not {dtype} ({error})"
            ) from None
    return data


def _read_pickle(path: str, base_dir: str | None) -> tuple[Any, dict]:
    f, size = open_regular(path, "the pickled object")
    with f:
        buffer, _ = map_bytes(f, size, path)
    obj, modules = module_records.load_modules(
        lambda table: restricted_load(buffer, path, table), buffer, ONEFLOW_GLOBALS)
    magic = next((k for k in MAGIC_KEYS if isinstance(obj, dict) and k in obj), None)
    if not isinstance(obj, dict) or "data" not in obj or (base_dir is None and magic is None):
        raise CheckpointError(f"{path}: not a OneFlow pickle (expected a dict with "
                              "'protocol_version', the '__oneflow__' key and 'data')")  # fmt: skip
    if obj.get("protocol_version") != 1:
        raise CheckpointError(f"{path}: unsupported OneFlow protocol_version "
                              f"{short_repr(obj.get('protocol_version'))} (expected 1)")  # fmt: skip
    data, specs = obj["data"], {}
    if modules:  # flow.save(module): the module tree as records, its state_dict() kept
        data, specs, _ = module_records.replace_modules(data, lambda x: isinstance(x, _Tensor))
    data = rebuild(data, lambda item: _tensor_array(item, base_dir, path), path)
    kind = "oneflow-pickle" if base_dir is None else "oneflow-pickled-dir"
    meta = {"format": kind, "protocol_version": 1, "magic_key": magic}
    return data, {**meta, "_specs": specs} if modules else meta


def read_oneflow(path: str) -> tuple[Any, dict]:
    """(the saved object with tensors as ndarrays, {"format": ..., ...})."""
    path = os.fspath(path)
    if os.path.isdir(path):
        pickled = os.path.join(path, PICKLE)
        if not os.path.lexists(pickled):
            return _read_legacy(path)
        if not inside(os.path.realpath(path), pickled):
            raise CheckpointError(f"{pickled}: a symlink that leaves the checkpoint directory")
        return _read_pickle(pickled, path)
    return _read_pickle(path, None)


def is_oneflow_checkpoint(path: str) -> bool:
    """Cheap sniff: a directory with ``pickled_data``, ``snapshot_done`` or ``meta`` + ``out``
    variables, or a file whose pickle starts like ``flow.save``'s single file."""
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            names = sorted(os.listdir(path))
            if PICKLE in names or SNAPSHOT_DONE in names or {META, DATA} <= set(names):
                return True
            return any(os.path.isfile(os.path.join(path, n, META))
                       and os.path.isfile(os.path.join(path, n, DATA)) for n in names[:64])  # fmt: skip
        f, _ = open_regular(path)  # never blocks on a FIFO, never reads a device
        with f:
            head = f.read(256)
    except (OSError, CheckpointError):
        return False
    # {"protocol_version": 1, "__oneflow__": None, ...}: the keys come first, as
    # SHORT_BINUNICODE (protocol >= 4) or BINUNICODE strings
    return (head.startswith(b"\x80") and b"protocol_version" in head
            and re.search(rb"[\x8cX](?:\x0b(?:\0\0\0)?__oneflow__|\x07(?:\0\0\0)?oneflow)", head)
            is not None)  # fmt: skip
