"""Channels-last, tiled im2col + GEMM: the dense and grouped path of the NumPy backend.

A call is cut into tasks (``_tiles``): a few whole images, or one image's
block of output rows (rows = the first spatial axis), so that a task's
columns stay near ``COLUMN_BYTES`` and live in cache. Per task:

1. copy the input rows it reads into a zero-bordered channels-last slab
   ``(m, rows, *S[1:], C)`` (this is also where fp16 is widened);
2. copy the windows of the slab into columns ``(G, m, P_t, K*Cg)``: each
   copy moves a contiguous run of Cg channels;
3. one GEMM per group: ``(m*P_t, K*Cg) @ (K*Cg, Og)``, tall and skinny,
   which is the shape OpenBLAS runs fastest;
4. forward: transpose the ``(P_t, Og)`` result into the NCHW output;
   filter gradient: ``dy^T (Og, m*P_t) @ columns`` added to the worker's sum.

Padding may be negative (a crop): the backward-data phases in
``numpy_backend`` use that. Nothing here allocates more than the output
plus a few tasks' scratch, whatever the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..geometry import ConvGeometry
from . import numpy_threads

# Target size of one task's columns: a few of them fit the L2/L3 caches.
COLUMN_BYTES = 1 << 20


@dataclass(frozen=True)
class _Tile:
    images: slice  # batch range
    rows: slice  # output rows (first spatial axis)


def _tiles(geom: ConvGeometry, batch: int, itemsize: int) -> list[_Tile]:
    """Whole images per task when an image's columns are small, else blocks of rows."""
    q0 = geom.out_size[0]
    row_bytes = itemsize * geom.in_channels * math.prod(geom.kernel_size)
    row_bytes *= math.prod(geom.out_size[1:])
    if row_bytes * q0 <= COLUMN_BYTES:
        per = max(1, min(batch, COLUMN_BYTES // (row_bytes * q0)))
        return [_Tile(slice(b, min(batch, b + per)), slice(0, q0)) for b in range(0, batch, per)]
    rows = max(1, min(q0, COLUMN_BYTES // row_bytes))
    return [
        _Tile(slice(b, b + 1), slice(r, min(q0, r + rows)))
        for b in range(batch)
        for r in range(0, q0, rows)
    ]


class _Columns:
    """One worker's scratch: the padded slab and the columns of a tile."""

    def __init__(self, geom: ConvGeometry, tiles: list[_Tile], dtype):
        self.geom, self.dtype = geom, np.dtype(dtype)
        images = max(t.images.stop - t.images.start for t in tiles)
        rows = max(t.rows.stop - t.rows.start for t in tiles)
        (s0, k0, d0, (lo0, hi0)), rest = _axis(geom, 0), geom.in_size[1:]
        slab_rows = min((rows - 1) * geom.stride[0] + d0 * (k0 - 1) + 1, s0 + lo0 + hi0)
        padded_rest = tuple(s + lo + hi for s, (lo, hi) in zip(rest, geom.padding[1:]))
        # (m, rows, *Sp[1:], C): zeros once; a tile only rewrites the input it reads
        self.slab = np.zeros((images, slab_rows, *padded_rest, geom.in_channels), self.dtype)
        positions = rows * math.prod(geom.out_size[1:])
        k, cg = math.prod(geom.kernel_size), geom.in_channels // geom.groups
        self.cols = np.empty(geom.groups * images * positions * k * cg, self.dtype)
        self.acc = None  # filter-gradient sum, (G, Og, K*Cg)

    def fill(self, x: np.ndarray, tile: _Tile) -> np.ndarray:
        """Columns of ``tile``: (G, m*P_t, K*Cg), m images x P_t output positions."""
        g = self.geom
        n, groups = g.ndim, g.groups
        m = tile.images.stop - tile.images.start
        rows = tile.rows.stop - tile.rows.start
        s0, k0, d0, (lo0, _) = _axis(g, 0)
        first = tile.rows.start * g.stride[0]  # first padded input row the tile reads
        count = (rows - 1) * g.stride[0] + d0 * (k0 - 1) + 1
        slab = self.slab[:m, :count]
        # the slab's rows are input rows [start, start + count); those outside [0, s0) are zero
        start = first - lo0
        real = slice(min(max(start, 0), start + count), max(min(start + count, s0), start))
        top, bottom = real.start - start, real.stop - start
        slab[:, :top] = 0
        slab[:, bottom:] = 0
        src = x[(tile.images, slice(None), real, *_crop(g)[1:])]
        dst = slab[(slice(None), slice(top, bottom), *_inner(g, src.shape[3:]))]
        np.copyto(dst, np.moveaxis(src, 1, -1))  # (m, C, r, *S[1:]) -> (m, r, *S[1:], C)
        cg = g.in_channels // groups
        st = slab.strides
        item = slab.itemsize
        # view (m, *Q_t, *k, G, Cg): [b, *q, *i, grp, c] = slab[b, *(q*stride + i*dilation), grp*Cg + c]
        windows = as_strided(
            slab,
            shape=(m, rows, *g.out_size[1:], *g.kernel_size, groups, cg),
            strides=(
                st[0],
                *(s * a for s, a in zip(g.stride, st[1 : 1 + n])),
                *(d * a for d, a in zip(g.dilation, st[1 : 1 + n])),
                cg * item,
                item,
            ),
            writeable=False,
        )
        positions = rows * math.prod(g.out_size[1:])
        size = groups * m * positions * math.prod(g.kernel_size) * cg
        # (G, m, *Q_t, *k, Cg) block of the scratch
        cols = self.cols[:size].reshape(groups, m, rows, *g.out_size[1:], *g.kernel_size, cg)
        np.copyto(cols, np.moveaxis(windows, 1 + 2 * n, 0))
        # (G, m, *Q_t, *k, Cg) -> (G, m*P_t, K*Cg)
        return cols.reshape(groups, m * positions, -1)


def _axis(g: ConvGeometry, i: int):
    return g.in_size[i], g.kernel_size[i], g.dilation[i], g.padding[i]


def _crop(g: ConvGeometry) -> tuple[slice, ...]:
    """The part of the input inside the padded extent, per spatial axis (negative padding crops)."""
    return tuple(slice(max(0, -lo), s - max(0, -hi)) for s, (lo, hi) in zip(g.in_size, g.padding))


def _inner(g: ConvGeometry, sizes) -> tuple[slice, ...]:
    """Where the cropped input lands in the padded slab, spatial axes 1.."""
    return tuple(slice(max(0, lo), max(0, lo) + s) for s, (lo, _) in zip(sizes, g.padding[1:]))


def _weight_columns(w: np.ndarray, g: ConvGeometry, dtype) -> np.ndarray:
    """w (O, Cg, *k) -> (G, K*Cg, Og), matching the columns' (tap, channel) order."""
    og = g.out_channels // g.groups
    # (O, Cg, *k) -> (O, *k, Cg) -> (G, Og, K*Cg) -> (G, K*Cg, Og)
    wk = np.moveaxis(w, 1, -1).reshape(g.groups, og, -1)
    return np.ascontiguousarray(wk.transpose(0, 2, 1), dtype=dtype)


def _work(g: ConvGeometry, batch: int) -> int:
    """Multiply-adds of the call: decides whether worker threads pay off."""
    k = math.prod(g.kernel_size) * (g.in_channels // g.groups)
    return batch * g.out_channels * math.prod(g.out_size) * k


def correlate(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, dtype) -> None:
    """out (B, O, *Q) = conv(x (B, C, *S), w (O, Cg, *k)); ``out`` may be any strided view."""
    batch, groups = x.shape[0], g.groups
    og = g.out_channels // groups
    tiles = _tiles(g, batch, np.dtype(dtype).itemsize)
    wcols = _weight_columns(w, g, dtype)

    def work(tile: _Tile, scratch: _Columns) -> None:
        cols = scratch.fill(x, tile)  # (G, m*P_t, K*Cg)
        res = np.matmul(cols, wcols)  # (G, m*P_t, Og)
        m, rows = tile.images.stop - tile.images.start, tile.rows.stop - tile.rows.start
        # (G, m*P_t, Og) -> (G, m, r, *Q[1:], Og) -> (m, G, Og, r, *Q[1:])
        res = res.reshape(groups, m, rows, *g.out_size[1:], og)
        res = np.moveaxis(res, (0, -1), (1, 2))
        dest = out[tile.images, :, tile.rows]  # (m, O, r, *Q[1:])
        np.copyto(dest.reshape(m, groups, og, rows, *g.out_size[1:]), res)

    numpy_threads.run(tiles, work, lambda: _Columns(g, tiles, dtype), _work(g, batch))


def filter_grad(dy: np.ndarray, x: np.ndarray, g: ConvGeometry, dtype) -> np.ndarray:
    """dW (O, Cg, *k) = sum over tiles of dy (G, Og, m*P_t) @ columns (G, m*P_t, K*Cg)."""
    batch, groups = x.shape[0], g.groups
    og = g.out_channels // groups
    tiles = _tiles(g, batch, np.dtype(dtype).itemsize)

    def work(tile: _Tile, scratch: _Columns) -> None:
        cols = scratch.fill(x, tile)  # (G, m*P_t, K*Cg)
        m, rows = tile.images.stop - tile.images.start, tile.rows.stop - tile.rows.start
        # dy (m, O, r, *Q[1:]) -> (G, Og, m, r, *Q[1:]) -> (G, Og, m*P_t), widened once
        part = dy[tile.images, :, tile.rows].reshape(m, groups, og, rows, *g.out_size[1:])
        part = np.ascontiguousarray(np.moveaxis(part, 0, 2), dtype=dtype).reshape(groups, og, -1)
        term = np.matmul(part, cols)  # (G, Og, K*Cg)
        if scratch.acc is None:
            scratch.acc = term
        else:
            scratch.acc += term

    sums = numpy_threads.run(tiles, work, lambda: _Columns(g, tiles, dtype), _work(g, batch))
    dw = sums[0].acc
    for other in sums[1:]:
        dw += other.acc
    # (G, Og, K*Cg) -> (O, *k, Cg) -> (O, Cg, *k)
    dw = dw.reshape(g.out_channels, *g.kernel_size, g.in_channels // groups)
    return np.ascontiguousarray(np.moveaxis(dw, -1, 1))
