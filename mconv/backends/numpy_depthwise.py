"""Depthwise convolution (C = O = G) on the CPU: per-channel tap columns and a tiny GEMM.

A depthwise conv has K multiply-adds per output, too few for im2col + GEMM
over channels (each GEMM would be 1 x K). Instead each task takes one image
and a block of channels, pads them into a flat scratch ``(cb, prod(Sp))``
and copies the K shifted windows into ``cols (cb, K, P)``; then
``w (cb, 1, K) @ cols`` gives the outputs and ``dy (cb, 1, P) @ cols^T``
the filter gradient.

With stride 1 a window is one contiguous run of the flat padded plane when
the output is computed "wide": position q sits at the flat index
``sum_j q_j * Sp_stride_j``, so the first axis keeps its Q0 rows and every
other axis runs over its whole padded width; the extra columns are cropped
(forward) or meet zeros in dy (filter gradient). Other strides copy strided
windows of shape Q.

With the JIT (``numpy_jit``) no columns are built at all: the outputs of a
channel are K multiply-adds of the weight with those runs, and the filter
gradient K dot products of dy with them, straight from the padded plane (2
values moved per output instead of K + 2). A stride splits the padded plane
into prod(stride) phase planes (index u of phase r holds padded index
u*s + r): tap i then reads phase (i*d) % s at a shift of (i*d) // s, a
stride-1 run again, and the output is wide over the phase planes' width.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..geometry import ConvGeometry
from ..precision import bias_view, store
from . import numpy_jit, numpy_planes, numpy_threads
from .numpy_convert import copy_into

# Channels per task: enough for long copies, few enough to stay in cache.
_TASK_BYTES = 4 << 20


@numpy_jit.kernel(fastmath={"contract"})
def _taps_forward(flat, w, offsets, res):
    # res[c, p] = sum_t w[c, t] * flat[c, p + offsets[t]]: flat (cb, L), w (cb, K), res (cb, P);
    # three taps per pass over res (a pass per tap would load and store it K times)
    positions, taps = res.shape[1], offsets.shape[0]
    for c in range(res.shape[0]):
        acc = res[c]
        acc[:] = 0
        for t in range(0, taps - 2, 3):
            w0, w1, w2 = w[c, t], w[c, t + 1], w[c, t + 2]
            r0 = flat[c, offsets[t] : offsets[t] + positions]
            r1 = flat[c, offsets[t + 1] : offsets[t + 1] + positions]
            r2 = flat[c, offsets[t + 2] : offsets[t + 2] + positions]
            for p in range(positions):
                acc[p] += w0 * r0[p] + w1 * r1[p] + w2 * r2[p]
        for t in range(taps - taps % 3, taps):
            wv, start = w[c, t], offsets[t]
            run = flat[c, start : start + positions]
            for p in range(positions):
                acc[p] += wv * run[p]


@numpy_jit.kernel(fastmath={"contract", "reassoc"})
def _taps_filter_grad(flat, dy, offsets, dw):
    # dw[c, t] += sum_p dy[c, p] * flat[c, p + offsets[t]]: dy (cb, P), dw (cb, K); three taps
    # per pass over dy
    positions, taps = dy.shape[1], offsets.shape[0]
    for c in range(dy.shape[0]):
        d = dy[c]
        for t in range(0, taps - 2, 3):
            r0 = flat[c, offsets[t] : offsets[t] + positions]
            r1 = flat[c, offsets[t + 1] : offsets[t + 1] + positions]
            r2 = flat[c, offsets[t + 2] : offsets[t + 2] + positions]
            s0 = s1 = s2 = dw.dtype.type(0)
            for p in range(positions):
                s0 += d[p] * r0[p]
                s1 += d[p] * r1[p]
                s2 += d[p] * r2[p]
            dw[c, t] += s0
            dw[c, t + 1] += s1
            dw[c, t + 2] += s2
        for t in range(taps - taps % 3, taps):
            run = flat[c, offsets[t] : offsets[t] + positions]
            total = dw.dtype.type(0)
            for p in range(positions):
                total += d[p] * run[p]
            dw[c, t] += total


def applies(g: ConvGeometry) -> bool:
    """Depthwise with multiplier 1: every group has one input and one output channel."""
    return g.depthwise and g.out_channels == g.groups


class _Plan:
    """Sizes shared by the tasks of one call."""

    def __init__(self, g: ConvGeometry, dtype):
        self.g, self.dtype = g, np.dtype(dtype)
        self.padded = g.padded_size
        self.taps = math.prod(g.kernel_size)
        self.wide = all(s == 1 for s in g.stride)
        self.direct = numpy_jit.enabled()  # no columns: see the module docstring
        # with the JIT and a stride, the taps read the phase planes (numpy_planes)
        layout = self.layout = numpy_planes.Planes(g, phased=self.direct and not self.wide)
        planes = layout.phases * layout.size  # floats of a channel's planes
        if self.wide or self.direct:  # output rows x full plane width of the other axes
            self.positions = g.out_size[0] * layout.plane[0]
            self.slack = int(layout.offsets.max()) + self.positions - planes
        else:
            self.positions, self.slack = math.prod(g.out_size), 0
        self.length = planes + max(0, self.slack)  # per channel, with a zero tail
        self.rows = 1 if self.direct else self.taps  # column rows per channel
        per_channel = self.dtype.itemsize * (self.rows + 2) * self.positions
        block = max(1, min(g.in_channels, _TASK_BYTES // per_channel))
        self.block = -(-g.in_channels // -(-g.in_channels // block))  # blocks of even size

    def tasks(self, batch: int) -> list[tuple[int, slice]]:
        c, block = self.g.in_channels, self.block
        return [
            (b, slice(c0, min(c, c0 + block))) for b in range(batch) for c0 in range(0, c, block)
        ]

    def scratch(self):
        flat = np.zeros((self.block, self.length), self.dtype)
        return _Scratch(flat, np.empty((self.block, self.rows, self.positions), self.dtype))

    def pad_into(self, x: np.ndarray, b: int, chans: slice, scratch) -> np.ndarray:
        """flat (cb, L): channels ``chans`` of image b, zero-padded, in the planes the taps
        read (the scratch's zeros stay where no input lands)."""
        return self.layout.pad_into(x, b, chans, scratch.flat)

    def columns(self, x: np.ndarray, b: int, chans: slice, scratch) -> np.ndarray:
        """cols (cb, K, P) of image b, channels ``chans``."""
        g, cb = self.g, chans.stop - chans.start
        flat = self.pad_into(x, b, chans, scratch)
        plane = flat[:, : math.prod(self.padded)].reshape(cb, *self.padded)
        cols = scratch.cols[:cb]
        if self.wide:  # (cb, *k, P_wide): [c, *i, p] = flat[c, p + sum_j i_j*dilation_j*plane_j]
            st = flat.strides
            runs = as_strided(
                flat,
                shape=(cb, *g.kernel_size, self.positions),
                strides=(
                    st[0],
                    *(d * p * st[1] for d, p in zip(g.dilation, self.layout.plane)),
                    st[1],
                ),
                writeable=False,
            )
            np.copyto(cols.reshape(runs.shape), runs)
            return cols
        st = plane.strides
        windows = as_strided(  # (cb, *k, *Q): [c, *i, *q] = plane[c, *(q*stride + i*dilation)]
            plane,
            shape=(cb, *g.kernel_size, *g.out_size),
            strides=(
                st[0],
                *(d * a for d, a in zip(g.dilation, st[1:])),
                *(s * a for s, a in zip(g.stride, st[1:])),
            ),
            writeable=False,
        )
        # (cb, *k, *Q) -> (cb, K, P)
        np.copyto(cols.reshape(cb, *g.kernel_size, *g.out_size), windows)
        return cols

    def crop(self, wide: np.ndarray) -> np.ndarray:
        """(cb, 1, P_wide) -> (cb, *Q): drop the columns past each axis' output size."""
        if not (self.wide or self.direct):
            return wide.reshape(wide.shape[0], *self.g.out_size)
        full = wide.reshape(wide.shape[0], self.g.out_size[0], *self.layout.phase[1:])
        return full[(slice(None), slice(None), *(slice(0, q) for q in self.g.out_size[1:]))]


class _Scratch:
    def __init__(self, flat, cols):
        self.flat, self.cols, self.acc, self.dy = flat, cols, None, None


def _work(g: ConvGeometry, batch: int) -> int:
    return batch * g.out_channels * math.prod(g.out_size) * math.prod(g.kernel_size)


def forward(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, acc, bias=None):
    """out (B, C, *Q) = depthwise conv of x (B, C, *S) with w (C, 1, *k) (+ bias (C,)),
    accumulated in ``acc``."""
    plan = _Plan(g, acc)
    wk = w.reshape(g.out_channels, 1, -1).astype(acc, copy=False)  # (C, 1, K)

    def work(task, scratch: _Scratch) -> None:
        b, chans = task
        if plan.direct:
            flat = plan.pad_into(x, b, chans, scratch)
            res = scratch.cols[: chans.stop - chans.start]  # (cb, 1, P)
            _taps_forward(flat, wk[chans, 0], plan.layout.offsets, res[:, 0])
        else:
            cols = plan.columns(x, b, chans, scratch)
            res = np.matmul(wk[chans], cols)  # (cb, 1, K) @ (cb, K, P) -> (cb, 1, P)
        cb = None if bias is None else bias_view(bias[chans], g.ndim + 1, 0)  # (cb,) -> (cb, 1, ..)
        store(plan.crop(res), out[b, chans], cb)

    tasks = plan.tasks(x.shape[0])
    numpy_threads.run(tasks, work, plan.scratch, _work(g, x.shape[0]))


def filter_grad(dy: np.ndarray, x: np.ndarray, g: ConvGeometry, dtype) -> np.ndarray:
    """dW (C, 1, *k) = sum over images of dy (cb, 1, P) @ cols^T (cb, P, K)."""
    plan = _Plan(g, dtype)

    def scratch():
        s = plan.scratch()
        s.acc = np.zeros((g.out_channels, 1, plan.taps), plan.dtype)
        s.dy = np.zeros((plan.block, 1, plan.positions), plan.dtype)  # wide columns stay zero
        return s

    def work(task, s: _Scratch) -> None:
        b, chans = task
        cb = chans.stop - chans.start
        dyc = s.dy[:cb]
        copy_into(plan.crop(dyc), dy[b, chans])  # (cb, *Q) into the (wide) row
        if plan.direct:
            flat = plan.pad_into(x, b, chans, s)
            _taps_filter_grad(flat, dyc[:, 0], plan.layout.offsets, s.acc[chans, 0])
            return
        cols = plan.columns(x, b, chans, s)
        s.acc[chans] += np.matmul(dyc, cols.swapaxes(1, 2))  # (cb, 1, P) @ (cb, P, K)

    tasks = plan.tasks(x.shape[0])
    sums = numpy_threads.run(tasks, work, scratch, _work(g, x.shape[0]), sums=True)
    dw = sums[0].acc
    for other in sums[1:]:
        dw += other.acc
    return dw.reshape(g.out_channels, 1, *g.kernel_size)
