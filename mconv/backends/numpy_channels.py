"""Direct convolutions with vectors along the output channels: the kernels of
``numpy_channels_ir`` for convs with MIN_CHANNELS or more output channels per group (dense
ones with 16-512 channels, wide groups, backward_data's stride phases of these), which
``numpy_direct`` hands over.

Per (input channel, tap) the forward kernel loads ``nv`` vectors of ``lanes`` output
channels' weights and broadcasts ``pix`` input values, one per output position:

    acc[k][p] += w[c, t, k*lanes : (k+1)*lanes] * x[c, pixbase[p] + tapoff[t]]

A block's positions may span rows, so no lane idles at a row's end (7x7 layers run as
well as 56x56 ones), and results go straight into any strided view (``pixout``): the
phases of backward_data write every other element of dx in place. On one core of the
development VM (Zen 4) it runs dense 3x3 layers with 64-512 channels at 100-112 GFLOP/s
against oneDNN's 110-116. The weight gradient swaps the roles: vectors of dy's output
channels (dy transposed per piece of positions by the pack kernel) times broadcast input
values, ``nv`` x ``rb`` sums of (channel, tap) pairs over the positions.

Plain float32 sums, one fused multiply-add at a time (``set_algorithm('exact')`` keeps
them); float16 input is widened into the float32 planes as they are padded (the kernels
then run as fast as for float32), and a float16 result is rounded once as stored.
"""

from __future__ import annotations

import math

import numpy as np

from ..geometry import ConvGeometry
from . import numpy_llvm, numpy_threads
from .numpy_direct_plan import ELEMENT, Plan, Scratch, in_place, kernel, packed, runs_here

MIN_CHANNELS = 16  # output channels per group from which these kernels run (8: row vectors
# took 0.4 ms per ResNeXt image, these 0.55)
MAX_SLAB_BYTES = 16 << 20  # a group's smallest slab of padded input (1-d: all of it)
DY_BYTES = 256 << 10  # a block of channels' transposed dy: re-read per (channel, tap) block


def takes(g: ConvGeometry) -> bool:
    """Whether ``g`` has the output channels per group these kernels are for."""
    return g.out_channels // g.groups >= MIN_CHANNELS


def blocking(g: ConvGeometry) -> tuple[int, int, int]:
    """(nv, pix, lanes): nv vectors of ``lanes`` output channels (16 with AVX-512, else 8;
    nv: the fewest padded channels, then the most vectors, at most 4, or 2 with 16
    registers) by ``pix`` positions (dW: (channel, tap) pairs); nv * pix accumulators.
    Forward on one core, GFLOP/s for c256 14x14 and c64 56x56: 4 x 4 112 and 106, 4 x 6
    112 and 108, 2 x 12 97 and 95 (pointers spilled), torch 116 and 112."""
    lanes, most = (16, 4) if numpy_llvm.vector_registers() >= 32 else (8, 2)
    og = g.out_channels // g.groups
    nv = min(range(1, most + 1), key=lambda n: (-(-og // (n * lanes)) * n, -n))
    return nv, {4: 4, 3: 5}.get(nv, 6), lanes


def _fits(g: ConvGeometry, x: np.ndarray) -> bool:
    """A group's smallest slab (1-d: its padded input) within MAX_SLAB_BYTES, and what every
    direct kernel needs (``runs_here``)."""
    rows = (g.kernel_size[0] - 1) * g.dilation[0] + 1 if g.ndim > 1 else g.padded_size[0]
    slab = 4 * (g.in_channels // g.groups) * rows * math.prod(g.padded_size[1:])
    return slab <= MAX_SLAB_BYTES and runs_here(g, x)


def applies(g: ConvGeometry, x: np.ndarray, out: np.ndarray) -> bool:
    """The forward kernel fits and compiles here, and writes ``out`` (float32 or float16;
    any strides)."""
    return (
        _fits(g, x)
        and out.dtype in ELEMENT
        and all(s % out.itemsize == 0 for s in out.strides)
        and kernel("forward_channels", blocking(g), out.dtype) is not None
    )


def applies_to_filter_grad(g: ConvGeometry, dy: np.ndarray, x: np.ndarray) -> bool:
    """The weight-gradient kernel (and the pack kernel for dy) fit and compile here."""
    dtype = dy.dtype if dy.dtype in ELEMENT else np.float32
    return (
        _fits(g, x)
        and kernel("filter_grad_channels", blocking(g)) is not None
        and kernel("pack", (), dtype) is not None
    )


def forward(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, bias=None):
    """out (B, O, *Q) = conv of x (B, C, *S) with w (O, Cg, *k) (+ bias (O,)), summed in
    float32 and rounded once into ``out`` (any strides) by the kernel."""
    nv, _, lanes = blocks = blocking(g)
    ob = nv * lanes
    plan = Plan(g, x.shape[0], 1)
    function = kernel("forward_channels", blocks, out.dtype)
    cg, og, wout = plan.cg, plan.og, plan.wout
    nblk = -(-og // ob)  # blocks per group; the last one's missing channels are zeros
    wk = packed(w, g, nblk, ob)
    if bias is not None:  # (O,) -> (G, Og) -> (G, nblk*ob): padded as the weight is
        padded = np.zeros((g.groups, nblk * ob), np.float32)
        padded[:, :og] = np.asarray(bias, np.float32).reshape(g.groups, og)
    # pixout[p]: where output p (C order over Q) sits in an output channel, in elements
    steps = np.array(out.strides[2:], np.int64) // out.itemsize
    pixout = np.ascontiguousarray(steps @ np.indices(g.out_size).reshape(g.ndim, -1), np.int64)
    ycs = out.strides[1] // out.itemsize

    def work(task, scratch: Scratch) -> None:
        b, g0, g1, a0, a1 = task
        flat = plan.pad(x, task, scratch)
        first = a0 * plan.per * wout  # the task's first output position
        function(flat.ctypes.data, wk[g0:g1].ctypes.data, out[b, g0 * og].ctypes.data,
                 None if bias is None else padded[g0:].ctypes.data, g1 - g0, cg, nblk, og,
                 plan.length, plan.pixbase.ctypes.data, pixout[first:].ctypes.data,
                 (a1 - a0) * plan.per * wout, plan.planes.offsets.ctypes.data, plan.taps, ycs,
                 int(bias is not None))  # fmt: skip

    numpy_threads.run(plan.tasks, work, lambda: plan.scratch(np.float32), plan.work)


def filter_grad(dy: np.ndarray, x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """dW (O, Cg, *k) = sum over images and outputs of dy (B, O, *Q) times x's windows, in
    float32: per task, dy's positions in pieces, each transposed to (G, nblk, positions, ob)
    floats by the pack kernel, then summed into the worker's (G, nblk, Cg*K, ob) dW."""
    nv, rb, lanes = blocks = blocking(g)
    ob = nv * lanes
    plan = Plan(g, x.shape[0], 1)
    cg, og, wout, taps = plan.cg, plan.og, plan.wout, plan.taps
    nblk, nj = -(-og // ob), cg * taps
    function = kernel("filter_grad_channels", blocks)
    if not in_place(dy):  # the pack kernel reads C-ordered images of float32 or float16
        dy = np.ascontiguousarray(dy, dy.dtype if dy.dtype in ELEMENT else np.float32)
    pack = kernel("pack", (), dy.dtype)
    # joff[j]: where (channel c, tap t), j = c * taps + t, reads in a group's planes
    joff = (np.arange(cg, dtype=np.int64)[:, None] * plan.length + plan.planes.offsets).ravel()
    piece = max(rb, DY_BYTES // (4 * ob))  # positions per piece
    total = plan.rows * wout  # positions per channel of dy

    def scratch() -> Scratch:  # dW's sum, and a buffer for the largest piece of dy
        made = plan.scratch(np.float32, dw=(g.groups, nblk, nj, ob))
        made.buffer = np.empty(plan.block * nblk * piece * ob, np.float32)
        return made

    def work(task, scratch: Scratch) -> None:
        b, g0, g1, a0, a1 = task
        flat = plan.pad(x, task, scratch)
        src = dy[b, g0 * og : g1 * og]
        first, last = a0 * plan.per * wout, a1 * plan.per * wout
        for p0 in range(first, last, piece):
            n = min(piece, last - p0)
            dyt = scratch.buffer[: (g1 - g0) * nblk * n * ob]
            pack(src.ctypes.data + dy.itemsize * p0, dyt.ctypes.data, g1 - g0, og, nblk, ob, n,
                 total)  # fmt: skip
            function(flat.ctypes.data, dyt.ctypes.data, scratch.dw[g0:].ctypes.data, g1 - g0, cg,
                     nblk, plan.length, plan.pixbase[p0 - first :].ctypes.data, n,
                     joff.ctypes.data, nj)  # fmt: skip

    sums = numpy_threads.run(plan.tasks, work, scratch, plan.work, sums=True)
    dw = sums[0].dw
    for other in sums[1:]:
        dw += other.dw
    # (G, nblk, Cg*K, ob) -> (G, nblk, ob, Cg*K) -> (G, nblk*ob, Cg*K), each group's real Og
    dw = dw.transpose(0, 1, 3, 2).reshape(g.groups, nblk * ob, nj)[:, :og]
    return np.ascontiguousarray(dw).reshape(g.out_channels, cg, *g.kernel_size)
