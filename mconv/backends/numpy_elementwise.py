"""The layers' elementwise CPU kernels: BatchNorm's per-channel affine map rounded once and
ReLU, each one pass over the array (NumPy needs two or more, and temporaries), split
between ``numpy_threads``' workers.

:func:`channel_affine`: ``y = fma(x, alpha[c], beta[c])`` along axis 1.

BatchNorm's output is this map (``alpha = inv_std * weight``, ``beta = bias - mean *
alpha``), and PyTorch's CPU kernel computes it with fused multiply-adds in the accumulator
(float32 for float32 and float16 inputs): ``beta`` is ``fma(-mean, alpha, bias)`` and each
output ``fma(x, alpha, beta)``, rounded once to float32 (then to float16 for float16).
:func:`fma` and :func:`channel_affine` give the same values:

- float32 input: numba's kernel, where the JIT is on (``contract``: LLVM fuses the
  multiply-add, as the compiler does in PyTorch's kernel); else, and for float16 input,
  the product and sum in float64 (exact product, one rounding of the sum) rounded to
  float32, one image at a time;
- float64 input (and CuPy arrays): ``x * alpha + beta`` as it comes (two roundings for
  float64 on the CPU; CuPy's elementwise kernel fuses them).

:func:`relu` (``0 where x < 0, else x``): NaN and -0.0 pass, as in PyTorch; numba's kernel
for contiguous float32/float64 arrays where the JIT is on, else ``where``. (ReLU6 keeps
``np.clip``: one pass already, as fast.)

>>> import numpy as np
>>> x = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
>>> channel_affine(x, np.float32([2, -1]), np.float32([0.5, 1]))
array([[[ 0.5,  2.5,  4.5],
        [-2. , -3. , -4. ]]], dtype=float32)
"""

from __future__ import annotations

import numpy as np

from .. import _args
from . import numpy_jit, numpy_threads


def _split(count: int, size: int, work) -> None:
    """``work(piece)`` for slices of ``range(count)``, four per worker thread, shared between
    ``numpy_threads``' workers (on the calling thread when ``size`` elements are few)."""
    n = max(1, min(count, 4 * numpy_threads.get_num_threads()))
    pieces = [slice(k * count // n, (k + 1) * count // n) for k in range(n)]
    numpy_threads.run(pieces, lambda piece, _: work(piece), lambda: None, size)


@numpy_jit.kernel(fastmath={"contract"})
def _affine_kernel(x, alpha, beta, y):  # (N, C, P) float32 each; alpha, beta (C,)
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            a, b = alpha[c], beta[c]
            for p in range(x.shape[2]):
                y[n, c, p] = x[n, c, p] * a + b


def fma(a, b, c, dtype):
    """``a * b + c`` rounded once to ``dtype`` (float32: through float64, where the product
    is exact; float64 and CuPy arrays: as they come). Small per-channel vectors."""
    dtype = np.dtype(dtype)
    if dtype.itemsize > 4 or not isinstance(a, np.ndarray):  # float64, or CuPy arrays
        return (a * b + c).astype(dtype, copy=False)
    wide = np.float64
    return (np.asarray(a, wide) * np.asarray(b, wide) + np.asarray(c, wide)).astype(dtype)


def channel_affine(x, alpha, beta):
    """``fma(x, alpha[c], beta[c])`` for ``x`` ``(N, C, *spatial)``, ``alpha`` and ``beta``
    ``(C,)`` in the accumulator of ``x``'s dtype; the result in that accumulator."""
    shape = (1, -1) + (1,) * (x.ndim - 2)  # (C,) -> (1, C, 1, ...)
    if not isinstance(x, np.ndarray) or alpha.dtype.itemsize > 4:
        return x * alpha.reshape(shape) + beta.reshape(shape)
    y = np.empty(x.shape, np.float32)
    if x.dtype == np.float32 and x.size and numpy_jit.enabled():
        planes = np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1], -1)  # (N, C, P)
        out, a, b = y.reshape(planes.shape), alpha.astype(np.float32), beta.astype(np.float32)
        _split(x.shape[1], x.size, lambda c: _affine_kernel(planes[:, c], a[c], b[c], out[:, c]))
        return y
    a, b = alpha.astype(np.float64).reshape(shape[1:]), beta.astype(np.float64).reshape(shape[1:])
    for n in range(x.shape[0]):  # (C, *spatial) in float64 at a time
        np.add(np.multiply(x[n], a, dtype=np.float64), b, out=y[n], casting="same_kind")
    return y


@numpy_jit.kernel()
def _relu_kernel(x, y):  # flat, the same dtype; NaN and -0.0 pass
    for i in range(x.size):
        v = x[i]
        y[i] = 0 if v < 0 else v


def relu(x):
    """``0 where x < 0, else x``, in ``x``'s dtype (NumPy or CuPy)."""
    fits = isinstance(x, np.ndarray) and x.dtype in (np.float32, np.float64) and x.size > 0
    if not (fits and x.flags.c_contiguous and numpy_jit.enabled()):
        return _args.array_module(x).where(x < 0, x.dtype.type(0), x)
    y = np.empty_like(x)
    flat, out = x.reshape(-1), y.reshape(-1)
    _split(x.size, x.size, lambda i: _relu_kernel(flat[i], out[i]))
    return y
