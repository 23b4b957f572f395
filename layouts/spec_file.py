"""``--spec FILE``: what the user says each tensor is, as JSON, and ``mconv inspect
--spec-out FILE``, which writes one to edit.

    {"layer1.0.conv2.weight": {"kind": "conv", "groups": 32, "ndim": 2, "shape": [128, 4, 3, 3]},
     "up.*.weight":           {"kind": "conv_transpose", "groups": 1},
     "fc.weight":             {"role": "linear_weight"},
     "embed.weight":          {"role": "other"}}

Keys are tensor names, or patterns (``*``, ``?``, ``[...]``, as in :mod:`fnmatch`) tried in
file order after the exact names. Fields: ``role`` (see :mod:`layouts.roles`; ``kind`` alone
implies a conv weight, ``"kind": "linear"`` a Linear weight), ``kind`` (conv,
conv_transpose, depthwise), ``groups``, ``ndim`` (spatial rank); ``null`` or absent: unknown.
``shape``, when given, must match the tensor (a spec written for another file is refused).
A name or a pattern that matches no tensor is an error, not a silent no-op.
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Mapping

import numpy as np

from .atomic import atomic_write
from .errors import CheckpointError
from .files import open_regular
from .params import parse_spec_fields
from .roles import ParamSpec
from .safetensors_format import MAX_JSON_DEPTH, _json_depth

MAX_SPEC_BYTES = 64 << 20
_PATTERN = set("*?[")


def _fits(spec: ParamSpec, known: ParamSpec | None) -> bool:
    """Whether a pattern's entry applies to a tensor the shapes say is ``known``: a conv
    entry to conv weights, a Linear/other entry to 2-d weights, and so on."""
    if known is None:
        return True
    return known.role == spec.role or (known.role == "matrix" and spec.role in (
        "linear_weight", "other"))  # fmt: skip


def read_spec(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
              known: Mapping[str, ParamSpec] | None = None) -> dict[str, ParamSpec]:  # fmt: skip
    """name -> ParamSpec for every tensor the spec file at ``path`` names or matches. A
    pattern only applies to the tensors whose role (from ``known``, the shape facts) it fits:
    ``{"*": {"ndim": 2}}`` gives every conv weight its rank and leaves BatchNorm alone."""
    source = f"--spec {os.fspath(path)}"
    f, size = open_regular(os.fspath(path), "the spec file")
    with f:
        if size > MAX_SPEC_BYTES:
            raise CheckpointError(f"{source}: {size} bytes, more than a spec file may hold "
                                  f"({MAX_SPEC_BYTES})")  # fmt: skip
        raw = f.read(MAX_SPEC_BYTES)
    if _json_depth(raw) > MAX_JSON_DEPTH:
        raise CheckpointError(f"{source}: nested more than {MAX_JSON_DEPTH} deep")
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{source}: not valid JSON ({error})") from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"{source}: expected a JSON object mapping tensor names to "
                              f"{{kind, groups, ndim, role}}, but got {type(entries).__name__}")  # fmt: skip
    specs: dict[str, ParamSpec] = {}
    unmatched = []
    patterns = [k for k in entries if _PATTERN & set(k) and k not in tensors]
    for key, fields in entries.items():
        spec = parse_spec_fields(key, fields, source)
        names = [n for n in tensors if fnmatch.fnmatchcase(n, key)
                 and _fits(spec, (known or {}).get(n))] if key in patterns else (
            [key] if key in tensors else [])  # fmt: skip
        if not names:
            unmatched.append(key)
        for name in names:
            shape = fields.get("shape")
            if shape is not None and list(shape) != list(tensors[name].shape):
                raise CheckpointError(f"{source}: {key!r} says shape {list(shape)}, but the "
                                      f"tensor {name} is {list(tensors[name].shape)}")  # fmt: skip
            if key in patterns and name in specs:
                continue  # an exact name, or an earlier pattern, said it first
            specs[name] = spec
    if unmatched:
        raise CheckpointError(f"{source}: no tensor is named or matched by "
                              f"{', '.join(map(repr, unmatched[:20]))}")  # fmt: skip
    return specs


def write_spec(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
               specs: Mapping[str, ParamSpec]) -> None:  # fmt: skip
    """A spec of every tensor: what is known, ``null`` where a conversion may need a fact."""
    entries = {}
    for name, array in tensors.items():
        spec = specs.get(name) or ParamSpec("other")
        entries[name] = {**spec.facts(), "shape": list(array.shape)}
    text = json.dumps(entries, indent=1)
    with atomic_write(path) as f:
        f.write(text.encode() + b"\n")
