"""The column layout the CUDA im2col/col2im kernels produce, in plain NumPy.

columns (G, Cg*K, B*P): row (g, c, *i) holds, for every image and output
position, x[b, g*Cg + c, *(q*stride + i*dilation)] of the zero-padded input.
``col2im`` is its adjoint (a sum over the K kernel offsets). These were the
first NumPy backend's building blocks; the backend has since moved to
channels-last tiles, and the kernels keep this layout.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mconv.geometry import ConvGeometry


def zero_pad(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    if not any(lo or hi for lo, hi in geom.padding):
        return x
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(geom.in_size, geom.padding))
    out = np.zeros(x.shape[:2] + padded, dtype=x.dtype)
    out[(Ellipsis, *(slice(lo, lo + s) for s, (lo, _) in zip(geom.in_size, geom.padding)))] = x
    return out


def im2col(x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """x (B, C, *S) -> columns (G, Cg*K, B*P), a contiguous copy."""
    x = np.ascontiguousarray(zero_pad(x, geom))
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


def col2im(cols: np.ndarray, geom: ConvGeometry, batch: int) -> np.ndarray:
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
