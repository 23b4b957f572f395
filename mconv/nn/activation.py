"""Elementwise activations with PyTorch's names, formulas and gradients at the kinks.

Each computes in the accumulator (fp32 for fp16, ``mconv.precision``) and rounds once;
``backward(dy)`` returns ``dy * f'(x)`` from what forward cached. ``PReLU`` learns its
slopes (one, or one per channel of axis 1).

>>> import numpy as np
>>> from mconv import nn
>>> nn.Hardswish()(np.array([-4.0, -1.0, 0.0, 1.0, 4.0]))
array([-0.        , -0.33333333,  0.        ,  0.66666667,  4.        ])
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _args
from .._args import array_module
from ..backends import numpy_elementwise
from ..precision import accumulator
from .module import Module, Parameter, cached, check_device, float_dtype, to_device


class _Elementwise(Module):
    """y = f(x); backward: dy * f'(x). Subclasses give ``_f(x, xp)`` and ``_df(x, y, xp)``
    on accumulator arrays."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        _args.check_array(x, "input", type(self).__name__)
        xp, wide = array_module(x), x.astype(accumulator(x.dtype), copy=False)
        y = self._f(wide, xp)
        self._cache = (wide, y, x.dtype)
        return y.astype(x.dtype, copy=False)

    def backward(self, grad_output):
        wide, y, dtype = cached(self)
        xp = array_module(grad_output)
        dx = grad_output.astype(wide.dtype, copy=False) * self._df(wide, y, xp)
        return dx.astype(dtype, copy=False)


class Identity(Module):
    """y = x (any arguments are accepted and ignored, as in PyTorch)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()

    def forward(self, x):
        return x

    def backward(self, grad_output):
        return grad_output


class ReLU(Module):
    """0 where x < 0, else x, in x's own dtype (exact; NaN and -0.0 pass, as in PyTorch);
    the gradient is 0 where the output is <= 0, else dy (NaN outputs pass dy, as in
    PyTorch)."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        y = numpy_elementwise.relu(x)
        self._cache = y
        return y

    def backward(self, grad_output):
        dtype = grad_output.dtype
        return array_module(grad_output).where(cached(self) <= 0, dtype.type(0), grad_output)


class ReLU6(_Elementwise):
    """min(max(x, 0), 6) (NaN and -0.0 pass, as in PyTorch); gradient 1 on (0, 6) and at
    NaN."""

    def _f(self, x, xp):
        return xp.clip(x, 0, 6)

    def _df(self, x, y, xp):
        return ~((x <= 0) | (x >= 6))  # as PyTorch's hardtanh_backward: NaN passes dy


class LeakyReLU(_Elementwise):
    """x for x > 0, negative_slope * x otherwise."""

    def __init__(self, negative_slope: float = 0.01):
        super().__init__()
        self.negative_slope = _args.check_number(negative_slope, "negative_slope")

    def _f(self, x, xp):
        return xp.where(x > 0, x, x * self.negative_slope)

    def _df(self, x, y, xp):
        return xp.where(x > 0, x.dtype.type(1), x.dtype.type(self.negative_slope))

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class Sigmoid(_Elementwise):
    """1 / (1 + exp(-x)), without overflow for large |x|."""

    def _f(self, x, xp):
        e = xp.exp(-xp.abs(x))
        return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))

    def _df(self, x, y, xp):
        return y * (1 - y)


class Tanh(_Elementwise):
    def _f(self, x, xp):
        return xp.tanh(x)

    def _df(self, x, y, xp):
        return 1 - y * y


class SiLU(_Elementwise):
    """x * sigmoid(x)."""

    def _f(self, x, xp):
        return x * Sigmoid._f(self, x, xp)

    def _df(self, x, y, xp):
        s = Sigmoid._f(self, x, xp)
        return s * (1 + x * (1 - s))


class Hardsigmoid(_Elementwise):
    """relu6(x + 3) / 6; gradient 1/6 on (-3, 3)."""

    def _f(self, x, xp):
        return xp.clip(x + 3, 0, 6) / 6

    def _df(self, x, y, xp):
        # host: PyTorch's backward multiplies by 1/6 rounded to fp32 (1.0f / 6.0f), at any
        return ((x > -3) & (x < 3)) * x.dtype.type(_ONE_SIXTH_FP32)  # precision


class Hardswish(_Elementwise):
    """x * relu6(x + 3) / 6; gradient x/3 + 1/2 on (-3, 3), 0 below, 1 above (at -3 and 3
    too, as PyTorch)."""

    def _f(self, x, xp):
        return x * xp.clip(x + 3, 0, 6) / 6

    def _df(self, x, y, xp):
        middle = xp.where(x < 3, x / 3 + 0.5, x.dtype.type(1))
        return xp.where(x <= -3, x.dtype.type(0), middle)


class GELU(_Elementwise):
    """x * Phi(x) (``approximate='none'``, the exact erf form) or its tanh approximation
    (``approximate='tanh'``). Computed without cancellation for negative x:
    Phi(x) = erfc(-x / sqrt 2) / 2, and (1 + tanh u) / 2 = sigmoid(2u)."""

    def __init__(self, approximate: str = "none"):
        super().__init__()
        self.approximate = _args.choice(approximate, ("none", "tanh"), "approximate")

    def _gate(self, x, xp):
        """Phi(x), or sigmoid(2u) with u = K (x + 0.044715 x^3)."""
        if self.approximate == "tanh":
            return Sigmoid._f(self, 2 * _K * (x + 0.044715 * x**3), xp)
        return 0.5 * erfc(-x / math.sqrt(2.0))

    def _f(self, x, xp):
        return x * self._gate(x, xp)

    def _df(self, x, y, xp):
        s = self._gate(x, xp)
        if self.approximate == "tanh":  # d/dx x s(2u) = s + 2 x s (1 - s) u'
            return s + 2 * x * s * (1 - s) * _K * (1 + 3 * 0.044715 * x * x)
        return s + x * xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


_K = math.sqrt(2.0 / math.pi)
_ONE_SIXTH_FP32 = float(np.float32(1.0) / np.float32(6.0))  # host: a constant


def erfc(x):
    """The complementary error function on either device (CuPy's, SciPy's where installed,
    else math.erfc element by element: exact, slower)."""
    if _args.is_cupy(x):
        from cupyx.scipy.special import erfc as cupy_erfc  # noqa: PLC0415 - with CuPy only

        return cupy_erfc(x)
    try:
        from scipy.special import erfc as scipy_erfc  # noqa: PLC0415 - optional
    except ImportError:
        return np.frompyfunc(math.erfc, 1, 1)(x).astype(x.dtype)  # host: NumPy input only
    return scipy_erfc(x)


class PReLU(Module):
    """max(0, x) + weight * min(0, x); ``weight`` (num_parameters,) is one slope, or one per
    channel (axis 1; an input of fewer than 2 dimensions has one channel)."""

    def __init__(self, num_parameters: int = 1, init: float = 0.25, dtype: Any = "float32",
                 device: str = "cpu"):  # fmt: skip
        super().__init__()
        self.num_parameters = _args.check_int(num_parameters, "num_parameters", minimum=1)
        init = _args.check_number(init, "init")
        self.dtype, self.device = float_dtype(dtype), check_device(device)
        slopes = np.full(self.num_parameters, init, dtype=self.dtype)  # host: then moved
        self.weight = Parameter(to_device(slopes, self.device))
        self._cache = None

    def _slopes(self, x):
        """The weight shaped to broadcast against x."""
        if self.num_parameters == 1:
            return self.weight.data.reshape(())
        if x.ndim < 2 or x.shape[1] != self.num_parameters:
            raise ValueError(
                f"PReLU: expected input with {self.num_parameters} channels on axis 1, "
                f"but got input of size {_args.shape_str(x.shape)}"
            )
        shape = [1] * x.ndim
        shape[1] = -1
        return self.weight.data.reshape(shape)

    def forward(self, x):
        _args.check_array(x, "input", "PReLU")
        _args.check_same_dtype("PReLU", input=x, weight=self.weight.data)
        xp, acc = array_module(x), accumulator(x.dtype)
        wide, a = x.astype(acc, copy=False), self._slopes(x).astype(acc, copy=False)
        self._cache = (wide, a, x.dtype)
        return xp.where(wide > 0, wide, a * wide).astype(x.dtype, copy=False)

    def backward(self, grad_output):
        wide, a, dtype = cached(self)
        xp = array_module(grad_output)
        dy = grad_output.astype(wide.dtype, copy=False)
        negative = xp.where(wide > 0, wide.dtype.type(0), wide)  # min(0, x)
        dw = dy * negative
        if self.num_parameters == 1:
            dw = dw.sum(dtype=wide.dtype).reshape(1)
        else:
            dw = dw.sum(axis=tuple(i for i in range(wide.ndim) if i != 1))
        self.weight.accumulate_grad(dw.astype(self.weight.dtype))
        return xp.where(wide > 0, dy, a * dy).astype(dtype, copy=False)

    def extra_repr(self) -> str:
        return f"num_parameters={self.num_parameters}"


class Softmax(Module):
    """exp(x) / sum(exp(x)) along ``dim`` (computed from x - max); backward:
    y * (dy - sum(dy * y))."""

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.dim = None if dim is None else _args.check_int(dim, "dim")
        self._cache = None

    def forward(self, x):
        _args.check_array(x, "input", "Softmax")
        xp, wide = array_module(x), x.astype(accumulator(x.dtype), copy=False)
        axis = self.dim if self.dim is not None else (0 if x.ndim in (0, 1, 3) else 1)
        e = xp.exp(wide - wide.max(axis=axis, keepdims=True))
        y = e / e.sum(axis=axis, keepdims=True)
        self._cache = (y, axis, x.dtype)
        return y.astype(x.dtype, copy=False)

    def backward(self, grad_output):
        y, axis, dtype = cached(self)
        dy = grad_output.astype(y.dtype, copy=False)
        return (y * (dy - (dy * y).sum(axis=axis, keepdims=True))).astype(dtype, copy=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
