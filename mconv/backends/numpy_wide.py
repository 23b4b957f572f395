"""Stride-1 convolutions as channels-first "wide" im2col + GEMM.

With stride 1 the window of tap i at output q reads the padded input at
q + i*dilation. Flatten a padded box of the input per channel, and compute
the output "wide": position q sits at the flat index ``sum_j q_j * F_j``
(F_j = the flat stride of axis j in the box), so the tile's leading rows
keep their count and every later axis runs over its whole padded width.
Then tap i reads the contiguous run starting at ``sum_j i_j d_j F_j``, and
the columns ``(G, Cg, K, m, N)`` are K shifted copies of long runs; the
weight ``(O, Cg, *k)`` is already ``(G, Og, Cg*K)``:

    forward      y_wide (G, Og, m*N) = w (G, Og, Cg*K) @ cols (G, Cg*K, m*N)
    filter_grad  dW (G, Og, Cg*K)   += dy_wide (G, Og, m*N) @ cols^T

The extra (wide) outputs are cropped in the forward and meet zeros of
``dy_wide`` in the filter gradient. They cost ``prod(Sp_j / Q_j)`` over the
axes after the first, so ``applies`` takes only layers where that is small;
the rest go through the channels-last ``numpy_im2col``. Against that path
this one saves the two transposes (NCHW -> channels-last slab, GEMM result
-> NCHW) and copies long runs instead of kw*Cg ones, which is what makes
small groups (ResNeXt's Cg = 8) and 3-d kernels cheaper.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..geometry import ConvGeometry
from ..precision import bias_view, store
from . import numpy_im2col, numpy_threads
from .numpy_convert import copy_into
from .numpy_im2col import _Tile

# Most GEMM columns computed per output kept (measured against numpy_im2col on 2 cores). The
# forward gains the output transpose and the channels-last copies, so it affords a few wasted
# columns. The filter gradient gains only the copies: enough where im2col's runs of kw*Cg
# values are short (Cg <= NARROW_GROUP; 3-d and ResNeXt layers, 1.1x) or nothing is wasted
# (1-d, 1.13x); dense 2-d layers ran 2-9% slower there, so they stay on im2col.
WASTE_LIMIT = 1.12
NARROW_GROUP = 32


def waste(g: ConvGeometry) -> float:
    """GEMM columns computed per output kept: the padded widths of the axes after the first."""
    return math.prod(sp / q for sp, q in zip(g.padded_size[1:], g.out_size[1:]))


def applies(g: ConvGeometry) -> bool:
    """The forward (and the backward-data phases): stride 1, at most WASTE_LIMIT."""
    return all(s == 1 for s in g.stride) and min(g.out_size) > 0 and waste(g) <= WASTE_LIMIT


def applies_to_filter_grad(g: ConvGeometry) -> bool:
    """Stride 1, and narrow groups within WASTE_LIMIT or no waste at all."""
    return applies(g) and (g.in_channels // g.groups <= NARROW_GROUP or waste(g) == 1.0)


def _tiles(g: ConvGeometry, batch: int, itemsize: int) -> list[_Tile]:
    """``numpy_im2col.make_tiles``, costed in wide positions: the padded width of later axes."""
    return numpy_im2col.make_tiles(g, batch, itemsize, (g.out_size[0], *g.padded_size[1:]))


class _Box:
    """The padded input box a tile reads: shape per axis, flat strides, wide positions."""

    def __init__(self, g: ConvGeometry, tile: _Tile):
        n = g.ndim
        # axis a: the last one the tile does not take whole; later axes are whole and padded
        a = max([j for j in range(n) if tile.box[j] != slice(0, g.out_size[j])], default=0)
        self.starts = [q.start if j <= a else 0 for j, q in enumerate(tile.box)]
        self.spans = [
            (q.stop - q.start) + (k - 1) * d if j <= a else sp
            for j, (q, k, d, sp) in enumerate(
                zip(tile.box, g.kernel_size, g.dilation, g.padded_size)
            )
        ]
        self.flat = tuple(math.prod(self.spans[j + 1 :]) for j in range(n))
        self.rows = tile.box[a].stop - tile.box[a].start
        self.a = a
        # wide positions: every index before a is a single one, so they are a contiguous range
        self.positions = self.rows * self.flat[a]
        self.strides = [d * f for d, f in zip(g.dilation, self.flat)]  # per tap index
        reach = self.positions + sum((k - 1) * s for k, s in zip(g.kernel_size, self.strides))
        self.length = max(math.prod(self.spans), reach)  # per channel, with a zero tail

    def wide_shape(self, g: ConvGeometry) -> tuple[int, ...]:
        """(*counts up to a, *padded widths after a): the wide output positions as an array."""
        return (*(1 for _ in range(self.a)), self.rows, *g.padded_size[self.a + 1 :])

    def kept(self, g: ConvGeometry) -> tuple[slice, ...]:
        """The outputs kept of ``wide_shape``."""
        return tuple(slice(0, q) for q in (*(1,) * self.a, self.rows, *g.out_size[self.a + 1 :]))


class _Scratch:
    """One worker's buffers: the flat padded boxes, the columns, the wide dy."""

    def __init__(self, g: ConvGeometry, tiles: list[_Tile], dtype):
        self.g, self.dtype = g, np.dtype(dtype)
        # tiles of one (count, shape) have boxes of one size: one representative each
        boxes = [(t.count, _Box(g, t)) for t in {(t.count, t.shape): t for t in tiles}.values()]
        length = max(b.length for _, b in boxes)
        wide = max(m * b.positions for m, b in boxes)
        self.slab = np.empty((max(t.count for t in tiles), g.in_channels, length), self.dtype)
        self.cols = np.empty(g.in_channels * math.prod(g.kernel_size) * wide, self.dtype)
        self.wide = np.empty(g.out_channels * wide, self.dtype)
        self.acc = None  # filter-gradient sum, transposed: (G, Cg*K, Og)

    def fill(self, x: np.ndarray, tile: _Tile, box: _Box) -> np.ndarray:
        """Columns of ``tile``: (G, Cg*K, m*N), N = box.positions."""
        g, m = self.g, tile.count
        groups, cg = g.groups, g.in_channels // g.groups
        spans = box.spans
        flat = self.slab[:m, :, : box.length]  # (m, C, L)
        flat[..., math.prod(spans) :] = 0  # the tail the last wide positions read
        slab = flat[..., : math.prod(spans)].reshape(m, g.in_channels, *spans)
        inside, dest = numpy_im2col.zero_padding(slab, g, box.starts, spans)
        slab[(slice(None), slice(None), *dest)] = x[(tile.images, slice(None), *inside)]
        item = flat.itemsize
        st = flat.strides
        n = box.positions
        # view (G, Cg, *k, m, N): [grp, c, *i, b, p] = flat[b, grp*Cg + c, p + sum_j i_j*strides_j]
        windows = as_strided(
            flat,
            shape=(groups, cg, *g.kernel_size, m, n),
            strides=(cg * st[1], st[1], *(s * item for s in box.strides), st[0], item),
            writeable=False,
        )
        size = g.in_channels * math.prod(g.kernel_size) * m * n
        cols = self.cols[:size].reshape(windows.shape)  # (G, Cg, *k, m, N)
        copy_into(cols, windows)
        return cols.reshape(groups, -1, m * n)  # (G, Cg, *k, m, N) -> (G, Cg*K, m*N)


def _work(g: ConvGeometry, batch: int) -> int:
    """Multiply-adds of the call."""
    k = math.prod(g.kernel_size) * (g.in_channels // g.groups)
    return batch * g.out_channels * math.prod(g.out_size) * k


def correlate(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, dtype, bias=None):
    """out (B, O, *Q) = conv(x (B, C, *S), w (O, Cg, *k)) (+ bias (O,)), accumulated in
    ``dtype``; ``out`` may be any strided view, in any dtype."""
    groups = g.groups
    tiles = _tiles(g, x.shape[0], np.dtype(dtype).itemsize)
    # (O, Cg, *k) -> (G, Og, Cg*K): the columns' row order already
    wmat = np.ascontiguousarray(w, dtype=dtype).reshape(groups, g.out_channels // groups, -1)

    def work(tile: _Tile, scratch: _Scratch) -> None:
        box = _Box(g, tile)
        cols = scratch.fill(x, tile, box)  # (G, Cg*K, m*N)
        m, n = tile.count, box.positions
        res = scratch.wide[: g.out_channels * m * n].reshape(groups, -1, m * n)
        np.matmul(wmat, cols, out=res)  # (G, Og, m*N)
        # (G, Og, m*N) -> (O, m, *wide) -> kept outputs (m, O, *Q_t)
        res = res.reshape(g.out_channels, m, *box.wide_shape(g))[(Ellipsis, *box.kept(g))]
        dest = out[(tile.images, slice(None), *tile.box)]  # (m, O, *Q_t)
        store(res.swapaxes(0, 1), dest, None if bias is None else bias_view(bias, g.ndim + 1, 0))

    numpy_threads.run(tiles, work, lambda: _Scratch(g, tiles, dtype), _work(g, x.shape[0]))


def filter_grad(dy: np.ndarray, x: np.ndarray, g: ConvGeometry, dtype) -> np.ndarray:
    """dW (O, Cg, *k) = sum over tiles of dy_wide (G, Og, m*N) @ columns^T (G, m*N, Cg*K)."""
    groups = g.groups
    tiles = _tiles(g, x.shape[0], np.dtype(dtype).itemsize)

    def work(tile: _Tile, scratch: _Scratch) -> None:
        box = _Box(g, tile)
        cols = scratch.fill(x, tile, box)  # (G, Cg*K, m*N)
        m, n = tile.count, box.positions
        # dy (m, O, *Q_t) -> the kept part of a zeroed (O, m, *wide), widened on the way
        wide = scratch.wide[: g.out_channels * m * n].reshape(g.out_channels, m, *box.wide_shape(g))
        wide[...] = 0
        part = dy[(tile.images, slice(None), *tile.box)]  # (m, O, *Q_t)
        wide[(Ellipsis, *box.kept(g))] = part.swapaxes(0, 1)
        # dW^T (G, Cg*K, Og) = cols (G, Cg*K, m*N) @ (O, m, *wide) -> (G, Og, m*N) transposed
        # (measured up to 1.3x faster than dy_wide @ cols^T, which reads the columns transposed)
        term = np.matmul(cols, wide.reshape(groups, -1, m * n).transpose(0, 2, 1))
        if scratch.acc is None:
            scratch.acc = term
        else:
            scratch.acc += term

    sums = numpy_threads.run(
        tiles, work, lambda: _Scratch(g, tiles, dtype), _work(g, x.shape[0]), sums=True
    )
    dw = sums[0].acc
    for other in sums[1:]:
        dw += other.acc
    # (G, Cg*K, Og) -> (G, Og, Cg*K) -> (O, Cg, *k)
    dw = np.ascontiguousarray(dw.transpose(0, 2, 1))
    return dw.reshape(g.out_channels, g.in_channels // groups, *g.kernel_size)
