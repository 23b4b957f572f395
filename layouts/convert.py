"""``mconv convert`` and ``mconv inspect``: checkpoints in any readable format to
safetensors (any layout) or a MegEngine-style ``.pkl``; a table of a file's tensors."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import Any, Mapping, TextIO

import numpy as np

from .checkpoint import load_checkpoint
from .dtypes import is_floating
from .megengine_format import write_numpy_pickle
from .transfer import (
    PARAMS_KEY, ParamSpec, from_torch_param, infer_specs, safetensors_metadata,
    specs_from_metadata, to_torch_param,
)  # fmt: skip
from .safetensors_format import write_safetensors

PROGRESS_MIN_BYTES = 64 * 1024 * 1024
CAST_DTYPES = ("float16", "float32", "float64", "bfloat16")


class Progress:
    """A one-line progress bar on stderr, shown only for large jobs."""

    def __init__(
        self, total_bytes: int, label: str, stream: TextIO | None = None, force: bool = False
    ):
        self.total, self.done, self.label = max(total_bytes, 1), 0, label
        self.stream = stream or sys.stderr
        self.enabled = force or total_bytes >= PROGRESS_MIN_BYTES

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.enabled:
            filled = int(30 * self.done / self.total)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                              f"{100 * self.done // self.total:3d}% {self.done / 2**20:.0f}/"
                              f"{self.total / 2**20:.0f} MiB")  # fmt: skip
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")


def _float_dtype(name: str | None) -> np.dtype | None:
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415 - only for --dtype bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return None if name is None else np.dtype(name)


def convert(src: str, dst: str, from_framework: str | None = None, to_framework: str = "torch",
            dtype: str | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
            progress: bool = False) -> dict[str, np.ndarray]:  # fmt: skip
    """Read ``src``, convert every tensor to ``to_framework``'s layout, write ``dst``
    (``.safetensors`` or ``.pkl``). Returns the written tensors."""
    if not dst.endswith((".safetensors", ".pkl")):
        raise ValueError(f"convert: DST must end in .safetensors or .pkl, but got {dst!r}")
    if dtype is not None and dtype not in CAST_DTYPES:
        raise ValueError(f"convert: dtype must be one of {CAST_DTYPES}, but got dtype={dtype!r}")
    ckpt = load_checkpoint(src, from_framework)
    specs = {**infer_specs(ckpt.tensors, ckpt.framework), **specs_from_metadata(ckpt.metadata)}
    for name, fields in (overrides or {}).items():  # e.g. {"conv.weight": {"groups": 4}}
        if name not in specs:
            raise ValueError(f"convert: no tensor named {name!r} in {src} (for --groups/--kind)")
        specs[name] = replace(specs[name], role="conv_weight", **fields)
    out = {}
    for name, array in ckpt.tensors.items():  # views: nothing is copied yet
        out[name] = from_torch_param(
            to_torch_param(array, specs[name], ckpt.framework), specs[name], to_framework
        )
    target = _float_dtype(dtype)

    def written(a: np.ndarray) -> int:
        return a.size * (
            target.itemsize if target is not None and is_floating(a.dtype) else a.itemsize
        )

    bar = Progress(sum(map(written, out.values())), "converting", force=progress)
    if dst.endswith(".pkl"):
        if target is not None:
            out = {k: v.astype(target) if is_floating(v.dtype) else v for k, v in out.items()}
        write_numpy_pickle(out, dst)
        bar.advance(bar.total)
    else:
        meta = safetensors_metadata(specs, to_framework)
        write_safetensors(out, dst, meta, target, progress=bar.advance)
    bar.close()
    return out


def inspect(path: str, framework: str | None = None, stream: TextIO | None = None) -> None:
    """Print the file's format, layout, metadata and a table of its tensors."""
    stream = stream or sys.stdout
    ckpt = load_checkpoint(path, framework)
    specs = {**infer_specs(ckpt.tensors, ckpt.framework), **specs_from_metadata(ckpt.metadata)}
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    stream.write(f"file       {path} ({size / 2**20:.1f} MiB)\n")
    stream.write(f"format     {ckpt.metadata.get('format', '?')}\n")
    stream.write(f"framework  {ckpt.framework} (layout of the tensors below)\n")
    for key, value in ckpt.metadata.items():
        if key not in ("format", PARAMS_KEY):
            stream.write(f"meta       {key} = {value}\n")
    rows = [(name, str(tuple(a.shape)), str(a.dtype), _describe(specs.get(name)))
            for name, a in ckpt.tensors.items()]  # fmt: skip
    widths = [
        max(len(h), *(len(r[i]) for r in rows))
        for i, h in enumerate(("name", "shape", "dtype", "kind"))
    ]
    for row in [("name", "shape", "dtype", "kind"), *rows]:
        stream.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    total = sum(a.size for a in ckpt.tensors.values())
    stream.write(f"{len(rows)} tensors, {total:,} elements\n")


def _describe(spec: ParamSpec | None) -> str:
    if spec is None or spec.role == "other":
        return ""
    if spec.role == "conv_weight":
        return f"{spec.kind} {spec.ndim}d" + (f" groups={spec.groups}" if spec.groups > 1 else "")
    return spec.role.replace("_", " ")
