"""The one precision policy: what sums in which dtype, what is stored in which, and where a
bias and a rounding meet a result.

- ``accumulator(dtype)``: every sum over fp16 runs in fp32, over fp32 and fp64 in their own
  dtype (GEMMs, direct kernels, reductions, gradient sums, collectives' wire dtype).
- ``stored(dtype, compute_mode)``: what the GPU keeps between steps of one call: the
  accumulator under ``compute_mode='float32'`` (one rounding, at the end), the input dtype
  under ``'default'``. The CPU always keeps the accumulator (NumPy's fp16 GEMM is hundreds of
  times slower than widening), so both modes round once there.
- ``set_algorithm('fast' | 'exact')``: whether float32 sums may take algorithms that
  round differently from the plain sum (Winograd, ``backends/numpy_winograd``; errors of a
  few 1e-6 of the output's scale), where they are faster. Float64 never does.
- ``store(result, dest, bias)``: a result (in the accumulator) is written into its output
  (any dtype: the one rounding) with the bias added first, in the accumulator. Every
  primitive that writes a result, and every ``add_bias``, goes through it.

>>> import numpy as np
>>> accumulator(np.float16), stored(np.float16, "default"), stored(np.float16, "float32")
(dtype('float32'), dtype('float16'), dtype('float32'))
"""

from __future__ import annotations

import os

import numpy as np

from ._args import array_module

ALGORITHMS = ("fast", "exact")
_algorithm = {"name": None}


def _default_algorithm() -> str:
    value = os.environ.get("MCONV_ALGORITHM", "fast")
    if value not in ALGORITHMS:
        raise ValueError(f"MCONV_ALGORITHM must be 'fast' or 'exact', but got {value!r}")
    return value


def get_algorithm() -> str:
    """'fast' (the default; ``MCONV_ALGORITHM`` sets it) or 'exact' (see ``set_algorithm``)."""
    if _algorithm["name"] is None:
        _algorithm["name"] = _default_algorithm()
    return _algorithm["name"]


def set_algorithm(name: str) -> None:
    """'exact': every convolution is the plain sum of products (im2col, direct), as in float64;
    'fast': float32 sums may also use Winograd where it is faster (errors of a few 1e-6 of
    the output's scale; docs/benchmarks.md).

    >>> import mconv
    >>> mconv.set_algorithm("exact"); mconv.get_algorithm()
    'exact'
    >>> mconv.set_algorithm("fast")
    """
    if not isinstance(name, str):
        raise TypeError(f"algorithm must be a str, but got algorithm={name!r}")
    if name not in ALGORITHMS:
        raise ValueError(f"algorithm must be 'fast' or 'exact', but got algorithm={name!r}")
    _algorithm["name"] = name


def fast_algorithms() -> bool:
    """Whether float32 sums may round differently from the plain sum (``set_algorithm``)."""
    return get_algorithm() == "fast"


def accumulator(dtype) -> np.dtype:
    """fp16 sums in fp32; fp32, fp64 (and wider) in themselves."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def stored(dtype, compute_mode: str) -> np.dtype:
    """The dtype of a GPU primitive's intermediates and results (see the module docstring)."""
    return accumulator(dtype) if compute_mode == "float32" else np.dtype(dtype)


def bias_view(bias, ndim: int, axis: int = 1):
    """A bias ``(C,)`` shaped to broadcast along ``axis`` of an ``ndim``-D array."""
    shape = [1] * ndim
    shape[axis] = -1
    return bias.reshape(shape)


def store(result, dest, bias=None):
    """``dest[...] = result + bias``: the bias added in ``result``'s dtype (the accumulator),
    then one rounding into ``dest``'s dtype. ``bias`` must broadcast against ``result``
    (``bias_view``); ``dest`` may be ``result`` itself. Returns ``dest``."""
    xp = array_module(dest)
    if xp is np and dest.dtype == np.float16 and result.dtype == np.float32:
        return _narrow(result, dest, bias)
    if bias is None:
        if dest is not result:
            xp.copyto(dest, result, casting="unsafe")
        return dest
    xp.add(result, bias.astype(result.dtype, copy=False), out=dest, casting="unsafe")
    return dest


def _narrow(result, dest, bias):
    """:func:`store` of float32 into float16 NumPy arrays by the conversion kernel (NumPy's
    float16 casts are slow); with a bias, one entry of the first axis at a time, added in a
    float32 temporary of that size."""
    from .backends import numpy_convert  # noqa: PLC0415 - the backend's module, CPU only

    if bias is None:
        numpy_convert.copy_into(dest, result)
    elif result.ndim <= 1 or bias.ndim > result.ndim or result.shape != dest.shape:
        np.add(result, bias.astype(result.dtype, copy=False), out=dest, casting="unsafe")
    else:
        bias = bias.astype(result.dtype, copy=False)
        for i in range(result.shape[0]):  # bias broadcasts against result: index it alike
            b = bias[min(i, bias.shape[0] - 1)] if bias.ndim == result.ndim else bias
            numpy_convert.copy_into(dest[i], result[i] + b)
    return dest


def channel_sum(dy, axis: int = 1):
    """A bias gradient: ``dy`` summed over every axis but ``axis``, in the accumulator, then
    rounded once into dy's dtype."""
    others = tuple(a for a in range(dy.ndim) if a != axis)
    return dy.sum(axis=others, dtype=accumulator(dy.dtype)).astype(dy.dtype, copy=False)


def add_bias(y, bias, axis: int = 1):
    """``y += bias`` along ``axis`` (channels), in ``y``'s dtype; None adds nothing."""
    return y if bias is None else store(y, y, bias_view(bias, y.ndim, axis))
