"""NumPy backend: the three convolution primitives as im2col + GEMM.

Shapes (B batch, G groups, Cg = C/G, Og = O/G, K = prod(kernel_size),
P = prod(out_size), S = in_size, Sp = in_size + padding):

    forward          x (B, C, *S), w (O, Cg, *k)   -> y  (B, O, *Q)
    backward_data    dy (B, O, *Q), w (O, Cg, *k)  -> dx (B, C, *S)
    backward_filter  dy (B, O, *Q), x (B, C, *S)   -> dw (O, Cg, *k)

``pad``/``pad_backward`` (the explicit padding modes and their adjoint) and
``bias_grad`` complete the backend interface. All three primitives see a
zero-padding, cross-correlation geometry (padding modes and
``conv_mode`` are lowered in ``mconv.conv_ops``) and arrays already in the
compute dtype. ``im2col`` reads windows through a strided view; ``col2im``
is a loop over the K kernel offsets, each adding one strided slice, so the
result is deterministic.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..geometry import ConvGeometry
from ..padding import pad_backward_unchecked as pad_backward  # noqa: F401 - backend interface
from ..padding import pad_unchecked as pad  # noqa: F401 - backend interface

name = "numpy"


def compute_dtype(dtype, compute_mode: str) -> np.dtype:
    """fp16 always computes through fp32 BLAS on the CPU (NumPy's fp16 GEMM is
    hundreds of times slower); either compute mode then rounds once at the end."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def bias_grad(dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """db = sum of dy over the batch and spatial axes."""
    return dy.sum(axis=(0, *range(2, dy.ndim)))


def _check_workspace(geom: ConvGeometry, batch: int, itemsize: int) -> None:
    """Refuse, before allocating, a call whose buffers (padded input, columns, output)
    exceed the memory the machine has free: a MemoryError, not an OOM kill."""
    padded = math.prod(s + lo + hi for s, (lo, hi) in zip(geom.in_size, geom.padding))
    taps, out = math.prod(geom.kernel_size), math.prod(geom.out_size)
    need = itemsize * batch * (geom.in_channels * (padded + taps * out) + geom.out_channels * out)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return
    if need > free:
        raise MemoryError(
            f"this convolution needs about {need / 2**30:.1f} GiB of buffers (padded input "
            f"{list(geom.input_shape(batch))} + padding {list(geom.padding)}, {taps} kernel taps x "
            f"{out} output positions), but only {free / 2**30:.1f} GiB of memory is free"
        )


def _zero_pad(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    if not any(lo or hi for lo, hi in geom.padding):
        return x
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(geom.in_size, geom.padding))
    out = np.zeros(x.shape[:2] + padded, dtype=x.dtype)
    out[(Ellipsis, *(slice(lo, lo + s) for s, (lo, _) in zip(geom.in_size, geom.padding)))] = x
    return out


def _im2col(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """x (B, C, *S) -> columns (G, Cg*K, B*P), a contiguous copy."""
    _check_workspace(geom, x.shape[0], x.dtype.itemsize)
    x = np.ascontiguousarray(_zero_pad(x, geom))
    n, g = geom.ndim, geom.groups
    batch, channels = x.shape[:2]
    s_batch, s_chan, *s_space = x.strides
    # view (B, G, Cg, *k, *Q): element [b, g, c, *i, *q] = x[b, g*Cg + c, *(q*stride + i*dilation)]
    windows = as_strided(
        x,
        shape=(batch, g, channels // g, *geom.kernel_size, *geom.out_size),
        strides=(
            s_batch,
            s_chan * (channels // g),
            s_chan,
            *(d * s for d, s in zip(geom.dilation, s_space)),
            *(st * s for st, s in zip(geom.stride, s_space)),
        ),
        writeable=False,
    )
    # (B, G, Cg, *k, *Q) -> (G, Cg, *k, B, *Q)
    windows = windows.transpose(1, 2, *range(3, 3 + n), 0, *range(3 + n, 3 + 2 * n))
    # (G, Cg, *k, B, *Q) -> (G, Cg*K, B*P)
    return windows.reshape(
        g, (channels // g) * math.prod(geom.kernel_size), batch * math.prod(geom.out_size)
    )


def _col2im(cols: np.ndarray, geom: ConvGeometry, batch: int) -> np.ndarray:
    """Adjoint of ``_im2col``: columns (G, Cg*K, B*P) -> dx (B, C, *S)."""
    n, g = geom.ndim, geom.groups
    cg = geom.in_channels // g
    # (G, Cg*K, B*P) -> (G, Cg, *k, B, *Q)
    cols = cols.reshape(g, cg, *geom.kernel_size, batch, *geom.out_size)
    # (G, Cg, *k, B, *Q) -> (*k, B, G, Cg, *Q), so each kernel offset is one contiguous block
    cols = np.ascontiguousarray(
        cols.transpose(*range(2, 2 + n), 2 + n, 0, 1, *range(3 + n, 3 + 2 * n))
    )
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(geom.in_size, geom.padding))
    dx = np.zeros((batch, g, cg, *padded), dtype=cols.dtype)
    for offset in itertools.product(*(range(k) for k in geom.kernel_size)):
        window = tuple(
            slice(i * d, i * d + s * (q - 1) + 1, s)
            for i, d, s, q in zip(offset, geom.dilation, geom.stride, geom.out_size)
        )
        dx[(Ellipsis, *window)] += cols[offset]
    # (B, G, Cg, *Sp) -> (B, C, *Sp), then drop the padding
    dx = dx.reshape(batch, geom.in_channels, *padded)
    return dx[(Ellipsis, *(slice(lo, lo + s) for s, (lo, _) in zip(geom.in_size, geom.padding)))]


def _grad_matrix(dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """dy (B, O, *Q) -> (G, Og, B*P)."""
    batch, g = dy.shape[0], geom.groups
    # (B, O, *Q) -> (B, G, Og, P) -> (G, Og, B, P) -> (G, Og, B*P)
    og, p = geom.out_channels // g, math.prod(geom.out_size)
    dy = dy.reshape(batch, g, og, p).transpose(1, 2, 0, 3)
    return dy.reshape(g, og, batch * p)


def _weight_matrix(w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """w (O, Cg, *k) -> (G, Og, Cg*K)."""
    return w.reshape(
        geom.groups,
        geom.out_channels // geom.groups,
        (geom.in_channels // geom.groups) * math.prod(geom.kernel_size),
    )


def forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """y = conv(x, w): (G, Og, Cg*K) @ (G, Cg*K, B*P) -> (G, Og, B*P)."""
    batch, g = x.shape[0], geom.groups
    y = np.matmul(_weight_matrix(w, geom), _im2col(x, geom))
    # (G, Og, B, *Q) -> (B, G, Og, *Q) -> (B, O, *Q)
    y = y.reshape(g, geom.out_channels // g, batch, *geom.out_size)
    y = np.moveaxis(y, 2, 0)
    return np.ascontiguousarray(y.reshape(batch, geom.out_channels, *geom.out_size))


def backward_data(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """dx = col2im(W^T dy): (G, Cg*K, Og) @ (G, Og, B*P) -> (G, Cg*K, B*P)."""
    _check_workspace(geom, dy.shape[0], dy.dtype.itemsize)
    cols = np.matmul(_weight_matrix(w, geom).transpose(0, 2, 1), _grad_matrix(dy, geom))
    return np.ascontiguousarray(_col2im(cols, geom, dy.shape[0]))


def backward_filter(dy: np.ndarray, x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """dW = dy im2col(x)^T: (G, Og, B*P) @ (G, B*P, Cg*K) -> (G, Og, Cg*K)."""
    dw = np.matmul(_grad_matrix(dy, geom), _im2col(x, geom).transpose(0, 2, 1))
    # (G, Og, Cg*K) -> (O, Cg, *k)
    return dw.reshape(geom.out_channels, geom.in_channels // geom.groups, *geom.kernel_size)
