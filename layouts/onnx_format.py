"""ONNX models: their initializers (the weights), read with the optional ``onnx`` package
(``pip install mconv[onnx]``). ONNX's Conv weight is ``(M, C/group, *k)`` and
ConvTranspose's ``(C, M/group, *k)``: PyTorch's layouts."""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import CheckpointError
from .files import inside, open_regular


# TensorProto data types holding plain numbers (not STRING, not sub-byte types)
_NUMERIC = {1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20}
_COMPLEX = {14, 15}


def read_onnx(path: str) -> tuple[dict[str, np.ndarray], dict]:
    source = str(path)
    try:
        import onnx  # noqa: PLC0415 - optional dependency
        from onnx import helper, numpy_helper  # noqa: PLC0415
    except ImportError:
        raise CheckpointError(
            f"{source}: reading ONNX needs the onnx package (pip install mconv[onnx])"
        ) from None
    f, size = open_regular(path)  # onnx.load(path) would read a FIFO or /dev/zero forever
    with f:
        raw = f.read(size)
    try:
        model = onnx.load_model_from_string(raw)
    except Exception as error:  # protobuf raises DecodeError & co on a corrupted file
        raise CheckpointError(
            f"{source}: not a readable ONNX model ({type(error).__name__}: {error})"
        ) from None
    base = os.path.dirname(os.path.abspath(source))
    tensors = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            _load_external(init, base, source)
        _check_initializer(init, helper, source)
        try:
            array = numpy_helper.to_array(init)
        except Exception as error:
            raise CheckpointError(
                f"{source}: initializer {init.name!r} is corrupted ({error})"
            ) from None
        if array.dtype.hasobject:  # defence in depth: _check_initializer refuses STRING
            raise CheckpointError(f"{source}: initializer {init.name!r} holds Python objects")
        tensors[init.name] = array
    producer = f"{model.producer_name} {model.producer_version}".strip()
    return tensors, {
        "format": "onnx",
        "producer": producer,
        "opset": str(model.opset_import[0].version) if model.opset_import else "",
    }


def _check_initializer(init, helper, source: str) -> None:
    """A numeric type, and as many bytes (or typed values) as its dims declare, before
    numpy_helper allocates anything."""
    if init.data_type not in _NUMERIC:
        raise CheckpointError(f"{source}: initializer {init.name!r} has data type "
                              f"{init.data_type}, not a plain numeric type")  # fmt: skip
    dims = list(init.dims)
    if len(dims) > 64 or any(d < 0 for d in dims):
        raise CheckpointError(f"{source}: initializer {init.name!r} has invalid dims {dims}")
    numel = math.prod(dims)
    if init.raw_data:
        itemsize = helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        have, need = len(init.raw_data), numel * itemsize
    else:
        have = sum(len(field) for field in (init.float_data, init.int32_data, init.int64_data,
                                             init.double_data, init.uint64_data))  # fmt: skip
        need = numel * (2 if init.data_type in _COMPLEX else 1)
    if have != need:
        raise CheckpointError(f"{source}: initializer {init.name!r} of dims {dims} needs {need} "
                              f"{'bytes' if init.raw_data else 'values'}, but holds {have}")  # fmt: skip


def _load_external(init, base: str, source: str) -> None:
    """External data must be a regular file inside the model's directory (no path traversal)."""
    info = {entry.key: entry.value for entry in init.external_data}
    location = info.get("location", "")
    target = os.path.realpath(os.path.join(base, location))
    if not location or os.path.isabs(location) or not inside(os.path.realpath(base), target):
        raise CheckpointError(
            f"{source}: initializer {init.name!r} points outside the model's directory: {location!r}"
        )
    f, size = open_regular(target, f"external data of {init.name!r}")
    with f:
        try:
            offset = int(info.get("offset", 0))
            length = int(info.get("length", size - offset))
        except ValueError:
            raise CheckpointError(f"{source}: external data for {init.name!r} has a malformed "
                                  "offset or length") from None  # fmt: skip
        if offset < 0 or length < 0 or offset + length > size:
            raise CheckpointError(f"{source}: external data for {init.name!r} (offset {offset}, "
                                  f"length {length}) is out of range of its {size}-byte file")  # fmt: skip
        f.seek(offset)
        init.raw_data = f.read(length)
    del init.external_data[:]
    init.data_location = 0
