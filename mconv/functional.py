"""Stateless convolution ops: forward, backward (dx, dw, db) and JVP.

Input is batched ``(B, C, *S)`` or unbatched ``(C, *S)``; the spatial rank N
comes from ``weight.ndim - 2``. Weights use PyTorch's layout: conv
``(O, C/groups, *k)``, transposed conv ``(C, O/groups, *k)``, bias ``(O,)``.

Output size per spatial dimension (``before``/``after`` the padding pair):

    conv            floor((S + before + after - dilation*(k-1) - 1) / stride) + 1
    conv_transpose  (S - 1)*stride - before - after + dilation*(k-1) + output_padding + 1

>>> import numpy as np
>>> from mconv import functional as F
>>> x = np.arange(16.0).reshape(1, 1, 4, 4)
>>> F.conv2d(x, np.ones((1, 1, 2, 2)), stride=2)[0, 0]
array([[10., 18.],
       [42., 50.]])
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from . import _args, conv_ops
from ._args import shape_str
from .geometry import conv_geometry, conv_transpose_geometry
from .padding import pad, pad_backward

__all__ = [
    "conv", "conv1d", "conv2d", "conv3d",
    "conv_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "conv_backward", "conv_transpose_backward", "conv_jvp", "conv_transpose_jvp",
    "pad", "pad_backward",
]  # fmt: skip


_CONV_OPTIONS = {"stride", "padding", "dilation", "groups", "padding_mode", "conv_mode",
                 "compute_mode"}  # fmt: skip
_CONV_TRANSPOSE_OPTIONS = _CONV_OPTIONS | {"output_padding", "output_size"}


def _check_inputs(op: str, x, weight, bias, kwargs: dict, allowed: set, out_channels) -> None:
    """Types and dtypes of the arrays, names of the options, and the bias size
    (``out_channels(weight.shape)``, or None when it cannot be known yet)."""
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{op}() got an unexpected keyword argument {unknown[0]!r}")
    _args.check_array(x, "input", op)
    _args.check_array(weight, "weight", op)
    if bias is not None:
        _args.check_array(bias, "bias", op)
    _args.check_same_dtype(op, input=x, weight=weight, bias=bias)
    _args.check_same_device(op, input=x, weight=weight, bias=bias)
    out_channels = out_channels(weight.shape) if weight.ndim >= 3 else None
    if bias is not None and out_channels is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(
            f"Given weight of size {shape_str(weight.shape)}, expected bias to be 1-dimensional "
            f"with {out_channels} elements, but got bias of size {shape_str(bias.shape)} instead"
        )


def _check_rank(op: str, weight, n: int | None) -> None:
    if n is not None and weight.ndim != n + 2:
        raise ValueError(
            f"{op} expects a {n + 2}-D weight (out_channels, in_channels/groups, {n} kernel dims), "
            f"but got weight of size {shape_str(weight.shape)}"
        )


def check_like(op: str, name: str, value, expected_shape, dtype, device: str | None = None) -> None:
    """A gradient or tangent must have exactly the shape and dtype it stands for."""
    _args.check_array(value, name, op)
    if tuple(value.shape) != tuple(expected_shape):
        raise ValueError(
            f"{op}: expected {name} of size {shape_str(expected_shape)}, but got "
            f"{name} of size {shape_str(value.shape)}"
        )
    if value.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}, but got {name}.dtype={value.dtype}")
    if device is not None and _args.device_of(value) != device:
        raise ValueError(
            f"{op}: {name} must be on {device}, but got {name} on {_args.device_of(value)}"
        )


def _batched(a, batched: bool):
    """(C, *S) -> (1, C, *S) for unbatched input; None stays None."""
    return a if batched or a is None else a[None]


def _unbatched(a, batched: bool):
    return a if batched or a is None else a[0]


def prepare_conv(op: str, x, weight, bias, kwargs: dict, n: int | None = None):
    """Validate a conv call (types, dtypes, bias, rank ``n`` if given); return (geometry, batched).

    ``kwargs`` holds conv's keyword arguments (stride, padding, ..., compute_mode)."""
    _check_inputs(op, x, weight, bias, kwargs, _CONV_OPTIONS, lambda shape: shape[0])
    _check_rank(op, weight, n)
    return conv_geometry(x.shape, weight.shape, op=op, **kwargs)


def prepare_conv_transpose(op: str, x, weight, bias, kwargs: dict, n: int | None = None):
    """Validate a transposed-conv call; return (geometry, batched)."""
    groups = kwargs.get("groups", 1)

    def out_channels(shape):
        return shape[1] * groups if _args.is_int(groups) else None

    _check_inputs(op, x, weight, bias, kwargs, _CONV_TRANSPOSE_OPTIONS, out_channels)
    _check_rank(op, weight, n)
    return conv_transpose_geometry(x.shape, weight.shape, op=op, **kwargs)


def _check_tangents(op, geom, x, weight, dx, dweight, dbias, bias_channels) -> None:
    for name, tangent, primal in (("dx", dx, x), ("dweight", dweight, weight)):
        if tangent is not None:
            check_like(op, name, tangent, primal.shape, primal.dtype, _args.device_of(primal))
    if dbias is not None:
        check_like(op, "dbias", dbias, (bias_channels,), x.dtype, _args.device_of(x))


# -- convolution ---------------------------------------------------------------------------


def _conv(op: str, n: int | None, x, weight, bias, kwargs: dict):
    geom, batched = prepare_conv(op, x, weight, bias, kwargs, n)
    y = conv_ops.conv_forward(_batched(x, batched), weight, bias, geom)
    return _unbatched(y, batched)


def conv(
    x,
    weight,
    bias=None,
    stride: Any = 1,
    padding: Any = 0,
    dilation: Any = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    conv_mode: str = "cross_correlation",
    compute_mode: str = "default",
):
    """N-d convolution; N = ``weight.ndim - 2``.

    ``padding``: an int, N ints, N ``(before, after)`` pairs, ``'same'``
    (stride 1; the odd element goes after) or ``'valid'``. ``padding_mode``:
    ``'zeros'``, ``'reflect'`` (pad < size), ``'replicate'``, ``'circular'``
    (pad <= size). ``conv_mode='convolution'`` flips the kernel spatially.
    ``compute_mode='float32'`` accumulates fp16 in fp32 and rounds once.

    Output: ``floor((S + before + after - dilation*(k-1) - 1) / stride) + 1``.

    >>> import numpy as np
    >>> conv(np.arange(5.0)[None], np.array([[[1.0, -1.0]]]), padding=[(1, 0)])
    array([[ 0., -1., -1., -1., -1.]])
    """
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                  padding_mode=padding_mode, conv_mode=conv_mode, compute_mode=compute_mode)  # fmt: skip
    return _conv("conv", None, x, weight, bias, kwargs)


def _ranked(generic, implementation, n: int):
    """conv{n}d / conv_transpose{n}d: the generic signature, plus a rank check."""
    name = f"{generic.__name__}{n}d"
    signature = inspect.signature(generic)

    @functools.wraps(generic)
    def ranked(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        options = dict(call.arguments)
        x, weight, bias = options.pop("x"), options.pop("weight"), options.pop("bias")
        return implementation(name, n, x, weight, bias, options)

    ranked.__name__ = ranked.__qualname__ = name
    ranked.__doc__ = f"{n}-d :func:`{generic.__name__}`; checks that ``weight`` is {n + 2}-D."
    return ranked


conv1d, conv2d, conv3d = (_ranked(conv, _conv, n) for n in (1, 2, 3))


def conv_backward(dy, x, weight, *, has_bias: bool, **kwargs):
    """Gradients ``(dx, dweight, dbias)`` of :func:`conv` for the output gradient ``dy``.

    ``dbias`` is None unless ``has_bias``. ``kwargs``: the keyword arguments of :func:`conv`.

    >>> import numpy as np
    >>> dx, dw, db = conv_backward(np.ones((1, 2)), np.arange(3.0)[None], np.ones((1, 1, 2)),
    ...                            has_bias=True)
    >>> dx, dw, db
    (array([[1., 2., 1.]]), array([[[1., 3.]]]), array([2.]))
    """
    op = "conv_backward"
    geom, batched = prepare_conv(op, x, weight, None, kwargs)
    expected = geom.output_shape(x.shape[0] if batched else 1)
    check_like(
        op, "grad_output", dy, expected if batched else expected[1:], x.dtype, _args.device_of(x)
    )
    dx, dw, db = conv_ops.conv_backward(
        _batched(dy, batched), _batched(x, batched), weight, geom, has_bias=_args.check_bool(has_bias, "has_bias")
    )
    return _unbatched(dx, batched), dw, db


def conv_jvp(x, weight, bias, dx, dweight, dbias, **kwargs):
    """Forward-mode derivative of :func:`conv` by bilinearity:
    ``conv(dx, w) + conv(x, dw) + dbias``. Any tangent may be None (zero).

    >>> import numpy as np
    >>> x, w = np.arange(3.0)[None], np.ones((1, 1, 2))
    >>> conv_jvp(x, w, None, np.ones_like(x), None, None)
    array([[2., 2.]])
    """
    op = "conv_jvp"
    geom, batched = prepare_conv(op, x, weight, bias, kwargs)
    _check_tangents(op, geom, x, weight, dx, dweight, dbias, geom.out_channels)
    dy = conv_ops.conv_jvp(
        _batched(x, batched), weight, _batched(dx, batched), dweight, dbias, geom
    )
    return _unbatched(dy, batched)


# -- transposed convolution ----------------------------------------------------------------


def _conv_transpose(op: str, n: int | None, x, weight, bias, kwargs: dict):
    geom, batched = prepare_conv_transpose(op, x, weight, bias, kwargs, n)
    y = conv_ops.conv_transpose_forward(_batched(x, batched), weight, bias, geom)
    return _unbatched(y, batched)


def conv_transpose(
    x,
    weight,
    bias=None,
    stride: Any = 1,
    padding: Any = 0,
    output_padding: Any = 0,
    groups: int = 1,
    dilation: Any = 1,
    output_size=None,
    padding_mode: str = "zeros",
    conv_mode: str = "cross_correlation",
    compute_mode: str = "default",
):
    """N-d transposed convolution (the input gradient of :func:`conv`).

    ``weight`` is ``(C_in, C_out/groups, *k)``. ``padding`` is an int, N ints
    or N ``(before, after)`` pairs. ``output_size`` (N, or N+2 ints for
    batched input, N+1 for unbatched) overrides ``output_padding``, as in
    PyTorch's modules. Only ``padding_mode='zeros'`` exists for transposed
    convolutions.

    Output: ``(S - 1)*stride - before - after + dilation*(k-1) + output_padding + 1``.

    >>> import numpy as np
    >>> conv_transpose(np.ones((1, 2)), np.array([[[1.0, 10.0]]]), stride=2)
    array([[ 1., 10.,  1., 10.]])
    """
    kwargs = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                  dilation=dilation, output_size=output_size, padding_mode=padding_mode,
                  conv_mode=conv_mode, compute_mode=compute_mode)  # fmt: skip
    return _conv_transpose("conv_transpose", None, x, weight, bias, kwargs)


conv_transpose1d, conv_transpose2d, conv_transpose3d = (
    _ranked(conv_transpose, _conv_transpose, n) for n in (1, 2, 3)
)


def conv_transpose_backward(dy, x, weight, *, has_bias: bool, **kwargs):
    """Gradients ``(dx, dweight, dbias)`` of :func:`conv_transpose`.

    ``kwargs``: the keyword arguments of :func:`conv_transpose`.

    >>> import numpy as np
    >>> dx, dw, db = conv_transpose_backward(np.ones((1, 3)), np.ones((1, 2)), np.ones((1, 1, 2)),
    ...                                      has_bias=False)
    >>> dx, dw, db
    (array([[2., 2.]]), array([[[2., 2.]]]), None)
    """
    op = "conv_transpose_backward"
    geom, batched = prepare_conv_transpose(op, x, weight, None, kwargs)
    expected = geom.input_shape(x.shape[0] if batched else 1)
    check_like(
        op, "grad_output", dy, expected if batched else expected[1:], x.dtype, _args.device_of(x)
    )
    dx, dw, db = conv_ops.conv_transpose_backward(
        _batched(dy, batched), _batched(x, batched), weight, geom, has_bias=_args.check_bool(has_bias, "has_bias")
    )
    return _unbatched(dx, batched), dw, db


def conv_transpose_jvp(x, weight, bias, dx, dweight, dbias, **kwargs):
    """Forward-mode derivative of :func:`conv_transpose` by bilinearity.

    >>> import numpy as np
    >>> conv_transpose_jvp(np.ones((1, 2)), np.ones((1, 1, 2)), None, None, np.ones((1, 1, 2)), None)
    array([[1., 2., 1.]])
    """
    op = "conv_transpose_jvp"
    geom, batched = prepare_conv_transpose(op, x, weight, bias, kwargs)
    _check_tangents(op, geom, x, weight, dx, dweight, dbias, geom.in_channels)
    dy = conv_ops.conv_transpose_jvp(
        _batched(x, batched), weight, _batched(dx, batched), dweight, dbias, geom
    )
    return _unbatched(dy, batched)
