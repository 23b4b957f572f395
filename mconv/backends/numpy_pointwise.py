"""1x1 convolutions (stride 1, no padding): one GEMM per image, no copies.

    forward      y[b] (G, Og, P) = w (G, Og, Cg) @ x[b] (G, Cg, P)
    filter_grad  dW (G, Og, Cg)  = sum_b dy[b] (G, Og, P) @ x[b]^T (G, P, Cg)

Images are the tasks of the worker pool (``numpy_threads``), so BLAS runs
single-threaded here like on every other path: a multi-threaded GEMM on the
calling thread would leave OpenBLAS threads spinning into the next pooled
call. fp16 is widened a block of columns at a time.
"""

from __future__ import annotations

import math

import numpy as np

from ..geometry import ConvGeometry
from ..precision import bias_view, store
from . import numpy_im2col, numpy_threads
from .numpy_convert import widened


def applies(g: ConvGeometry) -> bool:
    return g.pointwise


def _work(g: ConvGeometry, batch: int) -> int:
    """Multiply-adds of the call."""
    return batch * g.out_channels * math.prod(g.in_size) * (g.in_channels // g.groups)


def _tasks(g: ConvGeometry, batch: int, widen: bool) -> list[tuple[int, slice]]:
    """(image, positions) per task: whole images, or column blocks of one image when fp16 is
    widened or the result rounded (so no worker holds a whole fp32 image)."""
    p = math.prod(g.in_size)
    most = max(1, numpy_im2col.COLUMN_BYTES // (16 * max(g.in_channels, g.out_channels)))
    step = numpy_im2col.even_block_size(p, most) if widen else p  # equal shares per worker
    return [(b, slice(i, min(p, i + step))) for b in range(batch) for i in range(0, p, step)]


def forward(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, acc, bias=None):
    """out (B, O, *S) = w applied at every position of x (B, C, *S) (+ bias (O,)), accumulated
    in ``acc``; ``out`` may be strided (a phase of backward_data) or narrower than ``acc``."""
    groups = g.groups
    og, cg = g.out_channels // groups, g.in_channels // groups
    wg = w.reshape(groups, og, cg).astype(acc, copy=False)  # (O, Cg, 1..) -> (G, Og, Cg)
    bg = None if bias is None else bias.reshape(groups, og, 1)  # (O,) -> (G, Og, 1)
    flat = out.flags.c_contiguous

    def work(task, _scratch) -> None:
        b, cols = task
        xb = widened(x[b].reshape(groups, cg, -1)[..., cols], acc)  # (G, Cg, p)
        if not flat:  # a strided view (a phase of backward_data), one task per image
            part = None if bias is None else bias_view(bias, out.ndim - 1, 0)
            store(np.matmul(wg, xb).reshape(out.shape[1:]), out[b], part)
            return
        dest = out[b].reshape(groups, og, -1)[..., cols]  # out[b] (O, *S) -> (G, Og, p)
        if out.dtype == acc:  # straight into out
            store(np.matmul(wg, xb, out=dest), dest, bg)
        else:  # rounded once, block by block
            store(np.matmul(wg, xb), dest, bg)

    widen = flat and (x.dtype != acc or out.dtype != acc)
    numpy_threads.run(_tasks(g, x.shape[0], widen), work, lambda: None, _work(g, x.shape[0]))


def filter_grad(dy: np.ndarray, x: np.ndarray, g: ConvGeometry, dtype) -> np.ndarray:
    """dW (O, Cg, 1, ..) summed over images, each worker into its own (G, Og, Cg) sum."""
    groups = g.groups
    og, cg = g.out_channels // groups, g.in_channels // groups

    def work(task, dw: np.ndarray) -> None:
        b, cols = task
        dyb = widened(dy[b].reshape(groups, og, -1)[..., cols], dtype)  # (G, Og, p)
        xb = widened(x[b].reshape(groups, cg, -1)[..., cols], dtype)  # (G, Cg, p)
        dw += np.matmul(dyb, xb.swapaxes(1, 2))

    tasks = _tasks(g, x.shape[0], widen=x.dtype != dtype or dy.dtype != dtype)
    zero = lambda: np.zeros((groups, og, cg), dtype)  # noqa: E731 - one worker's sum
    sums = numpy_threads.run(tasks, work, zero, _work(g, x.shape[0]), sums=True)
    dw = sums[0]
    for other in sums[1:]:
        dw += other
    return dw.reshape(g.out_channels, cg, *g.kernel_size)  # (G, Og, Cg) -> (O, Cg, 1, ..)
