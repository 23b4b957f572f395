"""Winograd F(4x4, 3x3) for dense 3x3 stride-1 convolutions in float32 (JIT).

A 2-d correlation of a 6x6 input tile d with a 3x3 kernel g gives a 4x4
output tile as (Lavin & Gray, 2016; interpolation points 0, +-1, +-2, inf)

    Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, over 6x6 points)

so each output tile costs 36 multiplies per (input, output) channel pair
instead of 144: per point p the products over channels are one GEMM,

    M[p] (O, T) = U[p] (O, C) @ V[p] (C, T),   U = G g G^T,  V = B^T d B,

over the T tiles of a task. The transforms are additions (and scalings by
2, 4, 5, 8) done in the JIT, one row pass and one column pass each, the
zero padding read in place; the GEMMs are NumPy's. Tiles past the output's
edge read zeros and their outputs are cropped.

The result is not the im2col sum: fp32 rounding errors of the transforms
reach a few units of 1e-6 of the output's scale (measured against torch
float64 in tests/test_fast_algorithms.py; docs/benchmarks.md has the
figures). It runs only for float32 sums (float32, and float16 widened) with
``mconv.get_algorithm() == 'fast'``; float64 and ``set_algorithm('exact')``
keep the exact paths.
"""

from __future__ import annotations

import math

import numpy as np

from ..geometry import ConvGeometry
from ..precision import accumulator, bias_view, fast_algorithms, store
from . import numpy_jit, numpy_threads

M, R = 4, 3  # output tile, kernel
ALPHA = M + R - 1  # input tile: 6
G = np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]])  # fmt: skip
# the transforms' constants as float32: an int constant would make numba compute in float64
_F2, _F4, _F5, _F8 = (np.float32(c) for c in (2, 4, 5, 8))
_KRON = np.kron(G, G).astype(np.float32)  # (36, 9): [6a + b, 3i + j] = G[a, i] * G[b, j]
# Smallest layer worth the transforms (measured on 2 cores: the GEMMs must dominate)
MIN_CHANNELS = 16
# V (36, C, T) and M (36, O, T) of a task: each about this many bytes at most
_TASK_BYTES = 2 << 20


def applies(g: ConvGeometry, dtype) -> bool:
    """Dense, 2-d 3x3 or 3-d k x 3 x 3 (any depth stride), stride 1 on the last two axes,
    no dilation, no crop, float32 sums, channels >= MIN_CHANNELS, the JIT on and
    ``get_algorithm() == 'fast'``."""
    return (
        g.ndim in (2, 3)
        and g.kernel_size[-2:] == (R, R)
        and g.groups == 1
        and g.stride[-2:] == (1, 1)
        and all(d == 1 for d in g.dilation)
        and min(g.in_channels, g.out_channels) >= MIN_CHANNELS
        and all(lo >= 0 and hi >= 0 for lo, hi in g.padding)
        and min(g.out_size) > 0
        and accumulator(dtype) == np.float32
        and fast_algorithms()
        and numpy_jit.enabled()
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


def weight_transform(w: np.ndarray) -> np.ndarray:
    """U (36, O, C) = G w G^T per (output, input) channel pair (float32 sums of 9 terms)."""
    # U[6a + b, o, c] = sum_ij G[a, i] G[b, j] w[o, c, i, j]: one GEMM with kron(G, G) (36, 9)
    outs, channels = w.shape[:2]
    u = _KRON @ w.reshape(outs * channels, R * R).T.astype(np.float32)  # (36, 9) @ (9, O*C)
    return u.reshape(ALPHA * ALPHA, outs, channels)


def _tasks(batch: int, th: int, row_bytes: int) -> list[list[tuple[int, int, int]]]:
    """Segments (image, first tile row, end) per task, about _TASK_BYTES of V each: row blocks
    of one image, or whole images together (a GEMM over few tiles would read all of U for
    little work), as many per task as share the batch out between the workers."""
    rows = max(1, _TASK_BYTES // row_bytes)
    if rows < th:
        return [[(b, r0, min(th, r0 + rows))] for b in range(batch) for r0 in range(0, th, rows)]
    per_task = max(1, min(rows // th, -(-batch // numpy_threads.get_num_threads())))
    return [
        [(b, 0, th) for b in range(i, min(batch, i + per_task))] for i in range(0, batch, per_task)
    ]


def correlate(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, bias=None):
    """out (B, O, [Q_d,] Q0, Q1) = conv(x (B, C, [S_d,] S0, S1), w (O, C, [k_d,] 3, 3))
    (+ bias (O,)) by Winograd F(4x4, 3x3) on the last two axes, summed in float32; ``out``
    may be any strided view, in any dtype.

    A 3-d conv is a sum over its depth taps of 2-d convs of input slices; it is summed in the
    transformed domain, where each input slice is transformed once: M of output slice z is
    U (36, O, k_d*C) @ V of input slices z*s_d - p_d + 0..k_d-1 (36, k_d*C, T), one GEMM."""
    if g.ndim == 2:  # as 3-d with one slice: (B, C, 1, S0, S1)
        x, w, out = x[:, :, None], w[:, :, None], out[:, :, None]
        (dlo, dhi), sd = (0, 0), 1
    else:
        (dlo, dhi), sd = g.padding[0], g.stride[0]
    batch, channels, depth = x.shape[:3]
    outs, kd, qd = g.out_channels, w.shape[2], out.shape[2]
    slices = depth + dlo + dhi  # V of every padded input slice; the padding's V is zero
    th, tw = (-(-q // M) for q in g.out_size[-2:])  # tiles per column and per row
    top, left = g.padding[-2][0], g.padding[-1][0]
    # (O, C, k_d, 3, 3) -> (O, k_d, C, 3, 3) -> (O, k_d*C, 3, 3): the slices' order in V
    u = weight_transform(w.transpose(0, 2, 1, 3, 4).reshape(outs, kd * channels, R, R))
    tasks = _tasks(batch, th, ALPHA * ALPHA * max(kd * channels, outs) * tw * 4)
    most = max(sum(r1 - r0 for _, r0, r1 in task) for task in tasks) * tw  # tiles of a task
    bias = None if bias is None else bias_view(bias.astype(np.float32, copy=False), 3, 0)

    def scratch():
        return (np.empty(ALPHA * ALPHA * slices * channels * most, np.float32),  # V
                np.empty(ALPHA * ALPHA * outs * most, np.float32),  # M
                np.empty((outs, min(th, most // tw) * M, tw * M), np.float32),  # Y
                np.empty((ALPHA, tw * M + 2), np.float32), np.empty((ALPHA, tw * M + 2), np.float32),
                np.empty(ALPHA * ALPHA * min(th, most // tw) * tw, np.float32))  # fmt: skip

    def work(task, buffers) -> None:
        v, mm, y, lines, lines2, per_tile = buffers
        tiles = sum(r1 - r0 for _, r0, r1 in task) * tw
        v = v[: ALPHA * ALPHA * slices * channels * tiles]
        v = v.reshape(ALPHA * ALPHA, slices, channels, tiles)
        v[:, :dlo] = 0
        v[:, dlo + depth :] = 0
        mm = mm[: ALPHA * ALPHA * outs * tiles].reshape(ALPHA * ALPHA, outs, tiles)
        start = 0
        for b, r0, r1 in task:  # V of each segment's tiles, side by side
            lo = max(0, M * r0 - top)  # the input rows the segment reads, widened alone
            hi = max(lo, M * r1 - top + R - 1)
            cols = per_tile[: ALPHA * ALPHA * (r1 - r0) * tw].reshape(ALPHA, ALPHA, -1)
            for d in range(depth):
                rows = x[b, :, d, lo:hi].astype(np.float32, copy=False)  # (C, rows, S1)
                part = v[:, dlo + d, :, start : start + (r1 - r0) * tw]  # (36, C, tiles)
                _input_transform(rows, top + lo, left, r0, r1, part, lines, lines2, cols)
            start += (r1 - r0) * tw
        for q in range(qd):
            # (36, O, k_d*C) @ (36, k_d, C, T) as (36, k_d*C, T) -> (36, O, T)
            np.matmul(u, v[:, q * sd : q * sd + kd].reshape(ALPHA * ALPHA, -1, tiles), out=mm)
            start = 0
            for b, r0, r1 in task:
                yt = y[:, : (r1 - r0) * M]  # (O, 4 rows, 4 TW)
                z = per_tile[: ALPHA * M * (r1 - r0) * tw].reshape(ALPHA, M, -1)
                part = mm[:, :, start : start + (r1 - r0) * tw]
                _output_transform(part, yt, z, lines2[:, : tw * M])
                start += (r1 - r0) * tw
                q0 = min(g.out_size[-2], r1 * M) - r0 * M  # rows of the segment in the output
                dest = out[b, :, q, r0 * M : r0 * M + q0]  # (O, q0, Q1)
                store(yt[:, :q0, : g.out_size[-1]], dest, bias)

    work_size = batch * outs * channels * math.prod(g.out_size) * math.prod(g.kernel_size)
    numpy_threads.run(tasks, work, scratch, work_size)
