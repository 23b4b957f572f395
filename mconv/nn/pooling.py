"""Pools: max and average pools over N-d windows, the global average, and adaptive
average pools (PyTorch's bins).

Output size per spatial axis (``ceil`` for ``ceil_mode=True``, where the last window must
start inside the input or its left padding):

    floor_or_ceil((S + 2*padding - dilation*(k-1) - 1) / stride) + 1

>>> import numpy as np
>>> from mconv import nn
>>> nn.MaxPool2d(2, ceil_mode=True)(np.arange(9.0).reshape(1, 1, 3, 3))[0, 0]
array([[4., 5.],
       [7., 8.]])
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

from .. import _args
from .. import functional as F
from .._args import array_module
from ..precision import accumulator
from .module import Module, cached


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
        return x.mean(axis=tuple(range(2, x.ndim)), dtype=accumulator(x.dtype)).astype(x.dtype)

    def backward(self, grad_output):
        shape = cached(self)
        scale = 1.0 / math.prod(shape[2:])
        grad = grad_output.reshape(*grad_output.shape, *(1,) * (len(shape) - 2)) * scale
        return array_module(grad).broadcast_to(grad, shape).astype(grad_output.dtype)


class _PoolNd(Module):
    _rank: int | None = None

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                 ceil_mode: bool = False):  # fmt: skip
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
        self.dilation = _args.int_tuple(dilation, n, "dilation", minimum=1)
        self.ceil_mode = _args.check_bool(ceil_mode, "ceil_mode")
        effective = [d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation)]
        if any(2 * p > e for p, e in zip(self.padding, effective)):
            raise ValueError(
                f"pad should be at most half of effective kernel size, but got "
                f"padding={self.padding} for kernel_size={self.kernel_size} and "
                f"dilation={self.dilation}"
            )
        self._cache = None

    def _out_size(self, size: tuple[int, ...]) -> tuple[int, ...]:
        out = []
        for s, k, st, p, d in zip(size, self.kernel_size, self.stride, self.padding,
                                  self.dilation):  # fmt: skip
            span = s + 2 * p - d * (k - 1) - 1
            q = (-(-span // st) if self.ceil_mode else span // st) + 1
            if self.ceil_mode and (q - 1) * st >= s + p:  # the last window starts in the padding
                q -= 1
            out.append(q)
        if any(q < 1 for q in out):
            raise ValueError(
                f"{type(self).__name__}: output size is too small: {tuple(out)} for input size "
                f"{tuple(size)}"
            )
        return tuple(out)

    def extra_repr(self) -> str:
        s = f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        if self.dilation != (1,) * len(self.kernel_size):
            s += f", dilation={self.dilation}"
        return s + (", ceil_mode=True" if self.ceil_mode else "")


class AvgPool(_PoolNd):
    """N-d average pool (zero padding counted, like PyTorch's default), as a depthwise conv
    with weights 1/prod(kernel_size): forward is that conv, backward its transpose."""

    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0):
        super().__init__(kernel_size, stride, padding)

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
        shape, weight = cached(self)
        return F.conv_transpose(
            grad_output,
            weight,
            stride=self.stride,
            padding=self.padding,
            groups=weight.shape[0],
            output_size=shape,
        )


class MaxPool(_PoolNd):
    """N-d max pool (``dilation``, ``ceil_mode`` as in PyTorch); padded positions never win
    and NaN does. The gradient goes to the first maximum of each window (row-major). Runs on
    either device: one strided slice of the padded input per kernel tap, and no scatter."""

    def _taps(self, out):
        """For each kernel tap (row-major), the index of the padded input it reads in every
        window: ``padded[index]`` is ``(B, C, *out)``."""
        for offset in itertools.product(*(range(k) for k in self.kernel_size)):
            yield (
                Ellipsis,
                *(slice(o * d, o * d + st * (q - 1) + 1, st)
                  for o, d, st, q in zip(offset, self.dilation, self.stride, out)),
            )  # fmt: skip

    def forward(self, x):
        _args.check_array(x, "input", type(self).__name__)
        xp, n = array_module(x), len(self.kernel_size)
        if x.ndim not in (n + 1, n + 2):
            raise ValueError(
                f"{type(self).__name__}: expected a {n + 1}-D or {n + 2}-D input, but got input "
                f"of size {_args.shape_str(x.shape)}"
            )
        batched = x if x.ndim == n + 2 else x[None]
        out = self._out_size(batched.shape[2:])
        # padded so that every window fits: p before, what the last window needs after
        sizes = tuple((q - 1) * st + d * (k - 1) + 1 for q, st, d, k in
                      zip(out, self.stride, self.dilation, self.kernel_size))  # fmt: skip
        padded = batched
        if any(self.padding) or any(z > s + p for z, s, p in zip(sizes, batched.shape[2:],
                                                                  self.padding)):  # fmt: skip
            full = tuple(max(z, s + p) + p for z, s, p in zip(sizes, batched.shape[2:],
                                                             self.padding))  # fmt: skip
            padded = xp.full((*batched.shape[:2], *full), -xp.inf, dtype=batched.dtype)
            interior = zip(self.padding, batched.shape[2:])
            padded[(Ellipsis, *(slice(p, p + s) for p, s in interior))] = batched
        taps = self._taps(out)
        y = padded[next(taps)].copy()  # (B, C, *out)
        for index in taps:
            xp.maximum(y, padded[index], out=y)  # NaN propagates
        self._cache = (x.shape, padded, y, out)  # backward finds each window's first maximum
        return y if x.ndim == n + 2 else y[0]

    def backward(self, grad_output):
        shape, padded, y, out = cached(self)
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


def _bins(size: int, out: int) -> np.ndarray:
    """PyTorch's adaptive bins as an averaging matrix (out, size): row i averages
    [floor(i*size/out), ceil((i+1)*size/out))."""
    matrix = np.zeros((out, size))  # host: copied to the input's device by the caller
    for i in range(out):
        start, stop = (i * size) // out, -(-((i + 1) * size) // out)
        matrix[i, start:stop] = 1.0 / (stop - start)
    return matrix


class AdaptiveAvgPool(Module):
    """Average pool to a given output size (int, N ints, None for "keep this axis"), with
    PyTorch's bins; separable, so each axis is one small matrix product (backward: its
    transpose)."""

    _rank: int | None = None

    def __init__(self, output_size: Any):
        super().__init__()
        n = self._rank or (len(output_size) if isinstance(output_size, (tuple, list)) else 0)
        if n == 0:
            raise TypeError(
                f"output_size must be a sequence for an N-d pool, but got "
                f"output_size={output_size!r}"
            )
        items = output_size if isinstance(output_size, (tuple, list)) else (output_size,) * n
        if len(items) != n or not all(v is None or (_args.is_int(v) and v >= 1) for v in items):
            raise ValueError(
                f"output_size must be a positive int or {n} positive ints (or None), but got "
                f"output_size={output_size!r}"
            )
        self.output_size = tuple(None if v is None else int(v) for v in items)
        self._cache = None

    def forward(self, x):
        _args.check_array(x, "input", type(self).__name__)
        n = len(self.output_size)
        if x.ndim not in (n + 1, n + 2):
            raise ValueError(
                f"{type(self).__name__}: expected a {n + 1}-D or {n + 2}-D input, but got input "
                f"of size {_args.shape_str(x.shape)}"
            )
        xp, acc = array_module(x), accumulator(x.dtype)
        sizes = x.shape[x.ndim - n :]
        out = tuple(s if o is None else o for s, o in zip(sizes, self.output_size))
        mats = [xp.asarray(_bins(s, o), dtype=acc) for s, o in zip(sizes, out)]  # host: bins
        self._cache = (mats, x.dtype)
        return _apply(x.astype(acc, copy=False), mats, xp).astype(x.dtype, copy=False)

    def backward(self, grad_output):
        mats, dtype = cached(self)
        xp = array_module(grad_output)
        dy = grad_output.astype(mats[0].dtype, copy=False)
        return _apply(dy, [m.T for m in mats], xp).astype(dtype, copy=False)

    def extra_repr(self) -> str:
        size = self.output_size if len(self.output_size) > 1 else self.output_size[0]
        return f"output_size={size}"


def _apply(a, mats, xp):
    """Contract each of the last len(mats) axes of ``a`` with its matrix (out, in)."""
    first = a.ndim - len(mats)
    for i, m in enumerate(mats):
        a = xp.moveaxis(xp.tensordot(a, m, axes=([first + i], [1])), -1, first + i)
    return a


class AdaptiveAvgPool1d(AdaptiveAvgPool):
    """1-d :class:`AdaptiveAvgPool`."""

    _rank = 1


class AdaptiveAvgPool2d(AdaptiveAvgPool):
    """2-d :class:`AdaptiveAvgPool` (``AdaptiveAvgPool2d(1)``: torchvision's global pool)."""

    _rank = 2


class AdaptiveAvgPool3d(AdaptiveAvgPool):
    """3-d :class:`AdaptiveAvgPool`."""

    _rank = 3
