"""Moving weights between mconv models and files in any framework's layout.

Each parameter's conversion is decided by a ``ParamSpec``: taken from the
model's own layers when there is a model (conv or transposed conv, groups,
rank), from the file's ``__metadata__`` when mconv wrote it, and otherwise
inferred from the shapes.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from mconv.nn import Linear, Module, is_conv
from mconv.nn.module import IncompatibleKeys, to_device

from . import adapters
from .checkpoint import Checkpoint, load_checkpoint
from .errors import CheckpointError
from .safetensors_format import write_safetensors

PARAMS_KEY = "mconv.params"


@dataclass(frozen=True)
class ParamSpec:
    """How one parameter converts: ``role`` conv_weight / conv_bias / linear_weight / other."""

    role: str
    kind: str | None = None
    groups: int = 1
    ndim: int = 0


def param_specs(model: Module) -> dict[str, ParamSpec]:
    """Every parameter and buffer name of ``model`` (as in its state_dict) -> its ParamSpec
    (buffers, such as BatchNorm's statistics, are 'other': taken as they are)."""
    specs = {}
    for prefix, module in model.named_modules():
        for name in [*module._parameters, *module._buffers]:
            if getattr(module, name) is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            if is_conv(module):
                n = module.weight.ndim - 2
                if module.transposed:
                    kind = "conv_transpose"
                elif module.depthwise:
                    kind = "depthwise"
                else:
                    kind = "conv"
                role = "conv_weight" if name == "weight" else "conv_bias"
                specs[full] = ParamSpec(role, kind, module.groups, n)
            elif isinstance(module, Linear) and name == "weight":
                specs[full] = ParamSpec("linear_weight")
            else:
                specs[full] = ParamSpec("other")
    return specs


def infer_specs(tensors: Mapping[str, np.ndarray], framework: str) -> dict[str, ParamSpec]:
    """Specs without a model: >=3-d weights are convs (MegEngine's shape gives its groups),
    2-d weights are linear, the bias next to a conv weight is a conv bias."""
    specs = {}
    for name, array in tensors.items():
        if array.ndim >= 3 and not name.endswith("bias"):
            groups = array.shape[0] if framework == "megengine" and array.ndim >= 5 else 1
            n = array.ndim - (3 if groups > 1 else 2)
            specs[name] = ParamSpec("conv_weight", "conv", groups, n)
        elif array.ndim == 2 and name.endswith("weight"):
            specs[name] = ParamSpec("linear_weight")
    for name in tensors:
        if name.endswith("bias"):
            weight = specs.get(name[: -len("bias")] + "weight")
            is_conv = weight is not None and weight.role == "conv_weight"
            specs[name] = (
                ParamSpec("conv_bias", ndim=weight.ndim) if is_conv else ParamSpec("other")
            )
        specs.setdefault(name, ParamSpec("other"))
    return specs


def specs_from_metadata(metadata: Mapping[str, Any]) -> dict[str, ParamSpec]:
    """The ParamSpecs mconv recorded in a safetensors ``__metadata__`` (empty if none)."""
    raw = metadata.get(PARAMS_KEY)
    if not raw:
        return {}
    try:
        return {name: ParamSpec(**fields) for name, fields in json.loads(raw).items()}
    except (TypeError, ValueError, AttributeError) as error:
        raise CheckpointError(f"malformed {PARAMS_KEY} metadata ({error})") from None


def to_torch_param(array: np.ndarray, spec: ParamSpec, framework: str) -> np.ndarray:
    """One parameter from ``framework``'s layout to PyTorch's."""
    if spec.role == "conv_weight":
        # a Keras Conv with groups=C stores (*k, 1, O); the depthwise reading of that
        # (C=1, M=O) maps it exactly as the conv reading does
        groups = spec.groups if framework == "megengine" or spec.kind == "depthwise" else None
        return adapters.to_torch(array, framework, spec.kind, groups, ndim=spec.ndim or None)
    if spec.role == "conv_bias":
        return adapters.bias_to_torch(array, framework)
    if spec.role == "linear_weight" and framework in ("tensorflow", "jax"):
        return array.T  # Dense kernel (in, out) -> (out, in)
    return array


def from_torch_param(array: np.ndarray, spec: ParamSpec, framework: str) -> np.ndarray:
    """One parameter from PyTorch's layout to ``framework``'s."""
    if spec.role == "conv_weight":
        return adapters.from_torch(array, framework, spec.kind, spec.groups)
    if spec.role == "conv_bias":
        return adapters.bias_from_torch(array, framework, ndim=spec.ndim)
    if spec.role == "linear_weight" and framework in ("tensorflow", "jax"):
        return array.T
    return array


def _normalised(name: str) -> str:
    """Keras/Flax naming -> PyTorch's: 'params/conv1/kernel:0' -> 'conv1.weight'."""
    name = name.split(":")[0].replace("/", ".")
    if name.startswith("params."):
        name = name[len("params.") :]
    head, _, last = name.rpartition(".")
    if last in ("kernel", "depthwise_kernel"):
        name = f"{head}.weight" if head else "weight"
    return name


def _shape(a) -> str:
    return "[" + ", ".join(str(s) for s in a.shape) + "]"


def load_into(
    model: Module, source: Any, framework: str | None = None, strict: bool = True
) -> IncompatibleKeys:
    """Load a checkpoint (path or :class:`Checkpoint`) into ``model``, converting every
    parameter from the file's layout using the model's own layers.

    Missing, unexpected and shape-mismatched keys are reported together in one
    :class:`CheckpointError`; missing/unexpected only when ``strict``. Nothing
    is modified unless every check passes.
    """
    if not isinstance(model, Module):
        raise TypeError(
            f"load_into: model must be an mconv.nn.Module, but got {type(model).__name__}"
        )
    if not isinstance(strict, (bool, np.bool_)):
        raise TypeError(
            f"load_into: strict must be a bool, but got {type(strict).__name__}: strict={strict!r}"
        )
    ckpt = source if isinstance(source, Checkpoint) else load_checkpoint(source, framework)
    framework = framework or ckpt.framework
    specs = param_specs(model)
    expected = model.state_dict()
    by_normalised = {}
    for key in ckpt.tensors:
        by_normalised.setdefault(_normalised(key), key)
    state, missing, mismatched, used = {}, [], [], set()
    for name, spec in specs.items():
        key = name if name in ckpt.tensors else by_normalised.get(name)
        if key is None:
            missing.append(name)
            continue
        used.add(key)
        array = ckpt.tensors[key]
        try:
            value = to_torch_param(array, spec, framework)
        except ValueError as error:
            mismatched.append(f"{name}: {error}")
            continue
        if value.shape != expected[name].shape:
            mismatched.append(f"{name}: the checkpoint's {key} of size {_shape(array)} ({framework} layout) "
                              f"is {_shape(value)} in PyTorch's layout, but the model expects "
                              f"{_shape(expected[name])}")  # fmt: skip
            continue
        state[name] = value
    unexpected = [key for key in ckpt.tensors if key not in used]
    problems = [f"size mismatch for {m}" for m in mismatched]
    if strict:
        problems += [f"missing key {k} (model expects {_shape(expected[k])})" for k in missing]
        problems += [f"unexpected key {k} of size {_shape(ckpt.tensors[k])}" for k in unexpected]
    if problems:
        where = source if not isinstance(source, Checkpoint) else "checkpoint"
        raise CheckpointError(f"load_into: cannot load {where} ({framework} layout) into "
                              f"{type(model).__name__}:\n  " + "\n  ".join(problems))  # fmt: skip
    model.load_state_dict(state, strict=False)
    return IncompatibleKeys(missing, unexpected)


def save_safetensors(model_or_state_dict: Any, path: str | os.PathLike, layout: str = "torch",
                     metadata: Mapping[str, str] | None = None) -> None:  # fmt: skip
    """Write a model's (or a state dict's) parameters as safetensors in ``layout``.

    ``__metadata__`` records ``format``, ``layout`` and, per parameter, its
    kind, groups and rank, so that :func:`load_into` and ``mconv convert``
    convert back without being told. Written atomically.
    """
    if layout not in adapters.FRAMEWORKS:
        raise ValueError(
            f"save_safetensors: layout must be one of {adapters.FRAMEWORKS}, but got layout={layout!r}"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"save_safetensors: path must be a str or os.PathLike, but got "
                        f"{type(path).__name__}: path={path!r}")  # fmt: skip
    if metadata is not None and not (isinstance(metadata, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):  # fmt: skip
        raise TypeError(f"save_safetensors: metadata must map str to str (or be None), but got "
                        f"{type(metadata).__name__}: metadata={metadata!r}")  # fmt: skip
    if isinstance(model_or_state_dict, Module):
        state = model_or_state_dict.state_dict()
        specs = param_specs(model_or_state_dict)
    elif isinstance(model_or_state_dict, Mapping):
        state = dict(model_or_state_dict)
        bad = [k for k in state if not isinstance(k, str)]
        if bad:
            bad = bad[0]
            raise TypeError(f"save_safetensors: state dict keys must be str, but got "
                            f"{type(bad).__name__}: {bad!r}")  # fmt: skip
        specs = infer_specs(state, "torch")
    else:
        raise TypeError(f"save_safetensors: expected an mconv.nn.Module or a state dict, but got "
                        f"{type(model_or_state_dict).__name__}")  # fmt: skip
    tensors = {
        name: from_torch_param(np.asarray(to_device(array, "cpu")), specs[name], layout)
        for name, array in state.items()
    }
    write_safetensors(tensors, path, safetensors_metadata(specs, layout, metadata))


def safetensors_metadata(specs: Mapping[str, ParamSpec], layout: str,
                         metadata: Mapping[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """``__metadata__`` that lets mconv convert the file back: format, layout, specs."""
    reserved = {"format", "layout", PARAMS_KEY}
    if metadata and reserved & set(metadata):
        raise ValueError(
            f"save_safetensors: metadata keys {sorted(reserved & set(metadata))} are reserved"
        )
    params = json.dumps({name: asdict(spec) for name, spec in specs.items()}, sort_keys=True)
    tag = {"torch": "pt", "tensorflow": "tf", "jax": "flax"}.get(layout, layout)  # HF's convention
    return {**(metadata or {}), "format": tag, "layout": layout, PARAMS_KEY: params}
