"""Convolutions with few input channels per group (grouped, and dense ones with up to
128 channels) on the CPU: a direct, register-blocked kernel in LLVM IR (``numpy_llvm``).

im2col serves such convs badly: with Cg = 8 input and Og = 8 output channels
per group (ResNeXt), each group's GEMM is ``(P, K*Cg) @ (K*Cg, 8)``, and
building the columns moves more bytes than the GEMM multiplies; a dense conv
with 3 to 128 input channels still moves K columns per input value. Here no
columns are built. Per task (one image, a range of groups, a range of output
rows where there are fewer images than workers), the input channels are
zero-padded into flat phase planes (``numpy_planes``: every tap of a run of
outputs along the last axis reads a contiguous run), and the kernel
computes, for a block of ``ob`` output channels and ``pv`` vectors of 8
consecutive outputs of one row,

    acc[o][v] = bias[o] + sum over c < Cg, taps t of  w[o, c, t] * run(c, t, v)

with the ``ob x pv`` accumulators in vector registers: each loaded run is
used ``ob`` times and each broadcast weight ``pv`` times. Every rank, stride,
dilation and non-negative padding fits: rows are the output's leading axes
(``rowbase``), taps are flat offsets into the planes (``tapoff``). A partial
block at a row's end computes 8*pv lanes and stores the valid ones (its
extra lanes read the next row or the zero tail of the planes).

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

import ctypes
import math

import numpy as np

from ..geometry import ConvGeometry
from ..precision import bias_view, store
from . import numpy_direct_ir, numpy_llvm, numpy_planes, numpy_threads
from .numpy_convert import copy_into
from .numpy_direct_ir import VW

_TASK_BYTES = 4 << 20  # padded input of a task: stays in the L2/L3 cache
MAX_GROUP_CHANNELS = 128  # Cg above this: the GEMM of im2col is the better tool
MAX_GROUP_BYTES = 1 << 20  # a group's padded input: beyond the L2 cache, each block re-reads it
MIN_WIDTH = 14  # narrower output rows leave lanes and registers idle (7x7: 1.7x im2col's time)
_CHUNK_BYTES = 1 << 20  # float32 results (or dy) of a task not used in place: in pieces of this
_P, _I = ctypes.c_void_p, ctypes.c_int64
_ARGS = {  # the kernels' C signatures (see numpy_direct_ir)
    "forward": [_P, _P, _P, _P, _I, _I, _I, _I, _P, _I, _P, _I, _I, _I, _I, _I],
    "filter_grad": [_P, _P, _P, _I, _I, _I, _I, _P, _I, _P, _I, _I, _I],
}
_kernels: dict[tuple, numpy_llvm.Kernel] = {}


def _divisor(n: int) -> int:
    """The channels of a block: 4, 3, 2 or 1, whichever divides ``n`` first."""
    return next(d for d in (4, 3, 2, 1) if n % d == 0)


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
    ob, cb = _divisor(g.out_channels // g.groups), _divisor(g.in_channels // g.groups)
    return (ob, cb) if numpy_llvm.vector_registers() >= 32 else (min(ob, 2), cb)


_ELEMENT = {np.dtype(np.float32): "float", np.dtype(np.float16): "half"}


def _kernel(kind: str, a: int, b: int, *dtypes):
    """The compiled kernel (``kind`` 'forward' or 'filter_grad', blocked a x b, reading and
    writing arrays of ``dtypes``: float32 where not given), or None."""
    types = tuple(_ELEMENT[np.dtype(t)] for t in dtypes)
    key = (kind, a, b, *types)
    if key not in _kernels:  # setdefault: workers asking at once share one Kernel (and code)
        ir = getattr(numpy_direct_ir, kind)(a, b, *types)
        name = "_".join(("direct", kind, f"{a}x{b}", *(t for t in types if t != "float")))
        _kernels.setdefault(key, numpy_llvm.Kernel(name, ir, _ARGS[kind]))
    return _kernels[key].function()


def in_place(array: np.ndarray) -> bool:
    """Whether a kernel uses ``array`` as it is (float32 or float16, each image C-ordered;
    the images share their strides, so the first tells): the forward writes into it, the
    weight gradient reads dy from it; otherwise through a float32 buffer."""
    return array.dtype in _ELEMENT and (len(array) == 0 or array[0].flags.c_contiguous)


def _io_dtype(array: np.ndarray) -> np.dtype:
    """The dtype a kernel writes (out) or reads (dy) for ``array``: its own where it is used
    in place, else float32 (the buffers')."""
    return array.dtype if in_place(array) else np.dtype(np.float32)


def _fits(g: ConvGeometry, x: np.ndarray) -> bool:
    cg = g.in_channels // g.groups
    return (
        cg <= MAX_GROUP_CHANNELS
        and 4 * cg * math.prod(g.padded_size) <= MAX_GROUP_BYTES
        and g.out_size[-1] >= MIN_WIDTH
        and all(lo >= 0 and hi >= 0 for lo, hi in g.padding)
        and x.dtype in (np.float32, np.float16)
        and numpy_llvm.available()
    )


def applies(g: ConvGeometry, x: np.ndarray, out: np.ndarray) -> bool:
    """At most MAX_GROUP_CHANNELS input channels per group whose padded input fits
    MAX_GROUP_BYTES, output rows of MIN_WIDTH or more, non-negative padding, float32 sums,
    and the kernel compiles here. A depthwise conv (one input and one output channel per
    group) only when the result is written in place: through a buffer, numba's taps
    (``numpy_depthwise``) are faster (stride-2 input gradient phases: 7.8 vs 4.6 ms)."""
    depthwise = g.in_channels == g.out_channels == g.groups
    return (
        _fits(g, x)
        and (not depthwise or in_place(out))
        and _kernel("forward", *_blocking(g), x.dtype, _io_dtype(out)) is not None
    )


def applies_to_filter_grad(g: ConvGeometry, dy: np.ndarray, x: np.ndarray) -> bool:
    """As :func:`applies`, for the weight-gradient kernel (depthwise: numpy_depthwise's)."""
    return (
        g.groups < max(g.in_channels, g.out_channels)
        and _fits(g, x)
        and _kernel("filter_grad", *_grad_blocking(g), x.dtype, _io_dtype(dy)) is not None
    )


class _Plan:
    """The layout, tasks and kernel arguments shared by the tasks of one call."""

    def __init__(self, g: ConvGeometry, batch: int, block: int):
        self.g = g
        self.cg, self.og = g.in_channels // g.groups, g.out_channels // g.groups
        self.taps = math.prod(g.kernel_size)
        self.planes = numpy_planes.Planes(g, phased=any(s > 1 for s in g.stride))
        q = g.out_size
        # rowbase[r]: flat offset of output row r (its leading-axes index) in a channel's planes
        lead = np.indices(q[:-1]).reshape(g.ndim - 1, -1) if g.ndim > 1 else np.zeros((0, 1))
        plane = np.array(self.planes.plane[:-1], np.int64)
        self.rowbase = np.ascontiguousarray((plane[:, None] * lead).sum(0), np.int64)
        self.rows, self.wout = self.rowbase.size, q[-1]
        # the last float a block of ``block`` outputs reads: inside every channel's planes
        last = int(self.rowbase[-1] + self.planes.offsets.max()) + -(-self.wout // block) * block
        self.length = max(self.planes.phases * self.planes.size, last)  # floats per channel
        workers = numpy_threads.get_num_threads()
        groups = max(1, min(g.groups, _TASK_BYTES // (4 * self.length * self.cg)))
        per_image = -(-g.groups // groups)  # tasks per image: enough for the workers
        per_image = max(per_image, min(g.groups, -(-workers // batch)))
        self.block = -(-g.groups // per_image)  # groups per task, in blocks of even size
        # fewer tasks than workers (one image, dense): ranges of the first axis' indices too
        self.per = math.prod(q[1:-1])  # rows per index of the first axis (1-d: one row)
        lead = q[0] if g.ndim > 1 else 1
        step = -(-lead // min(lead, -(-workers // (batch * -(-g.groups // self.block)))))
        self.tasks = [(b, g0, min(g.groups, g0 + self.block), a, min(lead, a + step))
                      for b in range(batch) for g0 in range(0, g.groups, self.block)
                      for a in range(0, lead, step)]  # fmt: skip
        self.work = batch * g.out_channels * math.prod(q) * self.taps * self.cg

    def scratch(self, dtype, dw: bool = False) -> _Scratch:
        """A worker's: a task's planes in x's dtype (float16 is widened as the kernel loads
        it), and for the weight gradient its sum."""
        flat = np.zeros((self.block * self.cg, self.length), dtype)
        grad = np.zeros((self.g.out_channels, self.cg, self.taps), np.float32) if dw else None
        return _Scratch(flat, grad)

    def pad(self, x: np.ndarray, b: int, g0: int, g1: int, flat: np.ndarray) -> np.ndarray:
        """Image b's input channels of groups g0..g1 in the planes."""
        return self.planes.pad_into(x, b, slice(g0 * self.cg, g1 * self.cg), flat)

    def chunks(self, a0: int, a1: int, channels: int, scratch: _Scratch):
        """(first-axis range, its rows, a (channels, range, *Q[1:]) float32 buffer) pieces of
        the range a0..a1 whose buffers stay under _CHUNK_BYTES (where results or dy are not
        used in place); the worker's buffer, grown when a piece needs more."""
        step = max(1, _CHUNK_BYTES // (4 * channels * self.per * self.wout))
        need = channels * min(step, a1 - a0) * self.per * self.wout
        if scratch.buffer.size < need:
            scratch.buffer = np.empty(need, np.float32)
        buffer = scratch.buffer
        for c0 in range(a0, a1, step):
            c1 = min(a1, c0 + step)
            shape = (
                (channels, c1 - c0, *self.g.out_size[1:])
                if self.g.ndim > 1
                else (channels, self.wout)
            )
            yield slice(c0, c1), (c1 - c0) * self.per, buffer[: math.prod(shape)].reshape(shape)

    def first_axis(self, array: np.ndarray, part: slice) -> np.ndarray:
        """array (n, *Q) -> its indices ``part`` of the first spatial axis (1-d: all)."""
        return array[:, part] if self.g.ndim > 1 else array


class _Scratch:
    """A worker's planes, its float32 buffer (grown on demand) and, for dW, its sum."""

    def __init__(self, flat: np.ndarray, dw: np.ndarray | None):
        self.flat, self.buffer, self.dw = flat, np.empty(0, np.float32), dw


def forward(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, bias=None):
    """out (B, O, *Q) = conv of x (B, C, *S) with w (O, Cg, *k) (+ bias (O,)), summed in
    float32 and rounded once into ``out``."""
    ob, pv = _blocking(g)
    plan = _Plan(g, x.shape[0], VW * pv)
    written_in_place = in_place(out)  # else through float32 buffers
    function = _kernel("forward", ob, pv, x.dtype, _io_dtype(out))
    cg, og, wout = plan.cg, plan.og, plan.wout
    # w (O, Cg, *k) -> (G, Og/ob, ob, Cg, K) -> (G, Og/ob, Cg, K, ob): a block's weights in order
    wk = w.reshape(g.groups, og // ob, ob, cg, plan.taps).transpose(0, 1, 3, 4, 2)
    wk = np.ascontiguousarray(wk, np.float32)
    bk = None if bias is None else np.ascontiguousarray(bias, np.float32)

    def work(task, scratch: _Scratch) -> None:
        b, g0, g1, a0, a1 = task
        flat = plan.pad(x, b, g0, g1, scratch.flat)
        dest, n = out[b, g0 * og : g1 * og], (g1 - g0) * og

        def run(address: int, first: int, rows: int, ycs: int, with_bias: bool) -> None:
            function(flat.ctypes.data, wk[g0:g1].ctypes.data, address,
                     bk[g0 * og :].ctypes.data if with_bias else None, g1 - g0, cg, og // ob,
                     plan.length, plan.rowbase[first * plan.per :].ctypes.data, rows,
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
    ob, cb = _grad_blocking(g)
    plan = _Plan(g, x.shape[0], VW)
    dy_in_place = in_place(dy)  # else through float32 buffers
    function = _kernel("filter_grad", ob, cb, x.dtype, _io_dtype(dy))
    cg, og, wout = plan.cg, plan.og, plan.wout

    def work(task, scratch: _Scratch) -> None:
        b, g0, g1, a0, a1 = task
        flat = plan.pad(x, b, g0, g1, scratch.flat)
        src, n = dy[b, g0 * og : g1 * og], (g1 - g0) * og

        def run(address: int, first: int, rows: int, dycs: int) -> None:
            function(flat.ctypes.data, address, scratch.dw[g0 * og :].ctypes.data, g1 - g0, cg,
                     og, plan.length, plan.rowbase[first * plan.per :].ctypes.data, rows,
                     plan.planes.offsets.ctypes.data, plan.taps, wout, dycs)  # fmt: skip

        if dy_in_place:
            start = src.ctypes.data + dy.itemsize * a0 * plan.per * wout
            run(start, a0, (a1 - a0) * plan.per, plan.rows * wout)
            return
        for where, rows, buffer in plan.chunks(a0, a1, n, scratch):  # dy as float32
            copy_into(buffer, plan.first_axis(src, where))
            run(buffer.ctypes.data, where.start, rows, rows * wout)

    sums = numpy_threads.run(plan.tasks, work, lambda: plan.scratch(x.dtype, dw=True), plan.work,
                             sums=True)  # fmt: skip
    dw = sums[0].dw
    for other in sums[1:]:
        dw += other.dw
    return dw.reshape(g.out_channels, cg, *g.kernel_size)
