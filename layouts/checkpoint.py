"""``load_checkpoint``: sniff a file's format, read it safely, and flatten it to
``name -> ndarray``.

| format | detected by | framework (layout) |
| --- | --- | --- |
| PyTorch zip | ``PK\\x03\\x04`` | torch |
| PyTorch legacy | a pickle of the magic number 0x1950a86a20f9469cfc6c | torch |
| safetensors | 8-byte header length, then ``{`` | ``__metadata__['layout']``, else torch |
| ONNX | ``.onnx`` suffix | onnx |
| OneFlow | directory (``snapshot_done`` / ``pickled_data``) or v1.0 pickle | oneflow |
| MegEngine ``.pkl`` | any other pickle | megengine |

Nested checkpoints (``{"state_dict": ...}``, ``{"model": ...}``) are
unwrapped, a ``module.`` prefix on every name is dropped, nested dicts are
joined with dots, and scalar entries (epoch, step, ...) go to ``metadata``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import megengine_format, onnx_format, safetensors_format, torch_format
from .adapters import FRAMEWORKS
from .errors import CheckpointError
from .files import open_regular
from .roles import ParamSpec
from .safe_pickle import MAX_DEPTH, short_repr

_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params", "weights")


@dataclass
class Checkpoint:
    """Flat tensors in ``framework``'s layout, plus what else the file said."""

    tensors: dict[str, np.ndarray]
    framework: str
    metadata: dict[str, Any] = field(default_factory=dict)
    specs: dict[str, ParamSpec] = field(default_factory=dict)  # roles the file's structure gives


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray)


def _scalar(value: Any) -> bool:
    return (
        isinstance(value, (str, int, float, bool)) or value is None or isinstance(value, np.generic)
    )


def flatten(obj: Any, source: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A saved object -> (flat tensors, scalar metadata)."""
    metadata: dict[str, Any] = {}
    if isinstance(obj, dict):
        nested = [k for k in _STATE_KEYS if isinstance(obj.get(k), dict)]
        if nested and not any(_is_array(v) for v in obj.values()):
            metadata = {k: v for k, v in obj.items() if _scalar(v)}
            obj = obj[nested[0]]
    tensors: dict[str, np.ndarray] = {}
    todo: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while todo:  # depth-first, in order, without recursion
        item, prefix, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise CheckpointError(f"{source}: the saved object is nested more than {MAX_DEPTH} deep")
        if _is_array(item):
            if item.dtype.hasobject:  # defence in depth: readers never build these
                raise CheckpointError(f"{source}: tensor {prefix!r} holds Python objects")
            tensors[prefix] = item
        elif isinstance(item, dict):
            children = [(v, f"{prefix}.{k}" if prefix else str(k)) for k, v in item.items()]
            todo.extend((v, name, depth + 1) for v, name in reversed(children))
        elif isinstance(item, (list, tuple)) and any(
            _is_array(v) or isinstance(v, dict) for v in item
        ):
            children = [(v, f"{prefix}.{i}" if prefix else str(i)) for i, v in enumerate(item)]
            todo.extend((v, name, depth + 1) for v, name in reversed(children))
        elif prefix and _scalar(item):
            metadata.setdefault(prefix, item)
    if not tensors:
        raise CheckpointError(f"{source}: the file holds no tensors")
    if all(name.startswith("module.") for name in tensors):
        tensors = {name[len("module.") :]: value for name, value in tensors.items()}
    return tensors, metadata


def _oneflow():
    from . import oneflow_format  # noqa: PLC0415 - imported where needed

    return oneflow_format


def sniff(path: str) -> str:
    """The format name of ``path``: torch-zip, torch-legacy, safetensors, onnx, oneflow, pickle."""
    if os.path.isdir(path):
        if _oneflow().is_oneflow_checkpoint(path):
            return "oneflow"
        raise CheckpointError(f"{path}: a directory, but not a OneFlow checkpoint")
    f, _ = open_regular(path)
    with f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if (
        head.startswith(b"\x80\x02\x8a\x0a")
        and int.from_bytes(head[4:14], "little") == torch_format.LEGACY_MAGIC
    ):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if str(path).endswith(".onnx"):
        return "onnx"
    if head.startswith(b"\x80"):
        return "oneflow" if _oneflow().is_oneflow_checkpoint(path) else "pickle"
    raise CheckpointError(f"{path}: unrecognised checkpoint format (first bytes {head[:8]!r})")


def load_checkpoint(path: str | os.PathLike, framework: str | None = None) -> Checkpoint:
    """Read any supported checkpoint; ``framework`` overrides the layout the format implies.

    >>> import numpy as np, tempfile, os
    >>> from layouts.safetensors_format import write_safetensors
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> write_safetensors({"conv.weight": np.ones((2, 1, 3, 3), np.float32)}, path)
    >>> ckpt = load_checkpoint(path)
    >>> ckpt.framework, ckpt.tensors["conv.weight"].shape
    ('torch', (2, 1, 3, 3))
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"load_checkpoint: path must be a str or os.PathLike, but got {type(path).__name__}"
        )
    if framework is not None and framework not in FRAMEWORKS:
        raise ValueError(
            f"load_checkpoint: framework must be one of {FRAMEWORKS} or None, but got framework={framework!r}"
        )
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"load_checkpoint: no such file or directory: {path!r}")
    try:
        return read_checkpoint(path, framework)
    except CheckpointError:
        raise
    except Exception as error:  # a reader bug must still be a CheckpointError
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}: "
                              f"{short_repr(str(error))})") from error  # fmt: skip


def read_checkpoint(path: str, framework: str | None = None) -> Checkpoint:
    """:func:`load_checkpoint` without its last-resort conversion of unexpected errors
    (the fuzzer calls this one: anything but a CheckpointError is a bug to fix)."""
    kind = sniff(path)
    if kind == "safetensors":
        tensors, meta = safetensors_format.read_safetensors(path)
        layout = meta.get("layout", "torch")
        header = {("safetensors_format" if k == "format" else k): v for k, v in meta.items()}
        return Checkpoint(
            tensors,
            framework or (layout if layout in FRAMEWORKS else "torch"),
            {**header, "format": "safetensors"},
        )
    if kind == "onnx":
        tensors, meta = onnx_format.read_onnx(path)
        specs = meta.pop("_specs", {})
        return Checkpoint(tensors, framework or "onnx", meta, specs)
    if kind == "torch-zip":
        obj, meta = torch_format.read_torch_zip(path)
        implied = "torch"
    elif kind == "torch-legacy":
        obj, meta = torch_format.read_torch_legacy(path)
        implied = "torch"
    elif kind == "oneflow":
        obj, meta = _oneflow().read_oneflow(path)
        implied = "oneflow"
    else:
        obj, meta = megengine_format.read_megengine(path)
        implied = "megengine"
    specs = meta.pop("_specs", {})
    tensors, extra = flatten(obj, path)
    return Checkpoint(tensors, framework or implied, {**extra, **meta}, _aligned(specs, tensors))


def _aligned(specs: dict[str, ParamSpec], tensors: dict) -> dict[str, ParamSpec]:
    """Specs keyed by the path in the saved object -> keyed by the flattened tensor names
    (which drop an unwrapped ``{"model": ...}`` key and a ``module.`` prefix)."""
    out = {}
    for key, spec in specs.items():
        tail = key.partition(".")[2]
        for name in (key, tail, key.removeprefix("module."), tail.removeprefix("module.")):
            if name in tensors:
                out[name] = spec
                break
    return out
