"""``Parameter`` and ``Module``: PyTorch's module API on plain arrays.

A module's ``forward`` caches what its ``backward`` needs; ``backward(dy)``
returns the input gradient and accumulates ``param.grad``.

>>> import numpy as np
>>> from mconv import nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
>>> sorted(net.state_dict())
['0.bias', '0.weight']
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterator, NamedTuple

import numpy as np

from .. import _args
from .._args import shape_str


class Parameter:
    """A learnable array: ``.data`` holds the value, ``.grad`` the accumulated gradient (or None)."""

    __slots__ = ("data", "grad")

    def __init__(self, data: Any):
        if not _args.is_ndarray(data):
            raise TypeError(f"Parameter data must be an ndarray, but got {type(data).__name__}")
        self.data = data
        self.grad = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    def accumulate_grad(self, grad) -> None:
        """grad += g (the first call stores a copy)."""
        if self.grad is None:
            self.grad = grad.copy()
        else:
            self.grad += grad

    def __repr__(self) -> str:
        return f"Parameter(shape={tuple(self.data.shape)}, dtype={self.data.dtype})"


class IncompatibleKeys(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


def check_device(device: Any) -> str:
    """'cpu', or 'cuda' / 'cuda:i' (canonical 'cuda:i') when CuPy and that GPU exist."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a string such as 'cpu', but got device={device!r}")
    if device == "cpu":
        return device
    from ..backends import cupy_backend  # noqa: PLC0415 - imports CuPy only when asked

    return cupy_backend.check_device(device)


def to_device(array: Any, device: str) -> Any:
    """``array`` on a device already checked by ``check_device`` (no copy if it is there)."""
    if device == "cpu" and _args.device_of(array) == "cpu":
        return array
    from ..backends import cupy_backend  # noqa: PLC0415 - imports CuPy only when asked

    return cupy_backend.to_device(array, device)


def float_dtype(dtype: Any, name: str = "dtype") -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        raise TypeError(
            f"{name} must be float16, float32 or float64, but got {name}={dtype!r}"
        ) from None
    if resolved not in _args.FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, float32 or float64, but got {name}={dtype!r}")
    return resolved


def cached(module: "Module", what: str = "_cache"):
    """What ``module.forward`` cached for ``backward`` (a RuntimeError before any forward)."""
    value = getattr(module, what)
    if value is None:
        raise RuntimeError(f"{type(module).__name__}.backward() called before forward()")
    return value


def key_errors(missing, unexpected) -> list[str]:
    """PyTorch's lines for missing and unexpected state_dict keys (none for none)."""
    quoted = lambda keys: ", ".join(f'"{k}"' for k in keys)  # noqa: E731
    return [f"{what} key(s) in state_dict: {quoted(keys)}."
            for what, keys in (("Missing", missing), ("Unexpected", unexpected)) if keys]  # fmt: skip


def _addindent(text: str, spaces: int) -> str:
    first, *rest = text.split("\n")
    return "\n".join([first] + [" " * spaces + line for line in rest])


class Module:
    """Base class: registers Parameters and sub-Modules assigned as attributes."""

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # -- attribute registration --------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise AttributeError("Module.__init__() must be called before assigning attributes")
        params, modules = self.__dict__["_parameters"], self.__dict__["_modules"]
        buffers = self.__dict__.get("_buffers", {})
        if name in buffers:
            if value is not None and not _args.is_ndarray(value):
                raise TypeError(
                    f"cannot assign {type(value).__name__} to buffer {name!r}: an ndarray or None"
                )
            buffers[name] = value
        elif isinstance(value, Parameter) or (value is None and name in params):
            modules.pop(name, None)
            params[name] = value
        elif isinstance(value, Module):
            params.pop(name, None)
            modules[name] = value
        else:
            if name in params or name in modules:
                raise TypeError(
                    f"cannot assign {type(value).__name__} to {name!r}: it holds a "
                    f"{'Parameter' if name in params else 'Module'} (or None)"
                )
            object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        for registry in ("_parameters", "_buffers", "_modules"):
            store = self.__dict__.get(registry, {})
            if name in store:
                return store[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def register_buffer(self, name: str, value: Any) -> None:
        """A state array that is not learned (BatchNorm's running statistics): in
        ``state_dict`` after the parameters of its module, moved by ``to()``, not in
        ``parameters()``. ``None`` registers the name without a value (left out of the
        state dict), as in PyTorch."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"buffer name must be an identifier, but got name={name!r}")
        if name in self._parameters or name in self._modules:
            raise ValueError(f"attribute {name!r} already holds a Parameter or Module")
        self._buffers[name] = None
        setattr(self, name, value)

    def named_buffers(self) -> Iterator[tuple[str, Any]]:
        for name, module, key, is_buffer in self._state_items():
            if is_buffer:
                yield name, module._buffers[key]

    def buffers(self) -> Iterator[Any]:
        for _, value in self.named_buffers():
            yield value

    def __delattr__(self, name: str) -> None:
        for registry in (self._parameters, self._buffers, self._modules):
            if name in registry:
                del registry[name]
                return
        object.__delattr__(self, name)

    # -- computation -------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward()")

    def backward(self, grad_output: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement backward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    # -- traversal ---------------------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        yield from self._modules.items()

    def children(self) -> Iterator["Module"]:
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        seen: set[int] = set()

        def walk(module: Module, path: str):
            if id(module) in seen:
                return
            seen.add(id(module))
            yield path, module
            for name, child in module._modules.items():
                yield from walk(child, f"{path}.{name}" if path else name)

        yield from walk(self, prefix)

    def modules(self) -> Iterator["Module"]:
        for _, module in self.named_modules():
            yield module

    def _parameter_slots(
        self, prefix: str = "", ancestors: tuple = ()
    ) -> Iterator[tuple[str, Parameter]]:
        """Every (dotted name, Parameter), shared ones under each of their names (as PyTorch's
        state_dict); a module that contains itself is not entered twice."""
        for name, param in self._parameters.items():
            if param is not None:
                yield prefix + name, param
        for name, child in self._modules.items():
            if child is not self and child not in ancestors:
                yield from child._parameter_slots(f"{prefix}{name}.", ancestors + (self,))

    def named_parameters(
        self, prefix: str = "", recurse: bool = True
    ) -> Iterator[tuple[str, Parameter]]:
        """Each parameter once (a shared one under its first name)."""
        seen: set[int] = set()
        slots = (
            self._parameter_slots()
            if recurse
            else ((n, p) for n, p in self._parameters.items() if p is not None)
        )
        for name, param in slots:
            if id(param) not in seen:
                seen.add(id(param))
                yield (f"{prefix}.{name}" if prefix else name), param

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    # -- state -------------------------------------------------------------------------------
    def _state_items(self, prefix: str = "", ancestors: tuple = ()):
        """(dotted name, owning module, key, is a buffer) in PyTorch's state_dict order: a
        module's parameters, then its buffers, then its children."""
        for name, param in self._parameters.items():
            if param is not None:
                yield prefix + name, self, name, False
        for name, value in self._buffers.items():
            if value is not None:
                yield prefix + name, self, name, True
        for name, child in self._modules.items():
            if child is not self and child not in ancestors:
                yield from child._state_items(f"{prefix}{name}.", ancestors + (self,))

    @staticmethod
    def _state_value(module: "Module", key: str, is_buffer: bool):
        return module._buffers[key] if is_buffer else module._parameters[key].data

    def state_dict(self) -> "OrderedDict[str, Any]":
        """Dotted name -> the parameter's (or buffer's) array (not a copy, as in PyTorch)."""
        return OrderedDict(
            (name, self._state_value(module, key, buf))
            for name, module, key, buf in self._state_items()
        )

    def load_state_dict(self, state_dict: Any, strict: bool = True) -> IncompatibleKeys:
        """Copy arrays into the parameters; returns ``(missing_keys, unexpected_keys)``.

        Shape mismatches always raise; missing or unexpected keys raise when
        ``strict``. Nothing is modified unless every check passes.
        """
        if not hasattr(state_dict, "keys") or not hasattr(state_dict, "__getitem__"):
            raise TypeError(
                f"state_dict must be a mapping of names to arrays, but got "
                f"{type(state_dict).__name__}"
            )
        expected = OrderedDict(
            (name, self._state_value(module, key, buf))
            for name, module, key, buf in self._state_items()
        )
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict.keys() if k not in expected]
        errors = []
        for name, param in expected.items():
            if name not in state_dict:
                continue
            value = state_dict[name]
            if not _args.is_ndarray(value):
                raise TypeError(
                    f"state_dict[{name!r}] must be an ndarray, but got {type(value).__name__}"
                )
            if tuple(value.shape) != tuple(param.shape):
                errors.append(
                    f"size mismatch for {name}: copying a param with shape "
                    f"{shape_str(value.shape)} from checkpoint, the shape in current model "
                    f"is {shape_str(param.shape)}."
                )
        if strict:
            errors[:0] = key_errors(missing, unexpected)
        if errors:
            raise ValueError(
                f"Error(s) in loading state_dict for {type(self).__name__}:\n\t"
                + "\n\t".join(errors)
            )
        for name, array in expected.items():
            if name in state_dict:  # copied onto the parameter's (buffer's) device
                array[...] = to_device(state_dict[name], _args.device_of(array))
        return IncompatibleKeys(missing, unexpected)

    def zero_grad(self) -> None:
        """Set every parameter's ``.grad`` to None."""
        for param in self.parameters():
            param.grad = None

    def to(self, target: Any) -> "Module":
        """``to('cpu')``, ``to('cuda[:i]')`` (moves every parameter and grad) or ``to(dtype)``
        (casts them); in place, returns self."""
        if isinstance(target, str) and (target == "cpu" or target.startswith("cuda")):
            device = check_device(target)
            for param in self.parameters():
                param.data = to_device(param.data, device)
                if param.grad is not None:
                    param.grad = to_device(param.grad, device)
            for _, module, key, _ in filter(lambda item: item[3], self._state_items()):
                module._buffers[key] = to_device(module._buffers[key], device)
            for module in self.modules():
                if "device" in module.__dict__:
                    object.__setattr__(module, "device", device)
            return self
        dtype = float_dtype(target, "target")
        for param in self.parameters():
            param.data = param.data.astype(dtype)
            if param.grad is not None:
                param.grad = param.grad.astype(dtype)
        for _, module, key, _ in filter(lambda item: item[3], self._state_items()):
            if module._buffers[key].dtype.kind == "f":  # counters stay integers
                module._buffers[key] = module._buffers[key].astype(dtype)
        for module in self.modules():
            if "dtype" in module.__dict__:
                object.__setattr__(module, "dtype", dtype)
        return self

    def train(self, mode: bool = True) -> "Module":
        if not isinstance(mode, bool):
            raise TypeError(f"training mode must be a bool, but got mode={mode!r}")
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # -- printing ----------------------------------------------------------------------------
    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr().split("\n") if self.extra_repr() else []
        children = [
            f"({name}): {_addindent(repr(child), 2)}" for name, child in self._modules.items()
        ]
        lines = extra + children
        body = ""
        if len(extra) == 1 and not children:
            body = extra[0]
        elif lines:
            body = "\n  " + "\n  ".join(lines) + "\n"
        return f"{type(self).__name__}({body})"
