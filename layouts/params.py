"""Converting tensors whose roles are known: one tensor (:func:`to_torch_param`,
:func:`from_torch_param`) and a whole state (:func:`convert_state`), which refuses before
converting anything when a tensor's target layout depends on a fact nobody knows.

BatchNorm: a MegEngine module holds weight, bias and running statistics as ``(1, C, 1, 1)``,
and a whole-module pickle (``megengine.save(module)``) or a file of MegEngine < 1.1 keeps that
shape; MegEngine's ``state_dict()`` (1.1 to 1.13, ``Module.state_dict``: "reshaped to 1-dim
tensors") returns ``(C,)``, as every other layout does, so ``(C,)`` is what is written, and
both are read. MegEngine has no ``num_batches_tracked``. Converting to a layout with
the counter (torch, oneflow, tripy) adds ``num_batches_tracked = 0`` (int64, 0-d) where the
source has none, so that a strict ``load_state_dict`` passes; converting to one without it
drops it.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from mconv._args import shape_str

from . import adapters
from .errors import CheckpointError
from .roles import ROLES, WITH_BN_COUNT, ParamSpec, describe, needs, refusal

PARAMS_KEY = "mconv.params"
_BN_SHAPED = ("bn_weight", "bn_bias", "bn_stat")


def to_torch_param(array: np.ndarray, spec: ParamSpec, framework: str) -> np.ndarray:
    """One tensor from ``framework``'s layout to PyTorch's."""
    if spec.role == "conv_weight":
        # a Keras Conv with groups=C stores (*k, 1, O); the depthwise reading of that
        # (C=1, M=O) maps it exactly as the conv reading does
        groups = spec.groups if framework == "megengine" or spec.kind == "depthwise" else None
        kind = spec.kind or "conv"  # needs() made sure the kind does not matter here
        return adapters.to_torch(array, framework, kind, groups, ndim=spec.ndim)
    if spec.role == "conv_bias":
        return adapters.bias_to_torch(array, framework)
    if spec.role in _BN_SHAPED:
        if framework == "megengine" and array.ndim >= 2:
            if array.shape[0] != 1 or any(s != 1 for s in array.shape[2:]):
                raise ValueError(f"a MegEngine BatchNorm tensor is (1, C, 1, 1), but got "
                                 f"{shape_str(array.shape)}")  # fmt: skip
            return array.reshape(array.shape[1])
        if array.ndim != 1:
            raise ValueError(
                f"a {framework} BatchNorm tensor is (C,), but got {shape_str(array.shape)}"
            )
    if spec.role == "linear_weight" and framework in ("tensorflow", "jax"):
        return array.T  # Dense kernel (in, out) -> (out, in)
    return array


def from_torch_param(array: np.ndarray, spec: ParamSpec, framework: str) -> np.ndarray:
    """One tensor from PyTorch's layout to ``framework``'s."""
    if spec.role == "conv_weight":
        return adapters.from_torch(array, framework, spec.kind or "conv", spec.groups)
    if spec.role == "conv_bias":
        return adapters.bias_from_torch(array, framework, ndim=spec.ndim)
    if spec.role == "linear_weight" and framework in ("tensorflow", "jax"):
        return array.T
    return array


def _with_counts(out: dict[str, np.ndarray], specs: Mapping[str, ParamSpec],
                 new_specs: dict[str, ParamSpec]) -> dict[str, np.ndarray]:  # fmt: skip
    """``out`` with ``<bn>.num_batches_tracked`` = 0 after each BatchNorm lacking one."""
    last: dict[str, str] = {}
    for name in out:
        if specs[name].role in ("bn_stat", "bn_weight", "bn_bias"):
            last[name.rpartition(".")[0]] = name
    stats = {name.rpartition(".")[0] for name in out if specs[name].role == "bn_stat"}
    added = {last[p]: (f"{p}.num_batches_tracked" if p else "num_batches_tracked")
             for p in stats}  # fmt: skip
    result = {}
    for name, value in out.items():
        result[name] = value
        count = added.get(name)
        if count is not None and count not in out:
            result[count] = np.zeros((), np.int64)
            new_specs[count] = ParamSpec("bn_count", evidence="added: the source has none")
    return result


def convert_state(tensors: Mapping[str, np.ndarray], specs: Mapping[str, ParamSpec], src: str,
                  dst: str, what: str) -> tuple[dict[str, np.ndarray], dict[str, ParamSpec]]:  # fmt: skip
    """Every tensor from ``src``'s layout to ``dst``'s: (tensors, their specs). Views where
    NumPy allows (nothing is copied before it is written). Refuses with one
    :class:`CheckpointError` naming every tensor whose conversion depends on something
    unknown or does not fit its spec; ``what`` starts the message."""
    problems = {}
    for name, array in tensors.items():
        missing = needs(specs[name], src, dst)
        if missing:
            problems[name] = (f"{shape_str(array.shape)} {describe(specs[name])} (from "
                              f"{specs[name].evidence or 'shape'}): unknown " + "; ".join(missing))  # fmt: skip
    if problems:
        raise refusal(what, problems)
    out, new_specs = {}, {}
    for name, array in tensors.items():
        spec = specs[name]
        if spec.role == "bn_count" and dst not in WITH_BN_COUNT:
            continue
        try:
            out[name] = from_torch_param(to_torch_param(array, spec, src), spec, dst)
        except ValueError as error:
            problems[name] = f"{shape_str(array.shape)} as {describe(spec)}: {error}"
            continue
        new_specs[name] = spec
    if problems:
        raise CheckpointError(f"{what}: tensors that do not fit what is known of them:\n  "
                              + "\n  ".join(f"{k}: {v}" for k, v in problems.items()))  # fmt: skip
    if dst in WITH_BN_COUNT:
        out = _with_counts(out, new_specs, new_specs)
    return out, new_specs


def specs_metadata(specs: Mapping[str, ParamSpec]) -> str:
    """The ``mconv.params`` metadata value: each tensor's role, kind, groups and rank."""
    return json.dumps({name: spec.facts() for name, spec in specs.items()}, sort_keys=True)


def parse_spec_fields(name: str, fields: Any, source: str) -> ParamSpec:
    """A spec entry ``{"role"?, "kind"?, "groups"?, "ndim"?}`` -> ParamSpec, checked."""
    if not isinstance(fields, dict):
        raise CheckpointError(f"{source}: the entry for {name!r} must be an object, but got "
                              f"{type(fields).__name__}")  # fmt: skip
    unknown = set(fields) - {"role", "kind", "groups", "ndim", "shape"}
    if unknown:
        raise CheckpointError(f"{source}: the entry for {name!r} has unknown keys "
                              f"{sorted(unknown)} (expected role, kind, groups, ndim, shape)")  # fmt: skip
    kind, role = fields.get("kind"), fields.get("role")
    if kind in ("linear", "batchnorm", "other") and role is None:  # the short forms
        role, kind = {"linear": "linear_weight", "other": "other"}.get(kind, role), None
    if role is None:  # kind, groups or ndim only make sense for a conv weight
        role = "conv_weight" if any(fields.get(k) is not None for k in ("kind", "groups", "ndim")) \
            else "other"  # fmt: skip
    if role not in ROLES:
        raise CheckpointError(f"{source}: the entry for {name!r} has role={role!r}, but role "
                              f"must be one of {ROLES}")  # fmt: skip
    if kind is not None and kind not in adapters.KINDS:
        raise CheckpointError(f"{source}: the entry for {name!r} has kind={kind!r}, but kind "
                              f"must be one of {adapters.KINDS} or null")  # fmt: skip
    for key in ("groups", "ndim"):
        value = fields.get(key)
        if value is not None and (type(value) is not int or value < 1):
            raise CheckpointError(f"{source}: the entry for {name!r} has {key}={value!r}, but "
                                  f"{key} must be a positive integer or null")  # fmt: skip
    return ParamSpec(role, kind, fields.get("groups"), fields.get("ndim"), source)


def specs_from_metadata(metadata: Mapping[str, Any]) -> dict[str, ParamSpec]:
    """The ParamSpecs mconv recorded in a safetensors ``__metadata__`` (empty if none).
    Files written before roles knew ``None`` say ``ndim: 0`` for unknown."""
    raw = metadata.get(PARAMS_KEY)
    if not raw:
        return {}
    source = f"{PARAMS_KEY} metadata"
    try:
        entries = json.loads(raw)
    except ValueError as error:
        raise CheckpointError(f"malformed {source} ({error})") from None
    if not isinstance(entries, dict):
        raise CheckpointError(f"malformed {source}: expected an object")
    out = {}
    for name, fields in entries.items():
        if isinstance(fields, dict) and fields.get("ndim") == 0:
            fields = {**fields, "ndim": None}
        out[name] = parse_spec_fields(name, fields, source)
    return out


def safetensors_metadata(specs: Mapping[str, ParamSpec], layout: str,
                         metadata: Mapping[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """``__metadata__`` that lets mconv convert the file back: format, layout, specs."""
    reserved = {"format", "layout", PARAMS_KEY}
    if metadata and reserved & set(metadata):
        raise ValueError(
            f"save_safetensors: metadata keys {sorted(reserved & set(metadata))} are reserved"
        )
    params = specs_metadata(specs)
    tag = {"torch": "pt", "tensorflow": "tf", "jax": "flax"}.get(layout, layout)  # HF's convention
    return {**(metadata or {}), "format": tag, "layout": layout, PARAMS_KEY: params}
