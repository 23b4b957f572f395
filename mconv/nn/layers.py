"""Flatten and Linear. Each layer caches in ``forward`` what ``backward`` needs (pools:
``pooling.py``, activations: ``activation.py``, containers: ``container.py``).

>>> import numpy as np
>>> from mconv import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.GlobalAvgPool(), nn.Linear(4, 2))
>>> x = np.ones((5, 1, 8, 8), dtype=np.float32)
>>> net(x).shape, net.backward(np.ones((5, 2), dtype=np.float32)).shape
((5, 2), (5, 1, 8, 8))
"""

from __future__ import annotations

import math
from typing import Any


from .. import _args
from ..precision import accumulator
from . import init
from .module import Module, Parameter, cached, check_device, float_dtype, to_device


class Flatten(Module):
    """Flattens axes ``start_dim..end_dim`` into one."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim = _args.check_int(start_dim, "start_dim")
        self.end_dim = _args.check_int(end_dim, "end_dim")
        self._cache = None

    def forward(self, x):
        start, end = (d % x.ndim for d in (self.start_dim, self.end_dim))
        if start > end:
            raise ValueError(
                f"Flatten: start_dim must not come after end_dim, but got start_dim="
                f"{self.start_dim}, end_dim={self.end_dim} for a {x.ndim}-D input"
            )
        self._cache = x.shape
        merged = math.prod(x.shape[start : end + 1])  # explicit: -1 is ambiguous for empty input
        return x.reshape(*x.shape[:start], merged, *x.shape[end + 1 :])

    def backward(self, grad_output):
        return grad_output.reshape(cached(self))

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


class Linear(Module):
    """y = x W^T + b over the last axis; W is (out_features, in_features)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: Any = "float32",
        device: str = "cpu",
    ):
        super().__init__()
        self.in_features = _args.check_int(in_features, "in_features", minimum=1)
        self.out_features = _args.check_int(out_features, "out_features", minimum=1)
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, but got bias={bias!r}")
        self.dtype = float_dtype(dtype)
        self.device = check_device(device)
        shape = (self.out_features, self.in_features)
        self.weight = Parameter(to_device(init.kaiming_uniform(shape, self.dtype), self.device))
        self.bias = (
            Parameter(
                to_device(init.default_bias(shape, self.out_features, self.dtype), self.device)
            )
            if bias
            else None
        )
        self._cache = None

    def forward(self, x):
        _args.check_array(x, "input", "Linear")
        _args.check_same_dtype("Linear", input=x, weight=self.weight.data)
        if x.ndim < 1 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear: expected input with last dimension {self.in_features}, but got "
                f"input of size {_args.shape_str(x.shape)}"
            )
        self._cache = x
        cdt = accumulator(x.dtype)
        y = x.astype(cdt, copy=False) @ self.weight.data.astype(cdt, copy=False).T
        if self.bias is not None:
            y += self.bias.data.astype(cdt, copy=False)
        return y.astype(x.dtype, copy=False)

    def backward(self, grad_output):
        x = cached(self)
        cdt = accumulator(x.dtype)
        dy = grad_output.astype(cdt, copy=False).reshape(-1, self.out_features)  # (rows, out)
        xs = x.astype(cdt, copy=False).reshape(-1, self.in_features)  # (rows, in)
        self.weight.accumulate_grad((dy.T @ xs).astype(x.dtype))
        if self.bias is not None:
            self.bias.accumulate_grad(dy.sum(axis=0).astype(x.dtype))
        dx = dy @ self.weight.data.astype(cdt, copy=False)  # (rows, in)
        return dx.reshape(x.shape).astype(x.dtype, copy=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
