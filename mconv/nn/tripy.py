"""Tripy-style N-d ``Conv`` and ``ConvTranspose``: ``kernel_dims`` gives the rank,
``padding`` is a sequence of ``(before, after)`` pairs (default all 0).

    Conv:           S_out = floor((S + before + after - dilation*(k-1) - 1) / stride) + 1
    ConvTranspose:  S_out = (S - 1)*stride - before - after + dilation*(k-1) + 1

>>> import numpy as np
>>> conv = Conv(1, 1, (2, 2), bias=False)
>>> conv.weight.data[...] = np.arange(4.0).reshape(1, 1, 2, 2)
>>> conv(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4))[0, 0, 0]
array([24., 30., 36.], dtype=float32)
"""

from __future__ import annotations

from typing import Any, Sequence

from .conv import _Conv, _ConvTranspose


def _tripy_args(kernel_dims, padding, stride, groups, dilation):
    if not isinstance(kernel_dims, (tuple, list)) or not kernel_dims:
        raise TypeError(
            f"kernel_dims must be a non-empty sequence of ints, but got kernel_dims={kernel_dims!r}"
        )
    n = len(kernel_dims)
    return (
        tuple(kernel_dims),
        ((0, 0),) * n if padding is None else padding,
        (1,) * n if stride is None else stride,
        1 if groups is None else groups,
        (1,) * n if dilation is None else dilation,
    )


class Conv(_Conv):
    """N-d convolution with Tripy's signature; N = ``len(kernel_dims)``.

    ``padding`` is a sequence of ``(before, after)`` pairs (default all 0).

    >>> import numpy as np
    >>> conv = Conv(1, 1, (2, 2), bias=False)
    >>> conv.weight.data[...] = np.arange(4.0).reshape(1, 1, 2, 2)
    >>> conv(np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4))[0, 0, 0]
    array([24., 30., 36.], dtype=float32)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_dims: Sequence[int],
        padding: Sequence[Sequence[int]] | None = None,
        stride: Sequence[int] | None = None,
        groups: int | None = None,
        dilation: Sequence[int] | None = None,
        bias: bool = True,
        dtype: Any = "float32",
        *,
        padding_mode: str = "zeros",
        conv_mode: str = "cross_correlation",
        compute_mode: str = "default",
    ):
        kernel, padding, stride, groups, dilation = _tripy_args(
            kernel_dims, padding, stride, groups, dilation
        )
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                         conv_mode=conv_mode, compute_mode=compute_mode, dtype=dtype)  # fmt: skip


class ConvTranspose(_ConvTranspose):
    """N-d transposed convolution with Tripy's signature; N = ``len(kernel_dims)``.

    Output: ``(S - 1)*stride - before - after + dilation*(k-1) + 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_dims: Sequence[int],
        padding: Sequence[Sequence[int]] | None = None,
        stride: Sequence[int] | None = None,
        groups: int | None = None,
        dilation: Sequence[int] | None = None,
        bias: bool = True,
        dtype: Any = "float32",
        *,
        output_padding: Any = 0,
        conv_mode: str = "cross_correlation",
        compute_mode: str = "default",
    ):
        kernel, padding, stride, groups, dilation = _tripy_args(
            kernel_dims, padding, stride, groups, dilation
        )
        super().__init__(in_channels, out_channels, kernel, stride=stride, padding=padding,
                         output_padding=output_padding, groups=groups, bias=bias,
                         dilation=dilation, conv_mode=conv_mode, compute_mode=compute_mode,
                         dtype=dtype)  # fmt: skip
