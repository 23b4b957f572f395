"""Convolution layers: Conv1d/2d/3d and ConvTranspose1d/2d/3d (PyTorch signatures).

Arguments are normalised once here; every forward builds a ``ConvGeometry``
from them and the input shape, and caches the input for ``backward``.
The rank used at run time comes from the weight (``weight.ndim - 2``); the
subclasses only say how many values an int ``kernel_size``/``stride``/...
expands to.

    Conv:           S_out = floor((S + before + after - dilation*(k-1) - 1) / stride) + 1
    ConvTranspose:  S_out = (S - 1)*stride - before - after + dilation*(k-1) + output_padding + 1

>>> import numpy as np
>>> from mconv import nn
>>> up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)
>>> up(np.zeros((1, 4, 5, 5), dtype=np.float32), output_size=(10, 10)).shape
(1, 2, 10, 10)
"""

from __future__ import annotations

from typing import Any, Sequence

from .. import _args, conv_ops
from .. import functional as F
from ..geometry import resolve_padding
from . import init
from .module import Module, Parameter, check_device, float_dtype, to_device


def _padding_for_repr(padding: Any, pairs: tuple[tuple[int, int], ...]) -> Any:
    """What PyTorch shows: the string, ints when symmetric, pairs otherwise."""
    if isinstance(padding, str):
        return padding
    if all(lo == hi for lo, hi in pairs):
        return tuple(lo for lo, _ in pairs)
    return pairs


class _ConvNd(Module):
    """Shared by every convolution layer; ``_rank`` None means len(kernel_size)."""

    _rank: int | None = None
    transposed = False

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        dilation: Any = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        conv_mode: str = "cross_correlation",
        compute_mode: str = "default",
        dtype: Any = "float32",
        device: str = "cpu",
    ):
        super().__init__()
        n = self._rank
        if n is None:
            if not isinstance(kernel_size, (tuple, list)) or not kernel_size:
                raise TypeError(
                    f"kernel_dims must be a non-empty sequence of ints, but got "
                    f"kernel_dims={kernel_size!r}"
                )
            n = len(kernel_size)
        self.in_channels = _args.check_int(in_channels, "in_channels", minimum=1)
        self.out_channels = _args.check_int(out_channels, "out_channels", minimum=1)
        self.groups = _args.check_int(groups, "groups", minimum=1)
        if in_channels % groups:
            raise ValueError(
                f"in_channels must be divisible by groups, but got in_channels={in_channels}, "
                f"groups={groups}"
            )
        if out_channels % groups:
            raise ValueError(
                f"out_channels must be divisible by groups, but got "
                f"out_channels={out_channels}, groups={groups}"
            )
        self.kernel_size = _args.int_tuple(kernel_size, n, "kernel_size", minimum=1)
        self.stride = _args.int_tuple(stride, n, "stride", minimum=1)
        self.dilation = _args.int_tuple(dilation, n, "dilation", minimum=1)
        self.padding_mode = _args.choice(padding_mode, _args.PADDING_MODES, "padding_mode")
        self.conv_mode = _args.choice(conv_mode, _args.CONV_MODES, "conv_mode")
        self.compute_mode = _args.choice(compute_mode, _args.COMPUTE_MODES, "compute_mode")
        if self.transposed and self.padding_mode != "zeros":
            raise ValueError(
                f'Only "zeros" padding mode is supported for {type(self).__name__}, '
                f"but got padding_mode={padding_mode!r}"
            )
        if self.transposed and padding == "same":
            raise ValueError(
                "padding='same' is not supported for transposed convolutions, but got "
                "padding='same'"
            )
        self._padding_pairs = resolve_padding(padding, self.kernel_size, self.stride, self.dilation)
        self.padding = _padding_for_repr(padding, self._padding_pairs)
        self.output_padding = (0,) * n  # transposed convs set their own
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, but got bias={bias!r}")
        self.dtype = float_dtype(dtype)
        self.device = check_device(device)
        if self.transposed:
            shape = (self.in_channels, self.out_channels // self.groups, *self.kernel_size)
        else:
            shape = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        # drawn on the CPU (one seeded generator for every device), then moved
        self.weight = Parameter(to_device(init.kaiming_uniform(shape, self.dtype), self.device))
        self.bias = (
            Parameter(
                to_device(init.default_bias(shape, self.out_channels, self.dtype), self.device)
            )
            if bias
            else None
        )
        self._cache = None

    def reset_parameters(self) -> None:
        """Redraw weight and bias with PyTorch's default initialisation (on their device)."""
        self.weight.data = to_device(
            init.kaiming_uniform(self.weight.shape, self.weight.dtype), self.device
        )
        if self.bias is not None:
            self.bias.data = to_device(
                init.default_bias(self.weight.shape, self.out_channels, self.bias.dtype),
                self.device,
            )

    def _bias_data(self):
        return None if self.bias is None else self.bias.data

    def _take_cache(self, grad_output):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        x, geom, batched = self._cache
        expected = (geom.input_shape if self.transposed else geom.output_shape)(x.shape[0])
        F.check_like(
            f"{type(self).__name__}.backward",
            "grad_output",
            grad_output,
            expected if batched else expected[1:],
            x.dtype,
            _args.device_of(x),
        )
        return x, geom, batched, grad_output if batched else grad_output[None]

    def _run(self, x, options: dict, prepare, forward):
        """Validate, cache what backward needs, compute; unbatched input stays unbatched."""
        geom, batched = prepare(
            type(self).__name__, x, self.weight.data, self._bias_data(), options
        )
        x = x if batched else x[None]
        self._cache = (x, geom, batched)
        y = forward(x, self.weight.data, self._bias_data(), geom)
        return y if batched else y[0]

    def _backprop(self, grad_output, rule):
        """dx from ``rule`` (conv_ops' backward); weight and bias grads accumulate."""
        x, geom, batched, dy = self._take_cache(grad_output)
        dx, dw, db = rule(dy, x, self.weight.data, geom, self.bias is not None)
        self._accumulate(dw, db)
        return dx if batched else dx[0]

    def _accumulate(self, dw, db) -> None:
        self.weight.accumulate_grad(dw)
        if self.bias is not None:
            self.bias.accumulate_grad(db)

    def extra_repr(self) -> str:
        n = len(self.kernel_size)
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}"
        )
        if self.padding != (0,) * n:
            s += f", padding={self.padding}"
        if self.dilation != (1,) * n:
            s += f", dilation={self.dilation}"
        if self.output_padding != (0,) * n:
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if self.conv_mode != "cross_correlation":
            s += f", conv_mode={self.conv_mode}"
        if self.compute_mode != "default":
            s += f", compute_mode={self.compute_mode}"
        return s


class _Conv(_ConvNd):
    def forward(self, x):
        options = dict(stride=self.stride, padding=self._padding_pairs, dilation=self.dilation,
                       groups=self.groups, padding_mode=self.padding_mode,
                       conv_mode=self.conv_mode, compute_mode=self.compute_mode)  # fmt: skip
        return self._run(x, options, F.prepare_conv, conv_ops.conv_forward)

    def backward(self, grad_output):
        """Input gradient; accumulates ``weight.grad`` and ``bias.grad``."""
        return self._backprop(grad_output, conv_ops.conv_backward)


class _ConvTranspose(_ConvNd):
    transposed = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: Any,
        stride: Any = 1,
        padding: Any = 0,
        output_padding: Any = 0,
        groups: int = 1,
        bias: bool = True,
        dilation: Any = 1,
        padding_mode: str = "zeros",
        conv_mode: str = "cross_correlation",
        compute_mode: str = "default",
        dtype: Any = "float32",
        device: str = "cpu",
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         conv_mode=conv_mode, compute_mode=compute_mode, dtype=dtype,
                         device=device)  # fmt: skip
        self.output_padding = _args.int_tuple(
            output_padding, len(self.kernel_size), "output_padding", minimum=0
        )

    def forward(self, x, output_size: Sequence[int] | None = None):
        """``output_size`` picks one of the ``stride`` possible output sizes, as in PyTorch."""
        options = dict(stride=self.stride, padding=self._padding_pairs,
                       output_padding=self.output_padding, groups=self.groups,
                       dilation=self.dilation, output_size=output_size,
                       conv_mode=self.conv_mode, compute_mode=self.compute_mode)  # fmt: skip
        return self._run(x, options, F.prepare_conv_transpose, conv_ops.conv_transpose_forward)

    def backward(self, grad_output):
        """Input gradient; accumulates ``weight.grad`` and ``bias.grad``."""
        return self._backprop(grad_output, conv_ops.conv_transpose_backward)


class Conv1d(_Conv):
    """1-d convolution, PyTorch's signature plus ``conv_mode``, ``compute_mode``, ``dtype``, ``device``."""

    _rank = 1


class Conv2d(_Conv):
    """2-d convolution, PyTorch's signature plus ``conv_mode``, ``compute_mode``, ``dtype``, ``device``.

    >>> import numpy as np
    >>> Conv2d(16, 33, (3, 5), stride=(2, 1), padding=(4, 2), dilation=(3, 1))(
    ...     np.zeros((20, 16, 50, 100), dtype=np.float32)).shape
    (20, 33, 26, 100)
    """

    _rank = 2


class Conv3d(_Conv):
    """3-d convolution, PyTorch's signature plus ``conv_mode``, ``compute_mode``, ``dtype``, ``device``."""

    _rank = 3


class ConvTranspose1d(_ConvTranspose):
    """1-d transposed convolution; ``forward(x, output_size=None)``."""

    _rank = 1


class ConvTranspose2d(_ConvTranspose):
    """2-d transposed convolution; ``forward(x, output_size=None)``."""

    _rank = 2


class ConvTranspose3d(_ConvTranspose):
    """3-d transposed convolution; ``forward(x, output_size=None)``."""

    _rank = 3
