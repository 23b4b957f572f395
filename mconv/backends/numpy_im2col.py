"""Channels-last, tiled im2col + GEMM: the dense and grouped path of the NumPy backend.

A call is cut into tasks (``make_tiles``): a few whole images, or a box of one
image's output (single indices on the leading spatial axes, a block of rows
on one axis, the later axes whole), so that a task's columns stay near
``COLUMN_BYTES`` and live in cache. Per task:

1. copy the input box it reads into a zero-bordered, group-major slab
   ``(m, G, *span, Cg)`` (this is also where fp16 is widened);
2. copy the windows of the slab into columns ``(G, m, P_t, K*Cg)``: each
   copy moves a contiguous run of kw*Cg values;
3. one GEMM per group: ``(m*P_t, K*Cg) @ (K*Cg, Og)``, tall and skinny,
   which is the shape OpenBLAS runs fastest;
4. forward: transpose the ``(P_t, Og)`` result into the NCHW output;
   filter gradient: ``dy^T (Og, m*P_t) @ columns`` added to the worker's sum.

Padding may be negative (a crop): the backward-data phases in
``numpy_backend`` use that. Nothing here allocates more than the output
plus a few tasks' scratch, whatever the batch."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..geometry import ConvGeometry
from ..precision import store
from . import numpy_threads
from .numpy_convert import copy_into

# Target size of one task's columns: a few of them fit the L3 cache (4 MiB measured 5% faster
# than 2 MiB over the benchmark shapes on a 2-core EPYC, up to 1.2x on small groups and 3-d).
COLUMN_BYTES = 4 << 20


@dataclass(frozen=True)
class _Tile:
    images: slice  # batch range
    box: tuple[slice, ...]  # output range per spatial axis

    @property
    def count(self) -> int:
        return self.images.stop - self.images.start

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(r.stop - r.start for r in self.box)


def even_block_size(total: int, most: int, multiple: int = 1) -> int:
    """Rows (or images) per block: at most ``most``, in blocks of equal size (56 rows in blocks
    of at most 31 are 28 + 28, not 31 + 25, which would leave a worker idle), and in a number
    of blocks that is a multiple of ``multiple`` (the workers) where ``total`` allows."""
    blocks = -(-total // max(1, most))
    blocks = min(total, -(-blocks // multiple) * multiple)
    return -(-total // blocks)


def make_tiles(geom: ConvGeometry, batch: int, itemsize: int, widths=None) -> list[_Tile]:
    """Whole images per task when an image's columns fit ``COLUMN_BYTES`` (and there are
    images for every worker), else boxes of one image: single indices on the leading axes, a
    block of rows on axis ``a``, whole later axes. Blocks are of equal size, in a multiple of
    the worker count where the sizes allow.

    ``widths``: the column positions computed per output index along each axis (default: the
    output size; the wide path computes over the padded width of the later axes)."""
    out = geom.out_size
    widths = out if widths is None else widths
    budget = max(1, COLUMN_BYTES // (itemsize * geom.in_channels * math.prod(geom.kernel_size)))
    workers = numpy_threads.get_num_threads()
    whole = tuple(slice(0, q) for q in out)
    if math.prod(widths) <= budget and batch >= workers:
        per = even_block_size(batch, budget // max(1, math.prod(widths)), workers)
        return [_Tile(slice(b, min(batch, b + per)), whole) for b in range(0, batch, per)]
    a = next(j for j in range(geom.ndim) if math.prod(widths[j + 1 :]) <= budget)
    boxes = batch * math.prod(out[:a])  # tiles before the rows of axis a are cut
    rows = even_block_size(out[a], budget // math.prod(widths[a + 1 :]), -(-workers // boxes))
    return [
        _Tile(
            slice(b, b + 1),
            (*(slice(i, i + 1) for i in lead), slice(r, min(out[a], r + rows)), *whole[a + 1 :]),
        )
        for b in range(batch)
        for lead in itertools.product(*(range(q) for q in out[:a]))
        for r in range(0, out[a], rows)
    ]


def _span(g: ConvGeometry, j: int, q: slice) -> tuple[int, int]:
    """(first padded input index, count) that output range ``q`` of axis j reads."""
    return q.start * g.stride[j], (q.stop - q.start - 1) * g.stride[j] + g.dilation[j] * (
        g.kernel_size[j] - 1
    ) + 1


def zero_padding(slab, g: ConvGeometry, firsts, counts):
    """Zero the part of ``slab`` that lies in the padding; return (input slices, slab slices)
    of the rest. Slab axis 2 + j holds padded indices [first_j, first_j + count_j) of axis j,
    that is input indices shifted by the padding before; those outside [0, S_j) are zero."""
    inside, dest = [], []
    for j, (first, count, size, (lo, _)) in enumerate(zip(firsts, counts, g.in_size, g.padding)):
        start = first - lo
        real = slice(min(max(start, 0), start + count), max(min(start + count, size), start))
        top, bottom = real.start - start, real.stop - start
        axis = (slice(None),) * (2 + j)
        slab[(*axis, slice(0, top))] = 0
        slab[(*axis, slice(bottom, None))] = 0
        inside.append(real)
        dest.append(slice(top, bottom))
    return tuple(inside), tuple(dest)


class _Columns:
    """One worker's scratch: the padded slab and the columns of a tile."""

    def __init__(self, geom: ConvGeometry, tiles: list[_Tile], dtype):
        self.geom, self.dtype = geom, np.dtype(dtype)
        images = max(t.count for t in tiles)
        spans = [max(_span(geom, j, t.box[j])[1] for t in tiles) for j in range(geom.ndim)]
        groups, cg = geom.groups, geom.in_channels // geom.groups
        # (m, G, *span, Cg): a group's channels are innermost, so a window copy moves kw*Cg runs
        self.slab = np.empty((images, groups, *spans, cg), self.dtype)
        positions = max(math.prod(t.shape) * t.count for t in tiles)
        self.cols = np.empty(groups * positions * math.prod(geom.kernel_size) * cg, self.dtype)
        self.acc = None  # filter-gradient sum, (G, Og, K*Cg)

    def fill(self, x: np.ndarray, tile: _Tile) -> np.ndarray:
        """Columns of ``tile``: (G, m*P_t, K*Cg), m images x P_t output positions."""
        g = self.geom
        n, groups, cg = g.ndim, g.groups, g.in_channels // g.groups
        m, shape = tile.count, tile.shape
        spans = [_span(g, j, q) for j, q in enumerate(tile.box)]
        slab = self.slab[(slice(0, m), slice(None), *(slice(0, c) for _, c in spans))]
        inside, dest = zero_padding(slab, g, [f for f, _ in spans], [c for _, c in spans])
        src = x[(tile.images, slice(None), *inside)]  # (m, C, *box)
        src = src.reshape(m, groups, cg, *src.shape[2:])
        np.copyto(slab[(Ellipsis, *dest, slice(None))], np.moveaxis(src, 2, -1))
        st, item = slab.strides, slab.itemsize
        # view (m, G, *Q_t, *k, Cg): [b, grp, *q, *i, c] = slab[b, grp, *(q*stride + i*dilation), c]
        windows = as_strided(
            slab,
            shape=(m, groups, *shape, *g.kernel_size, cg),
            strides=(
                st[0],
                st[1],
                *(s * a for s, a in zip(g.stride, st[2 : 2 + n])),
                *(d * a for d, a in zip(g.dilation, st[2 : 2 + n])),
                item,
            ),
            writeable=False,
        )
        positions = math.prod(shape)
        size = groups * m * positions * math.prod(g.kernel_size) * cg
        # (G, m, *Q_t, *k, Cg) block of the scratch
        cols = self.cols[:size].reshape(groups, m, *shape, *g.kernel_size, cg)
        copy_into(cols, windows.swapaxes(0, 1))
        # (G, m, *Q_t, *k, Cg) -> (G, m*P_t, K*Cg)
        return cols.reshape(groups, m * positions, -1)


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


def correlate(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, dtype, bias=None):
    """out (B, O, *Q) = conv(x (B, C, *S), w (O, Cg, *k)) (+ bias (O,)), accumulated in
    ``dtype``; ``out`` may be any strided view, in any dtype."""
    batch, groups = x.shape[0], g.groups
    og = g.out_channels // groups
    tiles = make_tiles(g, batch, np.dtype(dtype).itemsize)
    wcols = _weight_columns(w, g, dtype)

    def work(tile: _Tile, scratch: _Columns) -> None:
        cols = scratch.fill(x, tile)  # (G, m*P_t, K*Cg)
        res = np.matmul(cols, wcols)  # (G, m*P_t, Og)
        m, shape = tile.count, tile.shape
        # (G, m*P_t, Og) -> (G, m, *Q_t, Og) -> (m, G, Og, *Q_t)
        res = np.moveaxis(res.reshape(groups, m, *shape, og), (0, -1), (1, 2))
        dest = out[(tile.images, slice(None), *tile.box)]  # (m, O, *Q_t)
        dest = dest.reshape(m, groups, og, *shape)  # (m, G, Og, *Q_t)
        # bias (O,) -> (G, Og, 1, ..)
        store(res, dest, None if bias is None else bias.reshape(groups, og, *(1,) * g.ndim))

    numpy_threads.run(tiles, work, lambda: _Columns(g, tiles, dtype), _work(g, batch))


def filter_grad(dy: np.ndarray, x: np.ndarray, g: ConvGeometry, dtype) -> np.ndarray:
    """dW (O, Cg, *k) = sum over tiles of dy (G, Og, m*P_t) @ columns (G, m*P_t, K*Cg)."""
    batch, groups = x.shape[0], g.groups
    og = g.out_channels // groups
    tiles = make_tiles(g, batch, np.dtype(dtype).itemsize)

    def work(tile: _Tile, scratch: _Columns) -> None:
        cols = scratch.fill(x, tile)  # (G, m*P_t, K*Cg)
        m, shape = tile.count, tile.shape
        # dy (m, O, *Q_t) -> (G, Og, m, *Q_t) -> (G, Og, m*P_t), widened once
        part = dy[(tile.images, slice(None), *tile.box)].reshape(m, groups, og, *shape)
        part = np.ascontiguousarray(np.moveaxis(part, 0, 2), dtype=dtype).reshape(groups, og, -1)
        term = np.matmul(part, cols)  # (G, Og, K*Cg)
        if scratch.acc is None:
            scratch.acc = term
        else:
            scratch.acc += term

    sums = numpy_threads.run(
        tiles, work, lambda: _Columns(g, tiles, dtype), _work(g, batch), sums=True
    )
    dw = sums[0].acc
    for other in sums[1:]:
        dw += other.acc
    # (G, Og, K*Cg) -> (O, *k, Cg) -> (O, Cg, *k)
    dw = dw.reshape(g.out_channels, *g.kernel_size, g.in_channels // groups)
    return np.ascontiguousarray(np.moveaxis(dw, -1, 1))


def scatter_bytes(g: ConvGeometry, itemsize: int) -> int:
    """Columns of one image on the col2im path: (P, K*C)."""
    return itemsize * math.prod(g.out_size) * math.prod(g.kernel_size) * g.in_channels


def scatter_data(dy: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, dtype) -> None:
    """out (B, C, *S) = A_w^T dy as col2im: columns = W^T dy per image, then K shifted adds.

    Cheaper than the stride phases when C is much smaller than O (the phases
    copy O-channel columns; these are C-channel ones). Tasks are whole images,
    so no two workers add into the same place.
    """
    batch, groups = dy.shape[0], g.groups
    og, cg = g.out_channels // groups, g.in_channels // groups
    dtype = np.dtype(dtype)  # the accumulator; ``out`` may be narrower
    per = max(1, min(batch, COLUMN_BYTES // max(1, scatter_bytes(g, dtype.itemsize))))
    tasks = [slice(b, min(batch, b + per)) for b in range(0, batch, per)]
    # w (O, Cg, *k) -> (G, Og, Cg*K) -> W^T (G, Cg*K, Og)
    wt = w.astype(dtype, copy=False).reshape(groups, og, -1).transpose(0, 2, 1)
    padded = g.padded_size

    def scratch():
        return np.empty((per, groups, cg, *padded), dtype)  # (m, G, Cg, *Sp)

    def work(images: slice, slab_all: np.ndarray) -> None:
        m, p = images.stop - images.start, math.prod(g.out_size)
        # dy (m, O, *Q) -> (m, G, Og, P): W^T (G, Cg*K, Og) @ dy -> (m, G, Cg*K, P)
        part = dy[images].reshape(m, groups, og, p).astype(dtype, copy=False)
        cols = np.matmul(wt, part).reshape(m, groups, cg, *g.kernel_size, *g.out_size)
        slab = slab_all[:m]
        slab[...] = 0
        st = slab.strides
        for tap in np.ndindex(*g.kernel_size):
            # slab positions q*stride + tap*dilation: a (m, G, Cg, *Q) view
            corner = slab[(Ellipsis, *(slice(i * d, None) for i, d in zip(tap, g.dilation)))]
            view = as_strided(
                corner,
                shape=(m, groups, cg, *g.out_size),
                strides=(*st[:3], *(s * a for s, a in zip(g.stride, st[3:]))),
            )
            view += cols[(slice(None),) * 3 + tap]
        inner = slab[(Ellipsis, *(slice(lo, lo + s) for s, (lo, _) in zip(g.in_size, g.padding)))]
        np.copyto(out[images].reshape(m, groups, cg, *g.in_size), inner)

    numpy_threads.run(tasks, work, scratch, _work(g, batch))
