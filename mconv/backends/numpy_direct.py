"""Direct convolutions on the CPU: register-blocked kernels in LLVM IR (``numpy_llvm``), for
float32 sums of convs with non-negative padding (``numpy_backend`` picks them after the
depthwise, pointwise and Winograd paths). Convs with MIN_CHANNELS or more output channels
per group go to ``numpy_channels`` (vectors along the output channels); this module runs
the others, with vectors along a row, and holds the entry points of both.

im2col serves such convs badly: with Cg = 8 input and Og = 8 output channels
per group (ResNeXt), each group's GEMM is ``(P, K*Cg) @ (K*Cg, 8)``, and
building the columns moves more bytes than the GEMM multiplies. Here no
columns are built: each task pads its input into flat phase planes
(``numpy_direct_plan``, ``numpy_planes``: every tap of a run of outputs along
the last axis reads a contiguous run), and the kernel computes, for a block of
``ob`` output channels and ``pv`` vectors of 8 consecutive outputs of one row,

    acc[o][v] = bias[o] + sum over c < Cg, taps t of  w[o, c, t] * run(c, t, v)

with the ``ob x pv`` accumulators in vector registers: each loaded run is
used ``ob`` times and each broadcast weight ``pv`` times. Every rank, stride,
dilation and non-negative padding fits: rows are the output's leading axes
(``rowbase``), taps are flat offsets into the planes (``tapoff``). A partial
block at a row's end computes 8*pv lanes and stores the valid ones (its
extra lanes read the next row or the zero tail of the planes), so rows
narrower than MIN_WIDTH stay on im2col.

The weight gradient reads the same planes: for a block of ``ob`` output and
``cb`` input channels and one tap, ``ob x cb`` vector sums of dy times the
tap's runs over the image's rows, then added into dW (per worker; the
workers' sums are added in a fixed order, so results repeat bit for bit).

Sums are float32, one fused multiply-add at a time: plain sums, so the path
also serves ``set_algorithm('exact')``. float16 stays float16 in the planes
and in dy, widened as the kernels load it, and a float16 result is rounded
once as the kernel stores it. The IR is in ``numpy_direct_ir``.
"""

from __future__ import annotations

import math

import numpy as np

from ..geometry import ConvGeometry
from ..precision import bias_view, store
from . import numpy_channels, numpy_llvm, numpy_threads
from .numpy_convert import copy_into
from .numpy_direct_ir import VW
from .numpy_direct_plan import Plan, Scratch, in_place, io_dtype, kernel, packed, runs_here

MAX_GROUP_CHANNELS = 128  # Cg above this: the GEMM of im2col is the better tool
MAX_GROUP_BYTES = 1 << 20  # a group's padded input: beyond the L2 cache, each block re-reads it
MIN_WIDTH = 14  # narrower output rows leave lanes and registers idle (7x7: 1.7x im2col's time)


def _divisor(n: int, most: int = 4) -> int:
    """The channels of a block: 4, 3, 2 or 1 (at most ``most``), whichever divides ``n``
    first."""
    return next(d for d in (4, 3, 2, 1) if n % d == 0 and d <= most)


def _blocking(g: ConvGeometry) -> tuple[int, int]:
    """(ob, pv): output channels and vectors per forward block, within the host's vector
    registers (ob * pv accumulators, pv loaded runs and a broadcast weight): up to 4 vectors
    along a row, and as many output channels as the rest of the registers hold (a row of 14
    outputs: 2 vectors, so 8 channels; the ResNeXt layer at 14x14 with 16 channels per group
    took 4.5 ms so, 8.1 ms with 4 channels)."""
    budget = 16 if numpy_llvm.vector_registers() >= 32 else 8
    pv = max(1, min(4, budget // 4, -(-g.out_size[-1] // VW)))
    og = g.out_channels // g.groups
    ob = next(d for d in (16, 8, 4, 3, 2, 1) if og % d == 0 and d * pv <= budget)
    return ob, pv


def _grad_blocking(g: ConvGeometry) -> tuple[int, int]:
    """(ob, cb): output and input channels per weight-gradient block (ob * cb sums and ob + cb
    loaded vectors; 16 registers: at most 2 x 4)."""
    most = 4 if numpy_llvm.vector_registers() >= 32 else 2
    return _divisor(g.out_channels // g.groups, most), _divisor(g.in_channels // g.groups)


def _fits(g: ConvGeometry, x: np.ndarray) -> bool:
    """At most MAX_GROUP_CHANNELS input channels per group whose padded input fits
    MAX_GROUP_BYTES, rows of MIN_WIDTH or more, and what every direct kernel needs
    (``runs_here``)."""
    cg = g.in_channels // g.groups
    return (
        cg <= MAX_GROUP_CHANNELS
        and 4 * cg * math.prod(g.padded_size) <= MAX_GROUP_BYTES
        and g.out_size[-1] >= MIN_WIDTH
        and runs_here(g, x)
    )


def applies(g: ConvGeometry, x: np.ndarray, out: np.ndarray) -> bool:
    """Whether :func:`forward` runs ``g`` here: ``numpy_channels.applies`` where it takes
    ``g``; else :func:`_fits` and the row-vector kernel compiles. A depthwise conv (one input
    and one output channel per group) only when the result is written in place: through a
    buffer, numba's taps (``numpy_depthwise``) are faster (stride-2 input gradient phases:
    7.8 vs 4.6 ms)."""
    if numpy_channels.takes(g):
        return numpy_channels.applies(g, x, out)
    depthwise = g.in_channels == g.out_channels == g.groups
    return (
        _fits(g, x)
        and (not depthwise or in_place(out))
        and kernel("forward", _blocking(g), x.dtype, io_dtype(out)) is not None
    )


def applies_to_filter_grad(g: ConvGeometry, dy: np.ndarray, x: np.ndarray) -> bool:
    """As :func:`applies`, for the weight gradient (depthwise: numpy_depthwise's)."""
    if g.groups == max(g.in_channels, g.out_channels):
        return False
    if numpy_channels.takes(g):
        return numpy_channels.applies_to_filter_grad(g, dy, x)
    return (
        _fits(g, x) and kernel("filter_grad", _grad_blocking(g), x.dtype, io_dtype(dy)) is not None
    )


def forward(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, bias=None):
    """out (B, O, *Q) = conv of x (B, C, *S) with w (O, Cg, *k) (+ bias (O,)), summed in
    float32 and rounded once into ``out``."""
    if numpy_channels.takes(g):
        return numpy_channels.forward(x, w, g, out, bias)
    ob, pv = _blocking(g)
    plan = Plan(g, x.shape[0], VW * pv)
    written_in_place = in_place(out)  # else through float32 buffers
    function = kernel("forward", (ob, pv), x.dtype, io_dtype(out))
    cg, og, wout = plan.cg, plan.og, plan.wout
    wk = packed(w, g, og // ob, ob)
    bk = None if bias is None else np.ascontiguousarray(bias, np.float32)

    def work(task, scratch: Scratch) -> None:
        b, g0, g1, a0, a1 = task
        flat = plan.pad(x, task, scratch)
        dest, n = out[b, g0 * og : g1 * og], (g1 - g0) * og

        def run(address: int, first: int, rows: int, ycs: int, with_bias: bool) -> None:
            function(flat.ctypes.data, wk[g0:g1].ctypes.data, address,
                     bk[g0 * og :].ctypes.data if with_bias else None, g1 - g0, cg, og // ob,
                     plan.length, plan.rowbase[(first - a0) * plan.per :].ctypes.data, rows,
                     plan.planes.offsets.ctypes.data, plan.taps, wout, ycs, wout,
                     int(with_bias))  # fmt: skip

        if written_in_place:  # rows a0..a1 of each channel, bias added in the kernel
            start = dest.ctypes.data + out.itemsize * a0 * plan.per * wout
            run(start, a0, (a1 - a0) * plan.per, plan.rows * wout, bias is not None)
            return
        part = None if bias is None else bias_view(bk[g0 * og : g1 * og], g.ndim + 1, 0)
        for where, rows, res in plan.chunks(a0, a1, n, scratch):  # a buffer, rounded into out
            run(res.ctypes.data, where.start, rows, rows * wout, False)
            store(res, plan.first_axis(dest, where), part)

    numpy_threads.run(plan.tasks, work, lambda: plan.scratch(x.dtype), plan.work)


def filter_grad(dy: np.ndarray, x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """dW (O, Cg, *k) = sum over images and outputs of dy (B, O, *Q) times x's windows, in
    float32."""
    if numpy_channels.takes(g):
        return numpy_channels.filter_grad(dy, x, g)
    ob, cb = _grad_blocking(g)
    plan = Plan(g, x.shape[0], VW)
    dy_in_place = in_place(dy)  # else through float32 buffers
    function = kernel("filter_grad", (ob, cb), x.dtype, io_dtype(dy))
    cg, og, wout = plan.cg, plan.og, plan.wout

    def work(task, scratch: Scratch) -> None:
        b, g0, g1, a0, a1 = task
        flat = plan.pad(x, task, scratch)
        src, n = dy[b, g0 * og : g1 * og], (g1 - g0) * og

        def run(address: int, first: int, rows: int, dycs: int) -> None:
            function(flat.ctypes.data, address, scratch.dw[g0 * og :].ctypes.data, g1 - g0, cg,
                     og, plan.length, plan.rowbase[(first - a0) * plan.per :].ctypes.data, rows,
                     plan.planes.offsets.ctypes.data, plan.taps, wout, dycs)  # fmt: skip

        if dy_in_place:
            start = src.ctypes.data + dy.itemsize * a0 * plan.per * wout
            run(start, a0, (a1 - a0) * plan.per, plan.rows * wout)
            return
        for where, rows, buffer in plan.chunks(a0, a1, n, scratch):  # dy as float32
            copy_into(buffer, plan.first_axis(src, where))
            run(buffer.ctypes.data, where.start, rows, rows * wout)

    shape = (g.out_channels, cg, plan.taps)
    sums = numpy_threads.run(plan.tasks, work, lambda: plan.scratch(x.dtype, dw=shape), plan.work,
                             sums=True)  # fmt: skip
    dw = sums[0].dw
    for other in sums[1:]:
        dw += other.dw
    return dw.reshape(g.out_channels, cg, *g.kernel_size)
