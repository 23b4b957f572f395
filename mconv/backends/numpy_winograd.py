"""Winograd F(4x4, 3x3) for dense 3x3 stride-1 convolutions in float32 (JIT): y, dx and dW.

A 2-d correlation of a 6x6 input tile d with a 3x3 kernel g gives a 4x4
output tile as (Lavin & Gray, 2016; interpolation points 0, +-1, +-2, inf)

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, over 6x6 points)

so each output tile costs 36 multiplies per (input, output) channel pair
instead of 144: per point p the products over channels are one GEMM,

    M[p] (O, T) = U[p] (O, C) @ V[p] (C, T),   U = G g G^T,  V = B^T d B,

over the T tiles of a task. The transforms are additions (and scalings by
2, 4, 5, 8) done in the JIT, one row pass and one column pass each, the
zero padding read in place; the GEMMs are NumPy's. Tiles past the output's
edge read zeros and their outputs are cropped. The weight gradient is the
adjoint: dW = G^T [ sum over tiles of (A dY A^T) * V ] G, one GEMM per point
too. 3-d k x 3 x 3 convs sum their depth taps in the transformed domain
(``_Plan``).

The result is not the im2col sum: fp32 rounding errors of the transforms
reach a few units of 1e-6 of the output's scale (measured against torch
float64 in tests/test_fast_algorithms.py; docs/benchmarks.md has the
figures). A transform mixes a whole tile, so an infinite or NaN input would
spread NaN over outputs that do not depend on it: calls with a non-finite
operand take the plain sum instead (``applies``). It runs only for float32
sums (float32, and float16 widened) with
``mconv.get_algorithm() == 'fast'``; float64 and ``set_algorithm('exact')``
keep the exact paths.
"""

from __future__ import annotations

import math

import numpy as np

from ..geometry import ConvGeometry
from ..precision import accumulator, bias_view, fast_algorithms, store
from . import numpy_jit, numpy_threads
from .numpy_convert import widened

M, R = 4, 3  # output tile, kernel
ALPHA = M + R - 1  # input tile: 6
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])  # fmt: skip
# the transforms' constants as float32: an int constant would make numba compute in float64
_F2, _F4, _F5, _F8 = (np.float32(c) for c in (2, 4, 5, 8))
_KRON = np.kron(G, G).astype(np.float32)  # (36, 9): [6a + b, 3i + j] = G[a, i] * G[b, j]
# Smallest layer worth the transforms (measured on 2 cores: the GEMMs must dominate)
MIN_CHANNELS = 16
# Each element of U (36 * O * k_d*C floats) takes part in one multiply-add per output tile,
# so with few tiles for its size the GEMMs mostly stream U (and the weight gradient writes
# a U-sized sum per task). Measured on 2 cores: 64 channels at 56x56 (batch 8: 1568 tiles,
# 0.4 KiB of U per tile) and 128 at 28x28 (392 tiles, 6 KiB) ran 1.3-2x faster than
# im2col; 256 at 14x14 (128 tiles, 72 KiB) 1.3x faster on one thread but 1.4x slower
# (fwd+bwd) on two; 512 at 7x7 (32 tiles) slower on both.
MIN_TILES = 64
MAX_U_BYTES_PER_TILE = 16 << 10
# V (36, C, T) and M (36, O, T) of a task: each about this many bytes at most
_TASK_BYTES = 2 << 20


def applies(g: ConvGeometry, a: np.ndarray, b: np.ndarray) -> bool:
    """For operands ``a`` (x or dy: the batch and dtype) and ``b``: dense, 2-d 3x3 or 3-d
    k x 3 x 3 (any depth stride), stride 1 on the last two axes, no dilation, no crop,
    float32 sums, channels >= MIN_CHANNELS, enough output tiles for U's size (MIN_TILES,
    MAX_U_BYTES_PER_TILE), the JIT on, ``get_algorithm() == 'fast'``, and both operands
    finite (checked last: it reads them)."""
    batch = a.shape[0]
    tiles = batch * math.prod(g.out_size[:-2]) * math.prod(-(-q // M) for q in g.out_size[-2:])
    u_bytes = ALPHA * ALPHA * g.out_channels * g.in_channels * math.prod(g.kernel_size[:-2]) * 4
    return (
        g.ndim in (2, 3)
        and tiles >= MIN_TILES
        and u_bytes <= MAX_U_BYTES_PER_TILE * tiles
        and g.kernel_size[-2:] == (R, R)
        and g.groups == 1
        and g.stride[-2:] == (1, 1)
        and all(d == 1 for d in g.dilation)
        and min(g.in_channels, g.out_channels) >= MIN_CHANNELS
        and all(lo >= 0 and hi >= 0 for lo, hi in g.padding)
        and min(g.out_size) > 0
        and accumulator(a.dtype) == np.float32
        and fast_algorithms()
        and numpy_jit.enabled()
        and finite(a, b)
    )


@numpy_jit.kernel(fastmath={"contract"})
def _input_transform(x, top, left, tr0, tr1, v, lines, rows, cols):
    # x (C, H, W), zero outside; tile rows tr0..tr1 of tile columns 0..TW-1, tile (r, t)
    # reading x[4r - top + 0..5, 4t - left + 0..5]; v (36, C, T): V of tile (tr0 + i, t) at
    # column i*TW + t, point 6j + k; scratch: lines, rows (6, 4TW + 2), cols (6, 6, T)
    channels, height, width = x.shape
    span = lines.shape[1]
    tw = (span - 2) // 4
    tiles = (tr1 - tr0) * tw
    x0, j0 = max(0, -left), max(0, left)  # x column x0 lands at line column j0
    n = max(0, min(width - x0, span - j0))
    for c in range(channels):
        for tr in range(tr0, tr1):
            for r in range(6):
                line = lines[r]
                ih = 4 * tr - top + r
                if 0 <= ih < height and n > 0:
                    src = x[c, ih, x0 : x0 + n]
                    for w in range(j0):
                        line[w] = 0
                    for w in range(n):
                        line[j0 + w] = src[w]
                    for w in range(j0 + n, span):
                        line[w] = 0
                else:
                    for w in range(span):
                        line[w] = 0
            # rows: B^T d, along the six lines (contiguous, vectorised)
            for w in range(span):
                d0, d1, d2, d3, d4, d5 = (lines[0, w], lines[1, w], lines[2, w], lines[3, w],
                                          lines[4, w], lines[5, w])  # fmt: skip
                rows[0, w] = _F4 * d0 - _F5 * d2 + d4
                rows[1, w] = -_F4 * (d1 + d2) + d3 + d4
                rows[2, w] = _F4 * (d1 - d2) - d3 + d4
                rows[3, w] = _F2 * (d3 - d1) - d2 + d4
                rows[4, w] = _F2 * (d1 - d3) - d2 + d4
                rows[5, w] = _F4 * d1 - _F5 * d3 + d5
            # each tile's six values of each line, tile by tile (the one strided step)
            base = (tr - tr0) * tw
            for j in range(6):
                row = rows[j]
                for t in range(tw):
                    for s in range(6):
                        cols[j, s, base + t] = row[4 * t + s]
        # columns: (B^T d) B, over every tile at once (contiguous, vectorised)
        for j in range(6):
            e0, e1, e2, e3, e4, e5 = cols[j]  # (6, T): the tiles' six values in line j
            out = v[6 * j : 6 * j + 6, c]
            for t in range(tiles):
                d0, d1, d2, d3, d4, d5 = e0[t], e1[t], e2[t], e3[t], e4[t], e5[t]
                out[0, t] = _F4 * d0 - _F5 * d2 + d4
                out[1, t] = -_F4 * (d1 + d2) + d3 + d4
                out[2, t] = _F4 * (d1 - d2) - d3 + d4
                out[3, t] = _F2 * (d3 - d1) - d2 + d4
                out[4, t] = _F2 * (d1 - d3) - d2 + d4
                out[5, t] = _F4 * d1 - _F5 * d3 + d5


@numpy_jit.kernel(fastmath={"contract"})
def _output_transform(m, y, z, lines):
    # m (36, O, T) with T = rows*TW; y (O, 4 rows, 4 TW): A^T M A per tile;
    # scratch: z (6, 4, T), lines (6, 4 TW)
    outs, tiles = m.shape[1], m.shape[2]
    width = y.shape[2]
    tw = width // 4
    for o in range(outs):
        # columns: M A, over every tile at once (contiguous, vectorised)
        for j in range(6):
            f0, f1, f2, f3, f4, f5 = (m[6 * j, o], m[6 * j + 1, o], m[6 * j + 2, o],
                                      m[6 * j + 3, o], m[6 * j + 4, o], m[6 * j + 5, o])  # fmt: skip
            zj = z[j]
            for t in range(tiles):
                m0, m1, m2, m3, m4, m5 = f0[t], f1[t], f2[t], f3[t], f4[t], f5[t]
                zj[0, t] = m0 + m1 + m2 + m3 + m4
                zj[1, t] = m1 - m2 + _F2 * (m3 - m4)
                zj[2, t] = m1 + m2 + _F4 * (m3 + m4)
                zj[3, t] = m1 - m2 + _F8 * (m3 - m4) + m5
        for tr in range(tiles // tw):
            # each tile's four values side by side in its lines (the one strided step)
            base = tr * tw
            for j in range(6):
                line, zj = lines[j], z[j]
                for t in range(tw):
                    for i in range(4):
                        line[4 * t + i] = zj[i, base + t]
            # rows: A^T (M A), along the lines (contiguous, vectorised)
            r = 4 * tr
            for w in range(width):
                c0, c1, c2, c3, c4, c5 = (lines[0, w], lines[1, w], lines[2, w], lines[3, w],
                                          lines[4, w], lines[5, w])  # fmt: skip
                y[o, r, w] = c0 + c1 + c2 + c3 + c4
                y[o, r + 1, w] = c1 - c2 + _F2 * (c3 - c4)
                y[o, r + 2, w] = c1 + c2 + _F4 * (c3 + c4)
                y[o, r + 3, w] = c1 - c2 + _F8 * (c3 - c4) + c5


@numpy_jit.kernel(fastmath={"contract"})
def _grad_transform(dy, tw, dm, lines, rows, cols):
    # dy (O, H', Q1): a segment's rows of dY, zero past them and past Q1; dm (36, O, T) with
    # T = tile rows * TW: A dY A^T of tile (r, t) (dY rows 4r.., columns 4t..) at column
    # r*TW + t, point 6j + k; scratch: lines, rows (6, >= 4TW), cols (6, 4, T)
    outs, height, width = dy.shape
    tiles = dm.shape[2]
    span = 4 * tw
    n = min(width, span)
    for o in range(outs):
        for tr in range(tiles // tw):
            for r in range(4):
                line = lines[r]
                ih = 4 * tr + r
                if ih < height:
                    src = dy[o, ih]
                    for w in range(n):
                        line[w] = src[w]
                    for w in range(n, span):
                        line[w] = 0
                else:
                    for w in range(span):
                        line[w] = 0
            # rows: A dY, along the four lines (contiguous, vectorised)
            for w in range(span):
                e0, e1, e2, e3 = lines[0, w], lines[1, w], lines[2, w], lines[3, w]
                rows[0, w] = e0
                rows[1, w] = e0 + e1 + e2 + e3
                rows[2, w] = e0 - e1 + e2 - e3
                rows[3, w] = e0 + _F2 * e1 + _F4 * e2 + _F8 * e3
                rows[4, w] = e0 - _F2 * e1 + _F4 * e2 - _F8 * e3
                rows[5, w] = e3
            # each tile's four values of each line, tile by tile (the one strided step)
            base = tr * tw
            for j in range(6):
                row = rows[j]
                for t in range(tw):
                    for s in range(4):
                        cols[j, s, base + t] = row[4 * t + s]
        # columns: (A dY) A^T, over every tile at once (contiguous, vectorised)
        for j in range(6):
            e0, e1, e2, e3 = cols[j]  # (4, T): the tiles' four values in line j
            out = dm[6 * j : 6 * j + 6, o]
            for t in range(tiles):
                a0, a1, a2, a3 = e0[t], e1[t], e2[t], e3[t]
                out[0, t] = a0
                out[1, t] = a0 + a1 + a2 + a3
                out[2, t] = a0 - a1 + a2 - a3
                out[3, t] = a0 + _F2 * a1 + _F4 * a2 + _F8 * a3
                out[4, t] = a0 - _F2 * a1 + _F4 * a2 - _F8 * a3
                out[5, t] = a3


def weight_transform(w: np.ndarray) -> np.ndarray:
    """U (36, O, C) = G w G^T per (output, input) channel pair (float32 sums of 9 terms)."""
    # U[6a + b, o, c] = sum_ij G[a, i] G[b, j] w[o, c, i, j]: one GEMM with kron(G, G) (36, 9)
    outs, channels = w.shape[:2]
    u = _KRON @ w.reshape(outs * channels, R * R).T.astype(np.float32)  # (36, 9) @ (9, O*C)
    return u.reshape(ALPHA * ALPHA, outs, channels)


def finite(*arrays: np.ndarray) -> bool:
    """No inf or NaN in any of ``arrays`` (float16: from the bits, NumPy's float16 isfinite
    being slow); block by block, so the test's temporaries stay small. One pass over the
    operands: a few percent of the convolution's time."""
    for a in arrays:
        for part in _blocks(a):
            if a.dtype == np.float16:
                if (part.view(np.uint16) & 0x7FFF).max() >= 0x7C00:  # exponent all ones
                    return False
            elif not np.isfinite(part).all():
                return False
    return True


def _blocks(a: np.ndarray, most: int = 1 << 20):
    """Views of ``a`` of at most ``most`` bytes (or 1-d), split along the leading axes."""
    if a.nbytes <= most or a.ndim < 2:
        yield a
    else:
        for sub in a:
            yield from _blocks(sub, most)


def _tasks(batch: int, th: int, row_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Segments (image, first tile row, end) per task, about _TASK_BYTES of V each: row blocks
    of one image, or whole images together (a GEMM over few tiles would read all of U for
    little work), as many per task as share the batch out between the workers; with fewer
    images than workers, blocks of rows small enough to give every worker one."""
    rows = max(1, _TASK_BYTES // row_bytes)
    workers = numpy_threads.get_num_threads()
    if batch < workers:  # fewer images than workers: each image in blocks of rows for all
        rows = min(rows, -(-th * batch // workers))
    if rows < th:
        return [[(b, r0, min(th, r0 + rows))] for b in range(batch) for r0 in range(0, th, rows)]
    count = -(-batch // (rows // th))  # fewest tasks within the budget,
    count = -(-count // workers) * workers  # a multiple of the workers: even shares
    per_task = -(-batch // count)
    return [
        [(b, 0, th) for b in range(i, min(batch, i + per_task))] for i in range(0, batch, per_task)
    ]


class _Plan:
    """Tiles, tasks and buffers of one call, 2-d seen as 3-d with one slice.

    A 3-d conv is a sum over its depth taps of 2-d convs of input slices, summed in the
    transformed domain, where each input slice is transformed once: output slice q takes
    V of input slices q*s_d - p_d + 0..k_d-1, one GEMM over (k_d*C) (``window``)."""

    def __init__(self, g: ConvGeometry, batch: int):
        self.g, three = g, g.ndim == 3
        (self.dlo, dhi), self.sd = (g.padding[0], g.stride[0]) if three else ((0, 0), 1)
        self.depth, self.kd, self.qd = (
            (g.in_size[0], g.kernel_size[0], g.out_size[0]) if three else (1, 1, 1)
        )
        self.slices = self.depth + self.dlo + dhi  # V of each padded slice; the padding's is 0
        self.th, self.tw = (-(-q // M) for q in g.out_size[-2:])  # tiles per column, per row
        self.top, self.left = g.padding[-2][0], g.padding[-1][0]
        wide = max(self.kd * g.in_channels, g.out_channels)
        self.tasks = _tasks(batch, self.th, ALPHA * ALPHA * wide * self.tw * 4)
        self.most = max(self.tiles(task) for task in self.tasks)

    def tiles(self, task) -> int:
        return sum(r1 - r0 for _, r0, r1 in task) * self.tw

    def segments(self, task):
        """(image, first tile row, end, first tile column in the task's V, tiles)"""
        start = 0
        for b, r0, r1 in task:
            yield b, r0, r1, start, (r1 - r0) * self.tw
            start += (r1 - r0) * self.tw

    def scratch(self) -> dict:
        g, rows, width = self.g, min(self.th, self.most // self.tw), self.tw * M
        return dict(
            v=np.empty(ALPHA * ALPHA * self.slices * g.in_channels * self.most, np.float32),
            m=np.empty(ALPHA * ALPHA * g.out_channels * self.most, np.float32),
            y=np.empty((g.out_channels, rows * M, width), np.float32),
            lines=np.empty((ALPHA, width + 2), np.float32),
            rows=np.empty((ALPHA, width + 2), np.float32),
            per_tile=np.empty(ALPHA * ALPHA * rows * self.tw, np.float32),
            acc=None,  # the weight gradient's sum dU, and a buffer for each term of it
            term=None,
        )

    def per_tile(self, s: dict, shape) -> np.ndarray:
        return s["per_tile"][: math.prod(shape)].reshape(shape)

    def transform_input(self, x5: np.ndarray, task, s: dict) -> np.ndarray:
        """V (36, slices, C, T) of the task's tiles: every input slice, padding slices zero."""
        channels, tiles = self.g.in_channels, self.tiles(task)
        v = s["v"][: ALPHA * ALPHA * self.slices * channels * tiles]
        v = v.reshape(ALPHA * ALPHA, self.slices, channels, tiles)
        v[:, : self.dlo] = 0
        v[:, self.dlo + self.depth :] = 0
        for b, r0, r1, start, n in self.segments(task):
            lo = max(0, M * r0 - self.top)  # the input rows the segment reads, widened alone
            hi = max(lo, M * r1 - self.top + R - 1)
            cols = self.per_tile(s, (ALPHA, ALPHA, n))
            for d in range(self.depth):
                rows = widened(x5[b, :, d, lo:hi], np.float32)  # (C, rows, S1)
                part = v[:, self.dlo + d, :, start : start + n]  # (36, C, n)
                _input_transform(rows, self.top + lo, self.left, r0, r1, part, s["lines"],
                                 s["rows"], cols)  # fmt: skip
        return v

    def window(self, v: np.ndarray, q: int) -> np.ndarray:
        """(36, k_d, C, T) of output slice q as (36, k_d*C, T)."""
        return v[:, q * self.sd : q * self.sd + self.kd].reshape(ALPHA * ALPHA, -1, v.shape[-1])


def _as_3d(a: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """(B, C, S0, S1) -> (B, C, 1, S0, S1); 3-d arrays as they are."""
    return a[:, :, None] if g.ndim == 2 else a


def _work(g: ConvGeometry, batch: int) -> int:
    return batch * g.out_channels * g.in_channels * math.prod(g.out_size) * math.prod(g.kernel_size)


def correlate(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, bias=None):
    """out (B, O, [Q_d,] Q0, Q1) = conv(x (B, C, [S_d,] S0, S1), w (O, C, [k_d,] 3, 3))
    (+ bias (O,)) by Winograd F(4x4, 3x3) on the last two axes, summed in float32; ``out``
    may be any strided view, in any dtype."""
    plan, outs = _Plan(g, x.shape[0]), g.out_channels
    x5, out5, w5 = _as_3d(x, g), _as_3d(out, g), _as_3d(w, g)
    # (O, C, k_d, 3, 3) -> (O, k_d, C, 3, 3) -> (O, k_d*C, 3, 3): the slices' order in V
    u = weight_transform(w5.transpose(0, 2, 1, 3, 4).reshape(outs, -1, R, R))
    bias = None if bias is None else bias_view(bias.astype(np.float32, copy=False), 3, 0)

    def work(task, s: dict) -> None:
        v, tiles = plan.transform_input(x5, task, s), plan.tiles(task)
        mm = s["m"][: ALPHA * ALPHA * outs * tiles].reshape(ALPHA * ALPHA, outs, tiles)
        for q in range(plan.qd):
            np.matmul(u, plan.window(v, q), out=mm)  # (36, O, k_d*C) @ (36, k_d*C, T)
            for b, r0, r1, start, n in plan.segments(task):
                yt = s["y"][:, : (r1 - r0) * M]  # (O, 4 rows, 4 TW)
                z = plan.per_tile(s, (ALPHA, M, n))
                _output_transform(mm[:, :, start : start + n], yt, z, s["rows"][:, : plan.tw * M])
                q0 = min(g.out_size[-2], r1 * M) - r0 * M  # rows of the segment in the output
                dest = out5[b, :, q, r0 * M : r0 * M + q0]  # (O, q0, Q1)
                store(yt[:, :q0, : g.out_size[-1]], dest, bias)

    numpy_threads.run(plan.tasks, work, plan.scratch, _work(g, x.shape[0]))


def filter_grad(dy: np.ndarray, x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """dW (O, C, [k_d,] 3, 3) of ``correlate``, in float32: by adjointness,
    dW = G^T [ sum over tiles of (A dY A^T) * (B^T d B) ] G, so per point p one GEMM
    dU[p] (O, k_d*C) += dM[p] (O, T) @ V[p]^T (T, k_d*C), with dM = A dY A^T."""
    plan, outs = _Plan(g, x.shape[0]), g.out_channels
    x5, dy5 = _as_3d(x, g), _as_3d(dy, g)

    def work(task, s: dict) -> None:
        v, tiles = plan.transform_input(x5, task, s), plan.tiles(task)
        dm = s["m"][: ALPHA * ALPHA * outs * tiles].reshape(ALPHA * ALPHA, outs, tiles)
        for q in range(plan.qd):
            for b, r0, r1, start, n in plan.segments(task):
                rows = widened(dy5[b, :, q, M * r0 : M * r1], np.float32)  # (O, .., Q1)
                cols = plan.per_tile(s, (ALPHA, M, n))
                _grad_transform(rows, plan.tw, dm[:, :, start : start + n], s["lines"], s["rows"],
                                cols)  # fmt: skip
            # (36, O, T) @ (36, T, k_d*C) -> (36, O, k_d*C), summed over tasks and slices
            if s["acc"] is None:
                s["acc"] = np.matmul(dm, plan.window(v, q).transpose(0, 2, 1))
                s["term"] = np.empty_like(s["acc"])
            else:
                np.matmul(dm, plan.window(v, q).transpose(0, 2, 1), out=s["term"])
                s["acc"] += s["term"]

    sums = numpy_threads.run(plan.tasks, work, plan.scratch, _work(g, x.shape[0]), sums=True)
    du = sums[0]["acc"]
    for other in sums[1:]:
        du += other["acc"]
    # dW[o, kc, i, j] = sum_ab G[a, i] G[b, j] dU[6a + b, o, kc]: (9, 36) @ (36, O*k_d*C)
    dw = (_KRON.T @ du.reshape(ALPHA * ALPHA, -1)).reshape(R, R, outs, plan.kd, g.in_channels)
    # (3, 3, O, k_d, C) -> (O, C, k_d, 3, 3), the k_d axis dropped for 2-d
    dw = np.ascontiguousarray(dw.transpose(2, 4, 3, 0, 1))
    return dw.reshape(outs, g.in_channels, *g.kernel_size)
