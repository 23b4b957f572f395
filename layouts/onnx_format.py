"""ONNX models: their weights (initializers and ``Constant`` nodes, in the main graph and
every subgraph), read with the optional ``onnx`` package (``pip install mconv[onnx]``),
and each weight's role from the nodes that use it. ONNX's Conv weight is
``(M, C/group, *k)`` and ConvTranspose's ``(C, M/group, *k)``: PyTorch's layouts;
BatchNormalization's scale, B, mean and var are ``(C,)``; Gemm's B with ``transB=1`` is a
Linear weight ``(N, K)``."""

from __future__ import annotations

import math
import os

import numpy as np

from .errors import CheckpointError
from .files import inside, open_regular
from .roles import ParamSpec

MAX_GRAPHS = 10_000


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
    tensors: dict[str, np.ndarray] = {}
    specs: dict[str, ParamSpec] = {}
    for graph in _graphs(model.graph, source):
        for init in graph.initializer:
            tensors[init.name] = _array(init, init.name, base, onnx, helper, numpy_helper, source)
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None and value.ByteSize():
                    tensors[node.output[0]] = _array(value, node.output[0], base, onnx, helper,
                                                     numpy_helper, source)  # fmt: skip
    for graph in _graphs(model.graph, source):
        for node in graph.node:
            specs.update(_node_roles(node, tensors))
    producer = f"{model.producer_name} {model.producer_version}".strip()
    return tensors, {
        "format": "onnx",
        "producer": producer,
        "opset": str(model.opset_import[0].version) if model.opset_import else "",
        "_specs": specs,
    }


def _graphs(graph, source: str):
    """The main graph and every subgraph (If / Loop / Scan bodies), without recursion."""
    todo, count = [graph], 0
    while todo:
        graph = todo.pop()
        count += 1
        if count > MAX_GRAPHS:
            raise CheckpointError(f"{source}: more than {MAX_GRAPHS} (sub)graphs")
        yield graph
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    todo.append(attr.g)
                todo.extend(attr.graphs)


def _array(proto, name: str, base: str, onnx, helper, numpy_helper, source: str) -> np.ndarray:
    if proto.data_location == onnx.TensorProto.EXTERNAL:
        _load_external(proto, base, source)
    proto.name = proto.name or name
    _check_initializer(proto, helper, source)
    try:
        array = numpy_helper.to_array(proto)
    except Exception as error:
        raise CheckpointError(f"{source}: tensor {name!r} is corrupted ({error})") from None
    if array.dtype.hasobject:  # defence in depth: _check_initializer refuses STRING
        raise CheckpointError(f"{source}: tensor {name!r} holds Python objects")
    return array


def _int_attr(node, name: str, default: int) -> int:
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _node_roles(node, tensors: dict) -> dict[str, ParamSpec]:
    """Roles of the weights one node uses: Conv, ConvTranspose, BatchNormalization, Gemm."""
    inputs = list(node.input)
    evidence = f"ONNX {node.op_type} node"
    if node.op_type in ("Conv", "ConvTranspose") and len(inputs) >= 2 and inputs[1] in tensors:
        w = tensors[inputs[1]]
        groups = _int_attr(node, "group", 1)
        if groups < 1 or w.ndim < 3:
            return {}
        if node.op_type == "ConvTranspose":
            kind = "conv_transpose"
        else:
            kind = "depthwise" if groups > 1 and w.shape[1] == 1 else "conv"
        out = {inputs[1]: ParamSpec("conv_weight", kind, groups, w.ndim - 2, evidence)}
        if len(inputs) >= 3 and inputs[2] in tensors:
            out[inputs[2]] = ParamSpec("conv_bias", ndim=w.ndim - 2, evidence=evidence)
        return out
    if node.op_type == "BatchNormalization":
        roles = ("bn_weight", "bn_bias", "bn_stat", "bn_stat")
        return {n: ParamSpec(r, evidence=evidence) for n, r in zip(inputs[1:5], roles)
                if n in tensors}  # fmt: skip
    if node.op_type == "Gemm" and len(inputs) >= 2 and inputs[1] in tensors:
        if _int_attr(node, "transB", 0) == 1 and tensors[inputs[1]].ndim == 2:  # B is (N, K)
            return {inputs[1]: ParamSpec("linear_weight", evidence=evidence)}
        return {inputs[1]: ParamSpec("other", evidence=f"{evidence} without transB")}
    return {}


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
