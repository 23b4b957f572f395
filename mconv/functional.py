"""Stateless convolution ops: forward, backward (dx, dw, db) and JVP.

Input is batched ``(B, C, *S)`` or unbatched ``(C, *S)``; the spatial rank N
comes from ``weight.ndim - 2``. Weights use PyTorch's layout: conv
``(O, C/groups, *k)``, transposed conv ``(C, O/groups, *k)``, bias ``(O,)``.

Conv and transposed conv share one implementation: each public function builds a
``ConvCall`` (``mconv.call``) and hands it to ``mconv.conv_ops``.

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

from . import conv_ops
from .call import check_grad, check_like, check_tangents, conv_call
from .padding import pad, pad_backward

__all__ = [
    "conv", "conv1d", "conv2d", "conv3d",
    "conv_transpose", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
    "conv_backward", "conv_transpose_backward", "conv_jvp", "conv_transpose_jvp",
    "pad", "pad_backward", "check_like",
]  # fmt: skip


def _forward(transposed: bool, op: str, rank: int | None, x, weight, bias, options: dict):
    call = conv_call(op, x, weight, bias, options, transposed=transposed, rank=rank)
    return call.unbatch(conv_ops.forward(call, call.batch(x), weight, bias))


def _backward(transposed: bool, op: str, dy, x, weight, has_bias, options: dict):
    call = conv_call(op, x, weight, None, options, transposed=transposed, has_bias=has_bias)
    check_grad(op, call, dy, x)
    dx, dw, db = conv_ops.backward(call, call.batch(dy), call.batch(x), weight)
    return call.unbatch(dx), dw, db


def _jvp(transposed: bool, op: str, x, weight, bias, dx, dweight, dbias, options: dict):
    call = conv_call(op, x, weight, bias, options, transposed=transposed)
    check_tangents(op, call, x, weight, dx, dweight, dbias)
    dy = conv_ops.jvp(call, call.batch(x), weight, call.batch(dx), dweight, dbias)
    return call.unbatch(dy)


def _ranked(generic, transposed: bool, n: int):
    """conv{n}d / conv_transpose{n}d: the generic signature, plus a rank check."""
    name = f"{generic.__name__}{n}d"
    signature = inspect.signature(generic)

    @functools.wraps(generic)
    def ranked(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        options = dict(call.arguments)
        x, weight, bias = options.pop("x"), options.pop("weight"), options.pop("bias")
        return _forward(transposed, name, n, x, weight, bias, options)

    ranked.__name__ = ranked.__qualname__ = name
    ranked.__doc__ = f"{n}-d :func:`{generic.__name__}`; checks that ``weight`` is {n + 2}-D."
    return ranked


# -- convolution ---------------------------------------------------------------------------


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

    ``padding``: an int, N ints, N ``(before, after)`` pairs (negative: a crop),
    ``'same'`` (output ``ceil(S / stride)``, the odd element after, as TensorFlow and ONNX
    SAME_UPPER), ``'same_lower'`` (the odd element before) or ``'valid'``.
    ``padding_mode``: ``'zeros'``, ``'reflect'`` (pad < size), ``'replicate'``,
    ``'circular'`` (pad <= size). ``conv_mode='convolution'`` flips the kernel spatially.
    ``compute_mode='float32'`` accumulates fp16 in fp32 and rounds once.

    Output: ``floor((S + before + after - dilation*(k-1) - 1) / stride) + 1``.

    >>> import numpy as np
    >>> conv(np.arange(5.0)[None], np.array([[[1.0, -1.0]]]), padding=[(1, 0)])
    array([[ 0., -1., -1., -1., -1.]])
    """
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
                   padding_mode=padding_mode, conv_mode=conv_mode, compute_mode=compute_mode)  # fmt: skip
    return _forward(False, "conv", None, x, weight, bias, options)


conv1d, conv2d, conv3d = (_ranked(conv, False, n) for n in (1, 2, 3))


def conv_backward(dy, x, weight, *, has_bias: bool, **options):
    """Gradients ``(dx, dweight, dbias)`` of :func:`conv` for the output gradient ``dy``.

    ``dbias`` is None unless ``has_bias``. ``options``: the keyword arguments of :func:`conv`.

    >>> import numpy as np
    >>> dx, dw, db = conv_backward(np.ones((1, 2)), np.arange(3.0)[None], np.ones((1, 1, 2)),
    ...                            has_bias=True)
    >>> dx, dw, db
    (array([[1., 2., 1.]]), array([[[1., 3.]]]), array([2.]))
    """
    return _backward(False, "conv_backward", dy, x, weight, has_bias, options)


def conv_jvp(x, weight, bias, dx, dweight, dbias, **options):
    """Forward-mode derivative of :func:`conv` by bilinearity:
    ``conv(dx, w) + conv(x, dw) + dbias``. Any tangent may be None (zero).

    >>> import numpy as np
    >>> x, w = np.arange(3.0)[None], np.ones((1, 1, 2))
    >>> conv_jvp(x, w, None, np.ones_like(x), None, None)
    array([[2., 2.]])
    """
    return _jvp(False, "conv_jvp", x, weight, bias, dx, dweight, dbias, options)


# -- transposed convolution ----------------------------------------------------------------


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

    ``weight`` is ``(C_in, C_out/groups, *k)``. ``padding`` is an int, N ints or N
    ``(before, after)`` pairs (negative: zero borders added to the output), or ``'same'``/
    ``'same_lower'`` (output ``S * stride``, as ONNX SAME_UPPER/SAME_LOWER).
    ``output_size`` (N, or N+2 ints for batched input, N+1 for unbatched) overrides
    ``output_padding``, as in PyTorch's modules. Only ``padding_mode='zeros'`` exists for
    transposed convolutions.

    Output: ``(S - 1)*stride - before - after + dilation*(k-1) + output_padding + 1``.

    >>> import numpy as np
    >>> conv_transpose(np.ones((1, 2)), np.array([[[1.0, 10.0]]]), stride=2)
    array([[ 1., 10.,  1., 10.]])
    """
    options = dict(stride=stride, padding=padding, output_padding=output_padding, groups=groups,
                   dilation=dilation, output_size=output_size, padding_mode=padding_mode,
                   conv_mode=conv_mode, compute_mode=compute_mode)  # fmt: skip
    return _forward(True, "conv_transpose", None, x, weight, bias, options)


conv_transpose1d, conv_transpose2d, conv_transpose3d = (
    _ranked(conv_transpose, True, n) for n in (1, 2, 3)
)


def conv_transpose_backward(dy, x, weight, *, has_bias: bool, **options):
    """Gradients ``(dx, dweight, dbias)`` of :func:`conv_transpose`.

    ``options``: the keyword arguments of :func:`conv_transpose`.

    >>> import numpy as np
    >>> dx, dw, db = conv_transpose_backward(np.ones((1, 3)), np.ones((1, 2)), np.ones((1, 1, 2)),
    ...                                      has_bias=False)
    >>> dx, dw, db
    (array([[2., 2.]]), array([[[2., 2.]]]), None)
    """
    return _backward(True, "conv_transpose_backward", dy, x, weight, has_bias, options)


def conv_transpose_jvp(x, weight, bias, dx, dweight, dbias, **options):
    """Forward-mode derivative of :func:`conv_transpose` by bilinearity.

    >>> import numpy as np
    >>> conv_transpose_jvp(np.ones((1, 2)), np.ones((1, 1, 2)), None, None, np.ones((1, 1, 2)), None)
    array([[1., 2., 1.]])
    """
    return _jvp(True, "conv_transpose_jvp", x, weight, bias, dx, dweight, dbias, options)
