"""Moving weights between mconv models and files in any framework's layout.

Each tensor's conversion is decided by its :class:`~layouts.roles.ParamSpec`: from the
model's own layers when there is a model (conv or transposed conv, groups, rank; BatchNorm
by its torch key names; Linear), from the file's ``__metadata__`` when mconv wrote it, and
otherwise from what the file's structure and certain shape facts say -- never a guess:
:func:`save_safetensors` of a bare state dict refuses where the layout depends on
something unknown.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from mconv._args import shape_str

from mconv.nn import Linear, Module, is_conv
from mconv.nn.module import IncompatibleKeys, to_device

from . import adapters
from .checkpoint import Checkpoint, load_checkpoint
from .errors import CheckpointError
from .params import (PARAMS_KEY, convert_state, safetensors_metadata, specs_from_metadata,
                     to_torch_param)  # fmt: skip
from .roles import BN_ROLES, WITH_BN_COUNT, ParamSpec, merge, shape_facts
from .safetensors_format import write_safetensors

__all__ = ["load_into", "save_safetensors", "param_specs", "ParamSpec", "PARAMS_KEY",
           "specs_from_metadata"]  # fmt: skip


def _module_roles(module: Module) -> dict[str, ParamSpec] | None:
    """Roles of one mconv module's own tensors; None: all 'other'."""
    evidence = f"mconv {type(module).__name__}"
    if is_conv(module):
        n = module.weight.ndim - 2
        kind = (
            "conv_transpose" if module.transposed else "depthwise" if module.depthwise else "conv"
        )
        return {"weight": ParamSpec("conv_weight", kind, module.groups, n, evidence),
                "bias": ParamSpec("conv_bias", ndim=n, evidence=evidence)}  # fmt: skip
    if isinstance(module, Linear):
        return {"weight": ParamSpec("linear_weight", evidence=evidence)}
    names = {*module._parameters, *getattr(module, "_buffers", {})}
    if {"running_mean", "running_var"} <= names:  # BatchNorm, by torch's key names
        return {k: ParamSpec(v, evidence=evidence) for k, v in BN_ROLES.items()}
    return None


def param_specs(model: Module) -> dict[str, ParamSpec]:
    """Every parameter and buffer name of ``model`` (as in its state_dict) -> its ParamSpec:
    convs and Linear from their layers, BatchNorm from its torch key names (``weight, bias,
    running_mean, running_var, num_batches_tracked``), anything else 'other'."""
    specs = {}
    for prefix, module in model.named_modules():
        roles = _module_roles(module) or {}
        for name in [*module._parameters, *getattr(module, "_buffers", {})]:
            if getattr(module, name, None) is None:
                continue
            full = f"{prefix}.{name}" if prefix else name
            specs[full] = roles.get(name) or ParamSpec(
                "other", evidence=f"mconv {type(module).__name__}"
            )
    return specs


def _normalised(name: str) -> str:
    """Keras/Flax naming -> PyTorch's: 'params/conv1/kernel:0' -> 'conv1.weight'."""
    name = name.split(":")[0].replace("/", ".")
    if name.startswith("params."):
        name = name[len("params.") :]
    head, _, last = name.rpartition(".")
    if last in ("kernel", "depthwise_kernel"):
        name = f"{head}.weight" if head else "weight"
    return name


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
        if key is None and spec.role == "bn_count" and framework not in WITH_BN_COUNT:
            state[name] = np.zeros(expected[name].shape, np.int64)  # the layout has no counter
            continue
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
            mismatched.append(f"{name}: the checkpoint's {key} of size {shape_str(array.shape)} ({framework} layout) "
                              f"is {shape_str(value.shape)} in PyTorch's layout, but the model expects "
                              f"{shape_str(expected[name].shape)}")  # fmt: skip
            continue
        state[name] = value
    unexpected = [key for key in ckpt.tensors if key not in used]
    problems = [f"size mismatch for {m}" for m in mismatched]
    if strict:
        problems += [
            f"missing key {k} (model expects {shape_str(expected[k].shape)})" for k in missing
        ]
        problems += [
            f"unexpected key {k} of size {shape_str(ckpt.tensors[k].shape)}" for k in unexpected
        ]
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
    role, kind, groups and rank, so that :func:`load_into` and ``mconv convert``
    convert back without being told. Written atomically. A bare state dict says
    nothing of its convs' kinds or groups: where ``layout`` depends on them
    (megengine, tensorflow, jax) this raises a :class:`CheckpointError` naming the
    tensors; save the model instead.
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
        state = {k: np.asarray(to_device(v, "cpu")) for k, v in state.items()}
        specs = merge([("shape", shape_facts(state, "torch"))], state)
    else:
        raise TypeError(f"save_safetensors: expected an mconv.nn.Module or a state dict, but got "
                        f"{type(model_or_state_dict).__name__}")  # fmt: skip
    state = {name: np.asarray(to_device(array, "cpu")) for name, array in state.items()}
    tensors, specs = convert_state(state, specs, "torch", layout,
                                   f"save_safetensors: {layout} layout for {os.fspath(path)}")  # fmt: skip
    write_safetensors(tensors, path, safetensors_metadata(specs, layout, metadata))
