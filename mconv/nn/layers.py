"""The layers a small CNN needs besides convolutions: Sequential, ReLU,
Flatten, Linear, pools. Each caches in ``forward`` what ``backward`` needs.

>>> import numpy as np
>>> from mconv import nn
>>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.GlobalAvgPool(), nn.Linear(4, 2))
>>> x = np.ones((5, 1, 8, 8), dtype=np.float32)
>>> net(x).shape, net.backward(np.ones((5, 2), dtype=np.float32)).shape
((5, 2), (5, 1, 8, 8))
"""

from __future__ import annotations

import itertools
import math
from typing import Any


from .. import _args
from .._args import array_module
from .. import functional as F
from ..precision import accumulator
from . import init
from .module import Module, Parameter, check_device, float_dtype, to_device


def _cached(module: Module, what: str = "_cache"):
    value = getattr(module, what)
    if value is None:
        raise RuntimeError(f"{type(module).__name__}.backward() called before forward()")
    return value


class Sequential(Module):
    """Runs children in order; ``backward`` runs their ``backward`` in reverse."""

    def __init__(self, *modules: Module):
        super().__init__()
        for index, module in enumerate(modules):
            if not isinstance(module, Module):
                raise TypeError(
                    f"Sequential takes Modules, but argument {index} is {type(module).__name__}"
                )
            setattr(self, str(index), module)

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


class ReLU(Module):
    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        self._cache = x > 0
        return array_module(x).where(self._cache, x, x.dtype.type(0))

    def backward(self, grad_output):
        dtype = grad_output.dtype
        return array_module(grad_output).where(_cached(self), grad_output, dtype.type(0))


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
        return grad_output.reshape(_cached(self))

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
        y = x.astype(cdt) @ self.weight.data.astype(cdt).T
        if self.bias is not None:
            y += self.bias.data.astype(cdt)
        return y.astype(x.dtype, copy=False)

    def backward(self, grad_output):
        x = _cached(self)
        cdt = accumulator(x.dtype)
        dy = grad_output.astype(cdt).reshape(-1, self.out_features)  # (rows, out)
        xs = x.astype(cdt).reshape(-1, self.in_features)  # (rows, in)
        self.weight.accumulate_grad((dy.T @ xs).astype(x.dtype))
        if self.bias is not None:
            self.bias.accumulate_grad(dy.sum(axis=0).astype(x.dtype))
        dx = dy @ self.weight.data.astype(cdt)  # (rows, in)
        return dx.reshape(x.shape).astype(x.dtype, copy=False)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class GlobalAvgPool(Module):
    """(B, C, *S) -> (B, C): the mean over every spatial axis."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        if x.ndim < 3:
            raise ValueError(
                f"GlobalAvgPool: expected input (B, C, *spatial), but got input of size "
                f"{_args.shape_str(x.shape)}"
            )
        self._cache = x.shape
        return x.mean(axis=tuple(range(2, x.ndim)), dtype=accumulator(x.dtype)).astype(
            x.dtype
        )

    def backward(self, grad_output):
        shape = _cached(self)
        scale = 1.0 / math.prod(shape[2:])
        grad = grad_output.reshape(*grad_output.shape, *(1,) * (len(shape) - 2)) * scale
        return array_module(grad).broadcast_to(grad, shape).astype(grad_output.dtype)


class _PoolNd(Module):
    _rank: int | None = None

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0):
        super().__init__()
        n = self._rank or (len(kernel_size) if isinstance(kernel_size, (tuple, list)) else 0)
        if n == 0:
            raise TypeError(
                f"kernel_size must be a sequence of ints for an N-d pool, but got "
                f"kernel_size={kernel_size!r}"
            )
        self.kernel_size = _args.int_tuple(kernel_size, n, "kernel_size", minimum=1)
        self.stride = (
            self.kernel_size if stride is None else _args.int_tuple(stride, n, "stride", minimum=1)
        )
        self.padding = _args.int_tuple(padding, n, "padding", minimum=0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(
                f"pad should be at most half of effective kernel size, but got "
                f"padding={self.padding} for kernel_size={self.kernel_size}"
            )
        self._cache = None

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class AvgPool(_PoolNd):
    """N-d average pool (zero padding counted, like PyTorch's default), as a depthwise conv
    with weights 1/prod(kernel_size): forward is that conv, backward its transpose."""

    def _weight(self, x):
        return array_module(x).full(  # on x's device
            (x.shape[-len(self.kernel_size) - 1], 1, *self.kernel_size),
            1.0 / math.prod(self.kernel_size),
            dtype=x.dtype,
        )

    def forward(self, x):
        _args.check_array(x, "input", type(self).__name__)
        weight = self._weight(x)
        self._cache = (x.shape, weight)
        return F.conv(x, weight, stride=self.stride, padding=self.padding, groups=weight.shape[0])

    def backward(self, grad_output):
        shape, weight = _cached(self)
        return F.conv_transpose(
            grad_output,
            weight,
            stride=self.stride,
            padding=self.padding,
            groups=weight.shape[0],
            output_size=shape,
        )


class MaxPool(_PoolNd):
    """N-d max pool; padded positions never win and NaN does (as in PyTorch). The gradient
    goes to the first maximum of each window (row-major). Runs on either device: one strided
    slice of the padded input per kernel tap, and no scatter."""

    def _taps(self, out):
        """For each kernel tap (row-major), the index of the padded input it reads in every
        window: ``padded[index]`` is ``(B, C, *out)``."""
        for offset in itertools.product(*(range(k) for k in self.kernel_size)):
            yield (
                Ellipsis,
                *(slice(o, o + st * (q - 1) + 1, st) for o, st, q in zip(offset, self.stride, out)),
            )

    def forward(self, x):
        _args.check_array(x, "input", type(self).__name__)
        xp, n = array_module(x), len(self.kernel_size)
        batched = x if x.ndim == n + 2 else x[None]
        padded = batched
        if any(self.padding):  # pad with -inf so that padding never wins
            sizes = tuple(s + 2 * p for s, p in zip(batched.shape[2:], self.padding))
            padded = xp.full((*batched.shape[:2], *sizes), -xp.inf, dtype=batched.dtype)
            interior = zip(self.padding, batched.shape[2:])
            padded[(Ellipsis, *(slice(p, p + s) for p, s in interior))] = batched
        out = tuple(
            (s - k) // st + 1 for s, k, st in zip(padded.shape[2:], self.kernel_size, self.stride)
        )
        taps = self._taps(out)
        y = padded[next(taps)].copy()  # (B, C, *out)
        for index in taps:
            xp.maximum(y, padded[index], out=y)  # NaN propagates
        self._cache = (x.shape, padded, y, out)  # backward finds each window's first maximum
        return y if x.ndim == n + 2 else y[0]

    def backward(self, grad_output):
        shape, padded, y, out = _cached(self)
        xp, n = array_module(grad_output), len(self.kernel_size)
        dy = grad_output if grad_output.ndim == n + 2 else grad_output[None]
        dy = dy.astype(accumulator(dy.dtype))
        dx = xp.zeros(padded.shape, dtype=dy.dtype)
        nan = xp.isnan(y)
        nan = nan if bool(nan.any()) else None
        open_ = xp.ones(y.shape, dtype=bool)  # windows whose maximum is not found yet
        hit = xp.empty(y.shape, dtype=bool)
        share = xp.empty(y.shape, dtype=dy.dtype)  # what this tap's inputs receive
        for index in self._taps(out):  # one tap's windows never share an input
            value = padded[index]
            xp.equal(value, y, out=hit)
            if nan is not None:
                hit |= nan & xp.isnan(value)
            hit &= open_
            xp.greater(open_, hit, out=open_)  # open and not hit
            xp.multiply(dy, hit, out=share)
            dx[index] += share
        dx = dx[(Ellipsis, *(slice(p, p + s) for p, s in zip(self.padding, shape[-n:])))]
        dx = dx.astype(grad_output.dtype)
        return dx if len(shape) == n + 2 else dx[0]


class AvgPool1d(AvgPool):
    """1-d :class:`AvgPool`."""

    _rank = 1


class AvgPool2d(AvgPool):
    """2-d :class:`AvgPool`."""

    _rank = 2


class AvgPool3d(AvgPool):
    """3-d :class:`AvgPool`."""

    _rank = 3


class MaxPool1d(MaxPool):
    """1-d :class:`MaxPool`."""

    _rank = 1


class MaxPool2d(MaxPool):
    """2-d :class:`MaxPool`."""

    _rank = 2


class MaxPool3d(MaxPool):
    """3-d :class:`MaxPool`."""

    _rank = 3
