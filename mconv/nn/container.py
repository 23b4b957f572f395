"""Containers: ``Sequential``, and the skip connections ``Residual`` and ``Concat``, in the
Module/backward style: forward runs the children, backward runs their backward in reverse
and sums (Residual) or splits (Concat) the gradients. So ResNet, MobileNetV2 and U-Net skip
connections are plain module trees.

>>> import numpy as np
>>> from mconv import nn
>>> block = nn.Residual(nn.Sequential(nn.Conv1d(2, 2, 3, padding=1), nn.ReLU()))
>>> x = np.ones((1, 2, 5), dtype=np.float32)
>>> block(x).shape, block.backward(np.ones((1, 2, 5), dtype=np.float32)).shape
((1, 2, 5), (1, 2, 5))
"""

from __future__ import annotations

from typing import Any

from .. import _args
from .module import Module


def _check_module(module: Any, what: str) -> Module:
    if not isinstance(module, Module):
        raise TypeError(f"{what} must be a Module, but got {type(module).__name__}")
    return module


class Sequential(Module):
    """Runs children in order; ``backward`` runs their ``backward`` in reverse. Children are
    named "0", "1", ..., or by the keys of one ``OrderedDict`` argument, as in PyTorch."""

    def __init__(self, *modules: Module):
        super().__init__()
        named = modules[0].items() if len(modules) == 1 and isinstance(modules[0], dict) else (
            (str(index), module) for index, module in enumerate(modules)
        )  # fmt: skip
        for name, module in named:
            if not isinstance(module, Module):
                raise TypeError(
                    f"Sequential takes Modules, but argument {name} is {type(module).__name__}"
                )
            setattr(self, name, module)

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]

    def __iter__(self):
        return iter(self._modules.values())

    def forward(self, x):
        for module in self:
            x = module(x)
        return x

    def backward(self, grad_output):
        for module in reversed(list(self)):
            grad_output = module.backward(grad_output)
        return grad_output


class Residual(Module):
    """y = body(x) + shortcut(x), or body(x) + x without a shortcut (torchvision's
    ``downsample`` is a shortcut). backward: dx = body.backward(dy) + shortcut.backward(dy)."""

    def __init__(self, body: Module, shortcut: Module | None = None):
        super().__init__()
        self.body = _check_module(body, "body")
        if shortcut is not None:
            self.shortcut = _check_module(shortcut, "shortcut")
        else:
            object.__setattr__(self, "shortcut", None)

    def forward(self, x):
        y = self.body(x)
        skip = x if self.shortcut is None else self.shortcut(x)
        if y.shape != skip.shape:
            raise ValueError(
                f"Residual: body and shortcut must give the same shape, but got "
                f"{_args.shape_str(y.shape)} and {_args.shape_str(skip.shape)}"
            )
        return y + skip

    def backward(self, grad_output):
        dx = self.body.backward(grad_output)
        skip = grad_output if self.shortcut is None else self.shortcut.backward(grad_output)
        return dx + skip


class Concat(Module):
    """y = concatenate([branch(x) for branch in branches], axis=dim); backward splits dy
    along ``dim`` and sums the branches' input gradients."""

    def __init__(self, *branches: Module, dim: int = 1):
        super().__init__()
        if not branches:
            raise ValueError("Concat needs at least one branch, but got none")
        for index, branch in enumerate(branches):
            setattr(self, str(index), _check_module(branch, f"branch {index}"))
        self.dim = _args.check_int(dim, "dim")
        self._sizes = None

    def forward(self, x):
        outputs = [branch(x) for branch in self._modules.values()]
        axis = self.dim % outputs[0].ndim
        self._sizes = [out.shape[axis] for out in outputs]
        return _args.array_module(x).concatenate(outputs, axis=axis)

    def backward(self, grad_output):
        if self._sizes is None:
            raise RuntimeError("Concat.backward() called before forward()")
        axis, start, dx = self.dim % grad_output.ndim, 0, None
        for branch, size in zip(self._modules.values(), self._sizes):
            index = [slice(None)] * grad_output.ndim
            index[axis] = slice(start, start + size)
            start += size
            part = branch.backward(grad_output[tuple(index)])
            dx = part if dx is None else dx + part
        return dx

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
