"""ONNX models: their initializers (the weights), read with the optional ``onnx`` package
(``pip install mconv[onnx]``). ONNX's Conv weight is ``(M, C/group, *k)`` and
ConvTranspose's ``(C, M/group, *k)``: PyTorch's layouts."""

from __future__ import annotations

import os

import numpy as np

from .errors import CheckpointError


def read_onnx(path: str) -> tuple[dict[str, np.ndarray], dict]:
    source = str(path)
    try:
        import onnx  # noqa: PLC0415 - optional dependency
        from onnx import numpy_helper  # noqa: PLC0415
    except ImportError:
        raise CheckpointError(
            f"{source}: reading ONNX needs the onnx package (pip install mconv[onnx])"
        ) from None
    try:
        model = onnx.load(source, load_external_data=False)
    except Exception as error:  # protobuf raises DecodeError & co on a corrupted file
        raise CheckpointError(
            f"{source}: not a readable ONNX model ({type(error).__name__}: {error})"
        ) from None
    base = os.path.dirname(os.path.abspath(source))
    tensors = {}
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            _load_external(init, base, source)
        try:
            tensors[init.name] = numpy_helper.to_array(init)
        except Exception as error:
            raise CheckpointError(
                f"{source}: initializer {init.name!r} is corrupted ({error})"
            ) from None
    producer = f"{model.producer_name} {model.producer_version}".strip()
    return tensors, {
        "format": "onnx",
        "producer": producer,
        "opset": str(model.opset_import[0].version) if model.opset_import else "",
    }


def _load_external(init, base: str, source: str) -> None:
    """External data must live inside the model's directory (no path traversal)."""
    info = {entry.key: entry.value for entry in init.external_data}
    location = info.get("location", "")
    target = os.path.realpath(os.path.join(base, location))
    if not location or os.path.isabs(location) or not target.startswith(base + os.sep):
        raise CheckpointError(
            f"{source}: initializer {init.name!r} points outside the model's directory: {location!r}"
        )
    offset, length = int(info.get("offset", 0)), info.get("length")
    size = os.path.getsize(target) if os.path.isfile(target) else -1
    length = int(length) if length is not None else size - offset
    if size < 0 or offset < 0 or length < 0 or offset + length > size:
        raise CheckpointError(
            f"{source}: external data for {init.name!r} is missing or out of range"
        )
    with open(target, "rb") as f:
        f.seek(offset)
        init.raw_data = f.read(length)
    del init.external_data[:]
    init.data_location = 0
