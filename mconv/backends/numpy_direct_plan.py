"""What the direct kernels (``numpy_direct``, ``numpy_channels``) share: the tasks of a call,
the slabs of padded input they read, the compiled kernels and the packed weight.

A task is one image's channels of a range of groups and a range of output indices of the
first spatial axis. It zero-pads the input into flat phase planes (``numpy_planes``): the
slab of the first axis that its outputs read, which is the whole padded image where one
group's fits TASK_BYTES, else a slab of at most SLAB_BYTES (so a worker holds at most that
much, and a large image is read slab by slab from the cache). Row and position offsets
(``rowbase``, ``pixbase``) are relative to a task's first output index.
"""

from __future__ import annotations

import ctypes
import math
import threading
from dataclasses import replace

import numpy as np

from ..geometry import ConvGeometry
from . import numpy_channels_ir, numpy_direct_ir, numpy_llvm, numpy_planes, numpy_threads

TASK_BYTES = 4 << 20  # padded input of a task: stays in the L2/L3 cache
SLAB_BYTES = 1 << 20  # where one group's padded image is larger: a slab of it per task
CHUNK_BYTES = 1 << 20  # float32 results (or dy) of a task not used in place: in pieces of this
ELEMENT = {np.dtype(np.float32): "float", np.dtype(np.float16): "half"}  # the kernels' types

_P, _I = ctypes.c_void_p, ctypes.c_int64
_KINDS = {  # kind: (IR of numpy_direct_ir / numpy_channels_ir, the kernel's C signature)
    "forward": (numpy_direct_ir.forward, [_P, _P, _P, _P] + [_I] * 4 + [_P, _I, _P] + [_I] * 5),
    "filter_grad": (numpy_direct_ir.filter_grad, [_P, _P, _P] + [_I] * 4 + [_P, _I, _P] + [_I] * 3),
    "forward_channels": (numpy_channels_ir.forward, [_P] * 4 + [_I] * 5 + [_P, _P, _I, _P] + [_I] * 3),
    "filter_grad_channels": (numpy_channels_ir.filter_grad, [_P] * 3 + [_I] * 4 + [_P, _I, _P, _I]),
    "pack": (numpy_channels_ir.pack, [_P, _P] + [_I] * 6),
}  # fmt: skip
_kernels: dict[tuple, numpy_llvm.Kernel] = {}
_reused = threading.local()  # per calling thread: the packed weight's memory, kept between calls


def kernel(kind: str, blocking: tuple[int, ...], *dtypes):
    """The compiled kernel of ``kind`` (a key of _KINDS) with its ``blocking`` (the IR's
    leading arguments), reading and writing arrays of ``dtypes`` (the IR's next ones), or
    None where it does not compile."""
    types = tuple(ELEMENT[np.dtype(t)] for t in dtypes)
    key = (kind, blocking, *types)
    if key not in _kernels:  # setdefault: workers asking at once share one Kernel (and code)
        ir, argtypes = _KINDS[kind]
        size = "x".join(map(str, blocking))
        name = "_".join(("direct", kind, size, *(t for t in types if t != "float")))
        _kernels.setdefault(key, numpy_llvm.Kernel(name, ir(*blocking, *types), argtypes))
    return _kernels[key].function()


def runs_here(g: ConvGeometry, x: np.ndarray) -> bool:
    """What every direct kernel needs: non-negative padding (no crop), input the kernels read
    (float32 or float16: float32 sums), and the IR kernels here (``numpy_llvm``)."""
    return (
        all(lo >= 0 and hi >= 0 for lo, hi in g.padding)
        and x.dtype in ELEMENT
        and numpy_llvm.available()
    )


def in_place(array: np.ndarray) -> bool:
    """Whether a kernel uses ``array`` as it is (float32 or float16, each image C-ordered;
    the images share their strides, so the first tells): the forward writes into it, the
    weight gradient reads dy from it; otherwise through a float32 buffer."""
    return array.dtype in ELEMENT and (len(array) == 0 or array[0].flags.c_contiguous)


def io_dtype(array: np.ndarray) -> np.dtype:
    """The dtype a kernel writes (out) or reads (dy) for ``array``: its own where it is used
    in place, else float32 (the buffers')."""
    return array.dtype if in_place(array) else np.dtype(np.float32)


def packed(w: np.ndarray, g: ConvGeometry, nblk: int, ob: int) -> np.ndarray:
    """w (O, Cg, *k) as the forward kernels read it: (G, nblk, Cg, K, ob) float32, each
    group's Og output channels zero-padded to nblk * ob; transposed by the pack kernel where
    ob is a multiple of 8. In memory this thread keeps between calls (fresh pages each call
    cost 1 ms for a c256 3x3 weight, 2.4 MB): valid until its next call."""
    cg, og, taps = g.in_channels // g.groups, g.out_channels // g.groups, math.prod(g.kernel_size)
    size = g.groups * nblk * cg * taps * ob
    if getattr(_reused, "weight", np.empty(0, np.float32)).size < size:
        _reused.weight = np.empty(size, np.float32)
    out = _reused.weight[:size].reshape(g.groups, nblk, cg, taps, ob)
    source = np.ascontiguousarray(w, w.dtype if w.dtype in ELEMENT else np.float32)
    function = kernel("pack", (), source.dtype) if ob % 8 == 0 else None
    if function is None:  # (G, nblk*ob, Cg*K) zero-padded -> (G, nblk, ob, Cg, K), transposed
        padded = np.zeros((g.groups, nblk * ob, cg * taps), np.float32)
        padded[:, :og] = source.reshape(g.groups, og, cg * taps)
        out[...] = padded.reshape(g.groups, nblk, ob, cg, taps).transpose(0, 1, 3, 4, 2)
    else:
        function(source.ctypes.data, out.ctypes.data, g.groups, og, nblk, ob, cg * taps,
                 cg * taps)  # fmt: skip
    return out


class Scratch:
    """A worker's planes (and the slab they hold), its float32 buffer (grown on demand) and,
    for dW, its sum."""

    def __init__(self, flat: np.ndarray, dw: np.ndarray | None):
        self.flat, self.buffer, self.dw = flat, np.empty(0, np.float32), dw
        self.start = None  # the first padded row of the slab in flat (None: all zeros)


class Plan:
    """The layout, tasks and kernel arguments shared by the tasks of one call; ``block``:
    outputs a kernel computes at a time along a row (it may read that far)."""

    def __init__(self, g: ConvGeometry, batch: int, block: int):
        self.g = g
        self.cg, self.og = g.in_channels // g.groups, g.out_channels // g.groups
        self.taps = math.prod(g.kernel_size)
        q, phased = g.out_size, any(s > 1 for s in g.stride)
        workers = numpy_threads.get_num_threads()
        lead = q[0] if g.ndim > 1 else 1  # the first axis' output indices (1-d: one row)
        step = _slab_step(g) if g.ndim > 1 else 1
        slab = self._slab(step).padded_size if g.ndim > 1 else g.padded_size  # of one channel
        groups = max(1, min(g.groups, TASK_BYTES // (4 * self.cg * math.prod(slab))))
        per_image = -(-g.groups // groups)  # tasks per image: enough for the workers
        per_image = max(per_image, min(g.groups, -(-workers // batch)))
        self.block = -(-g.groups // per_image)  # groups per task, in blocks of even size
        # fewer tasks than workers (one image, dense): ranges of the first axis' indices too
        per_image = -(-g.groups // self.block)
        step = min(step, -(-lead // min(lead, -(-workers // (batch * per_image)))))
        self.tasks = [(b, g0, min(g.groups, g0 + self.block), a, min(lead, a + step))
                      for b in range(batch) for g0 in range(0, g.groups, self.block)
                      for a in range(0, lead, step)]  # fmt: skip
        layout = self._slab(step) if g.ndim > 1 else g  # 1-d: the row is the first axis
        self.planes = numpy_planes.Planes(layout, phased, source=g)
        # rowbase[r]: flat offset of the task's output row r (leading-axes index) in its planes
        self.per = math.prod(q[1:-1])  # rows per index of the first axis (1-d: one row)
        if g.ndim > 1:  # (ndim - 1, a task's rows): each row's leading-axes indices
            rows = np.indices((step, *q[1:-1])).reshape(g.ndim - 1, -1)
        else:  # 1-d: one row, no leading axes
            rows = np.zeros((0, 1), np.int64)
        plane = np.array(self.planes.plane[:-1], np.int64)
        self.rowbase = np.ascontiguousarray((plane[:, None] * rows).sum(0), np.int64)
        self.rows, self.wout = lead * self.per, q[-1]  # output rows of an image; their width
        # pixbase[p]: flat offset of the task's output p (C order) in its planes
        self.pixbase = (self.rowbase[:, None] + np.arange(self.wout, dtype=np.int64)).ravel()
        # the last float a block of ``block`` outputs reads: inside every channel's planes
        last = int(self.rowbase[-1] + self.planes.offsets.max()) + -(-self.wout // block) * block
        self.length = max(self.planes.phases * self.planes.size, last)  # floats per channel
        self.work = batch * g.out_channels * math.prod(q) * self.taps * self.cg

    def _slab(self, step: int) -> ConvGeometry:
        """The geometry of the slab that ``step`` output indices of the first axis read: the
        padded rows from the first one's window to the last one's, no padding on that axis."""
        g = self.g
        rows = (step - 1) * g.stride[0] + (g.kernel_size[0] - 1) * g.dilation[0] + 1
        return replace(g, in_size=(rows, *g.in_size[1:]), out_size=(step, *g.out_size[1:]),
                       padding=((0, 0), *g.padding[1:]))  # fmt: skip

    def scratch(self, dtype, dw: tuple[int, ...] | None = None) -> Scratch:
        """A worker's: a task's planes in ``dtype`` (float16 is widened as the row kernels
        load it), and for a weight gradient its float32 sum of shape ``dw``."""
        flat = np.zeros((self.block * self.cg, self.length), dtype)
        return Scratch(flat, None if dw is None else np.zeros(dw, np.float32))

    def pad(self, x: np.ndarray, task, scratch: Scratch) -> np.ndarray:
        """The input channels of ``task``'s groups of its image in its planes: the slab its
        outputs read."""
        b, g0, g1, a0, _ = task
        start = a0 * self.g.stride[0] if self.g.ndim > 1 else 0
        if scratch.start not in (None, start) and not self.planes.fills(start):
            scratch.flat[...] = 0  # rows another slab filled may be this one's padding
        scratch.start = start
        return self.planes.pad_into(x, b, slice(g0 * self.cg, g1 * self.cg), scratch.flat, start)

    def chunks(self, a0: int, a1: int, channels: int, scratch: Scratch):
        """(first-axis range, its rows, a (channels, range, *Q[1:]) float32 buffer) pieces of
        the range a0..a1 whose buffers stay under CHUNK_BYTES (where results or dy are not
        used in place); the worker's buffer, grown when a piece needs more."""
        step = max(1, CHUNK_BYTES // (4 * channels * self.per * self.wout))
        need = channels * min(step, a1 - a0) * self.per * self.wout
        if scratch.buffer.size < need:
            scratch.buffer = np.empty(need, np.float32)
        for c0 in range(a0, a1, step):
            c1 = min(a1, c0 + step)
            shape = (
                (channels, c1 - c0, *self.g.out_size[1:])
                if self.g.ndim > 1
                else (channels, self.wout)
            )
            yield (
                slice(c0, c1),
                (c1 - c0) * self.per,
                scratch.buffer[: math.prod(shape)].reshape(shape),
            )

    def first_axis(self, array: np.ndarray, part: slice) -> np.ndarray:
        """array (n, *Q) -> its indices ``part`` of the first spatial axis (1-d: all)."""
        return array[:, part] if self.g.ndim > 1 else array


def _slab_step(g: ConvGeometry) -> int:
    """Output indices of the first axis per task: all, where one group's whole padded image
    fits TASK_BYTES; else as many as keep a group's slab within SLAB_BYTES."""
    row = 4 * (g.in_channels // g.groups) * math.prod(g.padded_size[1:])  # a padded row's bytes
    if row * g.padded_size[0] <= TASK_BYTES:
        return g.out_size[0]
    span, s = (g.kernel_size[0] - 1) * g.dilation[0] + 1, g.stride[0]
    return max(1, min(g.out_size[0], (SLAB_BYTES // row - span) // s + 1))
