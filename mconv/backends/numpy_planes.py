"""Where a conv's taps read: each channel's zero-padded input as flat phase planes.

With stride 1 the taps of output position q read the padded input at
``q + i*dilation`` (per axis): tap i is a shift by a fixed flat offset, so a
run of consecutive outputs along the last axis reads a contiguous run.
With a stride, the padded plane is split into ``prod(stride)`` phase planes
(index u of phase r along an axis holds padded index ``u*s + r``): tap i
then reads phase ``(i*d) % s`` at a shift of ``(i*d) // s``, a stride-1 run
again, and output q sits at index q of every phase plane. The direct kernels
(depthwise, grouped) read these planes; nothing else is copied.
"""

from __future__ import annotations

import math

import numpy as np

from ..geometry import ConvGeometry
from .numpy_convert import copy_into


class Planes:
    """The flat layout of one channel: ``phases`` planes of shape ``phase`` (C order), each
    ``size`` elements, one after the other; ``plane`` holds a plane's flat strides and
    ``offsets`` the flat offset each tap (C order) reads from, relative to the output's.
    ``phased=False`` keeps one plane, the padded input (then the offsets hold for stride 1).

    ``source``: the conv whose input is copied in, where ``g`` lays out a slab of it (the
    padded rows of the first axis that some outputs read: ``g`` has that many input rows and
    no padding on the first axis; see :meth:`pad_into`'s ``start``)."""

    def __init__(self, g: ConvGeometry, phased: bool, source: ConvGeometry | None = None):
        self.g, self.source = g, source or g
        self.steps = tuple(g.stride) if phased else (1,) * g.ndim
        self.phase = tuple(-(-p // s) for p, s in zip(g.padded_size, self.steps))
        self.phases = math.prod(self.steps)
        self.size = math.prod(self.phase)
        self.plane = tuple(math.prod(self.phase[j + 1 :]) for j in range(g.ndim))
        self.offsets = np.array(
            [
                np.ravel_multi_index([i * d % s for i, d, s in zip(tap, g.dilation, self.steps)],
                                     self.steps) * self.size
                + sum(i * d // s * p for i, d, s, p in zip(tap, g.dilation, self.steps, self.plane))
                for tap in np.ndindex(*g.kernel_size)
            ],
            np.int64,
        )  # fmt: skip

    def pad_into(
        self, x: np.ndarray, b: int, chans: slice, flat: np.ndarray, start: int = 0
    ) -> np.ndarray:
        """``flat[:cb]`` (cb, >= phases * size): channels ``chans`` of image b, zero-padded, in
        the planes (cast to flat's dtype); a slab from padded row ``start`` of the first axis
        (a multiple of its stride). Only the places the input lands are written: the rest
        must be zero already (a scratch allocated with zeros stays so, as long as each copy
        writes the places the one before it did, or more: see :meth:`fills`)."""
        g, cb = self.source, chans.stop - chans.start
        flat = flat[:cb]
        los = (g.padding[0][0] - start, *(lo for lo, _ in g.padding[1:]))
        for pid, phase in enumerate(np.ndindex(*self.steps)):
            plane = flat[:, pid * self.size : (pid + 1) * self.size].reshape(cb, *self.phase)
            dest, src = [slice(None)], [b, chans]
            for r, s, n, lo, u_end in zip(phase, self.steps, g.in_size, los, self.phase):
                u0 = max(0, -((r - lo) // s))  # first index u whose input u*s + r - lo >= 0
                i0 = u0 * s + r - lo
                count = max(0, min(u_end - u0, -(-(n - i0) // s)))
                dest.append(slice(u0, u0 + count))
                src.append(slice(i0, i0 + s * (count - 1) + 1 if count else i0, s))
            copy_into(plane[tuple(dest)], x[tuple(src)])
        return flat

    def fills(self, start: int) -> bool:
        """Whether the slab from padded row ``start`` holds input in every row of the first
        axis (no padding: it overwrites whatever a slab before it left there)."""
        lo, n = self.source.padding[0][0], self.source.in_size[0]
        return lo <= start and start + self.g.in_size[0] <= lo + n
