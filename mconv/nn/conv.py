"""Convolution layers: Conv1d/2d/3d and ConvTranspose1d/2d/3d (PyTorch signatures).

Arguments are normalised once here; every forward is one ``conv_call`` (the
geometry from the options and the input shape, ``mconv.call``) and one
``conv_ops.forward``, and caches the call and the input for ``backward``.
Conv and transposed conv differ in data only (``transposed``, the weight
layout, ``output_padding``). The rank used at run time comes from the weight
(``weight.ndim - 2``); the subclasses only say how many values an int
``kernel_size``/``stride``/... expands to.

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
from ..call import check_grad, conv_call
from ..geometry import check_padding_mode, is_depthwise
from ..precision import accumulator
from . import init
from .module import Module, Parameter, check_device, float_dtype, to_device


def _padding_for_repr(pairs: tuple[tuple[int, int], ...] | str) -> Any:
    """What PyTorch shows: the string, ints when symmetric, pairs otherwise."""
    if isinstance(pairs, str) or not all(lo == hi for lo, hi in pairs):
        return pairs
    return tuple(lo for lo, _ in pairs)


class _ConvNd(Module):
    """Every convolution layer; ``transposed`` picks the op, ``_rank`` None means
    len(kernel_size). ``is_conv(module)`` (``mconv.nn``) tells these layers from others."""

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
        self.padding_mode = check_padding_mode(padding_mode, self.transposed, n)
        self.conv_mode = _args.choice(conv_mode, _args.CONV_MODES, "conv_mode")
        self.compute_mode = _args.choice(compute_mode, _args.COMPUTE_MODES, "compute_mode")
        # pairs (negative: crops) or 'same'/'same_lower'/'valid', resolved per input size
        self._padding = _args.padding_pairs(padding, n, allow_negative=True)
        self.padding = _padding_for_repr(self._padding)
        self.output_padding = (0,) * n  # transposed convs set their own
        self.partial_sums = False  # see on_shard
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

    @property
    def depthwise(self) -> bool:
        """One input channel per group (C = G > 1): a depthwise conv, any channel multiplier."""
        return is_depthwise(self.groups, self.in_channels)

    def options(self) -> dict:
        """The keyword arguments of ``F.conv`` (transposed: ``F.conv_transpose``) this layer
        computes with."""
        options = dict(stride=self.stride, padding=self._padding, dilation=self.dilation,
                       groups=self.groups, padding_mode=self.padding_mode,
                       conv_mode=self.conv_mode, compute_mode=self.compute_mode)  # fmt: skip
        if self.transposed:
            options["output_padding"] = self.output_padding
        return options

    def forward(self, x, **extra):
        """The op on ``x`` (batched or not); caches the call and the input for backward."""
        b, options = self._bias_data(), {**self.options(), **extra}
        dtype = None
        if self.partial_sums:  # summed elsewhere before the one rounding: keep the accumulator
            options["compute_mode"], dtype = "float32", accumulator(x.dtype)
        call = conv_call(type(self).__name__, x, self.weight.data, b, options,
                         transposed=self.transposed)  # fmt: skip
        self._cache = (call, call.batch(x))
        return call.unbatch(conv_ops.forward(call, call.batch(x), self.weight.data, b, dtype))

    def backward(self, grad_output):
        """Input gradient; accumulates ``weight.grad`` and ``bias.grad``."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        call, x = self._cache
        check_grad(f"{type(self).__name__}.backward", call, grad_output, x)
        dx, dw, db = conv_ops.backward(call, call.batch(grad_output), x, self.weight.data)
        self.weight.accumulate_grad(dw)
        if self.bias is not None:
            self.bias.accumulate_grad(db)
        return call.unbatch(dx)

    def on_shard(self, weight, bias, groups: int, partial_sums: bool = False) -> "_ConvNd":
        """This layer (class and options) on a shard: ``weight`` and ``bias`` arrays become
        its Parameters, ``groups`` its groups; nothing is drawn. ``partial_sums``: forward
        returns the accumulator (fp32 for fp16), for partial outputs that are summed across
        ranks before the one rounding. Used by ``parallel``'s layers."""
        layer = object.__new__(type(self))
        Module.__init__(layer)
        for key, value in self.__dict__.items():
            if key not in ("_parameters", "_buffers", "_modules", "training"):
                object.__setattr__(layer, key, value)
        lead, per_group = weight.shape[:2]
        layer.groups, layer.partial_sums, layer._cache = groups, partial_sums, None
        channels = (lead, per_group * groups)
        layer.in_channels, layer.out_channels = channels if self.transposed else channels[::-1]
        layer.weight = Parameter(weight)
        layer.bias = None if bias is None else Parameter(bias)
        return layer

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


def is_conv(module: Any) -> bool:
    """Whether ``module`` is a convolution layer of ``mconv.nn`` (Conv1d/2d/3d,
    ConvTranspose1d/2d/3d, Conv, ConvTranspose), with ``transposed``, ``groups``,
    ``depthwise`` and a weight in PyTorch's layout."""
    return isinstance(module, _ConvNd)


class _Conv(_ConvNd):
    def forward(self, x):
        return super().forward(x)


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
        return super().forward(x, output_size=output_size)


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
