"""``mconv convert`` and ``mconv inspect``: checkpoints in any readable format to
safetensors (any layout) or a MegEngine-style ``.pkl``; a table of a file's tensors and
what is known of each (``--spec-out`` writes it as a spec to edit).

Each tensor's role comes from the best evidence (:mod:`layouts.roles`): the file's own
structure (ONNX graph, pickled modules, TorchScript code), mconv's metadata, the user's
``--spec`` / ``--groups`` / ``--kind``, then certain shape facts. A conversion that depends
on something still unknown is refused before anything is written.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Mapping, TextIO

import numpy as np

from .checkpoint import Checkpoint, load_checkpoint
from .dtypes import is_floating
from .errors import CheckpointError
from .megengine_format import write_numpy_pickle
from .params import PARAMS_KEY, convert_state, safetensors_metadata, specs_from_metadata
from .roles import BN_ROLES, ParamSpec, describe, merge, shape_facts
from .safetensors_format import write_safetensors
from .spec_file import read_spec, write_spec

PROGRESS_MIN_BYTES = 64 * 1024 * 1024
CAST_DTYPES = ("float16", "float32", "float64", "bfloat16")


class Progress:
    """A one-line progress bar on stderr for large jobs (or ``force``), redrawn only when
    the shown percentage changes: at most 101 updates, whatever the number of tensors."""

    def __init__(
        self, total_bytes: int, label: str, stream: TextIO | None = None, force: bool = False
    ):
        self.total, self.done, self.label = max(total_bytes, 1), 0, label
        self.stream = stream or sys.stderr
        self.enabled = force or total_bytes >= PROGRESS_MIN_BYTES
        self.shown = -1

    def advance(self, nbytes: int) -> None:
        self.done = min(self.done + nbytes, self.total)
        percent = 100 * self.done // self.total
        if self.enabled and percent != self.shown:
            self.shown = percent
            filled = int(30 * self.done / self.total)
            self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
                              f"{percent:3d}% {self.done / 2**20:.0f}/"
                              f"{self.total / 2**20:.0f} MiB")  # fmt: skip
            self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.advance(self.total - self.done)
            self.stream.write("\n")


def _float_dtype(name: str | None) -> np.dtype | None:
    if name == "bfloat16":
        import ml_dtypes  # noqa: PLC0415 - only for --dtype bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return None if name is None else np.dtype(name)


def _override_specs(ckpt: Checkpoint, overrides: Mapping[str, Mapping[str, Any]],
                    source: str) -> dict[str, ParamSpec]:  # fmt: skip
    """``--groups NAME=G`` / ``--kind NAME=K``: conv weights only (>= 3 dimensions)."""
    specs = {}
    bn = {n for n, s in shape_facts(ckpt.tensors, ckpt.framework).items() if s.role in
          set(BN_ROLES.values())}  # fmt: skip
    for name, fields in overrides.items():
        if name not in ckpt.tensors:
            raise ValueError(f"convert: no tensor named {name!r} in {source} (for --groups/--kind)")
        shape = list(ckpt.tensors[name].shape)
        if len(shape) < 3 or name in bn:
            what = "a BatchNorm tensor" if name in bn else f"of size {shape}"
            option = " / ".join(f"--{k} {name}={v}" for k, v in fields.items())
            raise ValueError(f"convert: --groups and --kind apply to conv weights (3 or more "
                             f"dimensions), but {name} is {what}: got {option}")  # fmt: skip
        specs[name] = ParamSpec("conv_weight", fields.get("kind"), fields.get("groups"),
                                evidence="--groups/--kind")  # fmt: skip
    return specs


def file_specs(ckpt: Checkpoint, spec: str | os.PathLike | None = None,
               overrides: Mapping[str, Mapping[str, Any]] | None = None,
               source: str = "the checkpoint") -> dict[str, ParamSpec]:  # fmt: skip
    """Every tensor's spec from the evidence, best first: the file's structure, mconv's
    metadata, ``--groups``/``--kind``, the ``--spec`` file, shape facts."""
    shapes = shape_facts(ckpt.tensors, ckpt.framework)
    return merge([
        ("the file's structure", ckpt.specs),
        ("mconv metadata", specs_from_metadata(ckpt.metadata)),
        ("--groups/--kind", _override_specs(ckpt, overrides or {}, source)),
        ("--spec", read_spec(spec, ckpt.tensors, shapes) if spec is not None else {}),
        ("shape", shapes),
    ], ckpt.tensors)  # fmt: skip


def convert(src: str, dst: str, from_framework: str | None = None, to_framework: str = "torch",
            dtype: str | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
            progress: bool = False, spec: str | os.PathLike | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """Read ``src``, convert every tensor to ``to_framework``'s layout, write ``dst``
    (``.safetensors`` or ``.pkl``). Returns the written tensors (before ``dtype``). Raises
    :class:`CheckpointError` naming every tensor whose conversion depends on something
    unknown; nothing is written then."""
    if not dst.endswith((".safetensors", ".pkl")):
        raise ValueError(f"convert: DST must end in .safetensors or .pkl, but got {dst!r}")
    if dtype is not None and dtype not in CAST_DTYPES:
        raise ValueError(f"convert: dtype must be one of {CAST_DTYPES}, but got dtype={dtype!r}")
    ckpt = load_checkpoint(src, from_framework)
    specs = file_specs(ckpt, spec, overrides, src)
    what = f"convert: {src} ({ckpt.framework} layout) to the {to_framework} layout"
    out, out_specs = convert_state(ckpt.tensors, specs, ckpt.framework, to_framework, what)
    target = _float_dtype(dtype)

    def written(a: np.ndarray) -> int:
        return a.size * (
            target.itemsize if target is not None and is_floating(a.dtype) else a.itemsize
        )

    bar = Progress(sum(map(written, out.values())), "converting", force=progress)
    if dst.endswith(".pkl"):
        write_numpy_pickle(out, dst, target, progress=bar.advance)
    else:
        meta = safetensors_metadata(out_specs, to_framework)
        write_safetensors(out, dst, meta, target, progress=bar.advance)
    bar.close()
    return out


def inspect(path: str, framework: str | None = None, stream: TextIO | None = None,
            spec_out: str | os.PathLike | None = None) -> None:  # fmt: skip
    """Print the file's format, layout, metadata and a table of its tensors with what is
    known of each and from where; ``spec_out``: also write that as a spec file to edit."""
    stream = stream or sys.stdout
    ckpt = load_checkpoint(path, framework)
    try:
        specs = file_specs(ckpt, source=path)
    except CheckpointError:  # contradictory evidence: show the shapes' reading
        specs = shape_facts(ckpt.tensors, ckpt.framework)
    size = os.path.getsize(path) if os.path.isfile(path) else 0
    stream.write(f"file       {path} ({size / 2**20:.1f} MiB)\n")
    stream.write(f"format     {ckpt.metadata.get('format', '?')}\n")
    stream.write(f"framework  {ckpt.framework} (layout of the tensors below)\n")
    for key, value in ckpt.metadata.items():
        if key not in ("format", PARAMS_KEY):
            stream.write(f"meta       {key} = {value}\n")
    header = ("name", "shape", "dtype", "kind", "from")
    rows = [(name, str(tuple(a.shape)), str(a.dtype), _describe(specs.get(name)),
             specs[name].evidence if name in specs else "") for name, a in ckpt.tensors.items()]  # fmt: skip
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    for row in [header, *rows]:
        stream.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")
    total = sum(a.size for a in ckpt.tensors.values())
    stream.write(f"{len(rows)} tensors, {total:,} elements\n")
    if spec_out is not None:
        write_spec(spec_out, ckpt.tensors, specs)
        stream.write(f"wrote the spec of {len(rows)} tensors to {os.fspath(spec_out)} "
                     "(fill in the nulls, then pass it to mconv convert --spec)\n")  # fmt: skip


def _describe(spec: ParamSpec | None) -> str:
    return "" if spec is None or spec.role == "other" else describe(spec)
