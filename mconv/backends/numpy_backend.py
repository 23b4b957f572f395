"""NumPy backend: the three convolution primitives on the CPU (``base.Backend``).

Shapes (B batch, G groups, Cg = C/G, Og = O/G, K = prod(kernel_size)):

    forward          x (B, C, *S), w (O, Cg, *k)   -> y  (B, O, *Q)
    backward_data    dy (B, O, *Q), w (O, Cg, *k)  -> dx (B, C, *S)
    backward_filter  dy (B, O, *Q), x (B, C, *S)   -> dw (O, Cg, *k)

All three see a zero-padding cross-correlation geometry (padding modes and
``conv_mode`` are lowered in ``mconv.conv_ops``). Inputs arrive in the
caller's dtype; results come back in the accumulator dtype (fp32 for fp16:
fp16 is widened tile by tile on the way into fp32 BLAS, never as a whole),
or, for forward and backward_data, in ``out_dtype`` when the caller asks:
each tile is then rounded once on its way out, and no fp32 copy of the
whole result exists.

Paths:
- pointwise (1x1, stride 1, no padding): one GEMM per image, no copies, ``numpy_pointwise``;
- depthwise (C = O = G): per-channel tap columns and a 1 x K GEMM, ``numpy_depthwise``;
- with the JIT (numba/llvmlite, ``pip install mconv[fast]``): Winograd for float32 sums of
  dense 3x3 convs (forward, and backward_data's stride-1 phases), ``numpy_winograd``;
  register-blocked direct kernels for float32 sums of the rest with non-negative padding
  (vectors along the output channels from 16 a group; along a row for fewer), and for
  the weight gradient before Winograd's, ``numpy_direct``;
- stride 1 where few padded columns are wasted: channels-first "wide" im2col, ``numpy_wide``
  (forward; filter gradient for narrow groups and 1-d);
- everything else: tiled channels-last im2col + GEMM, ``numpy_im2col``.

backward_data is a convolution too, without col2im in general: per axis, the input
positions u with (u + before) = r (mod stride) receive only the taps i with
i*dilation = r + before (mod stride), and for those the output index
q = (u + before - i*dilation) / stride moves by one as u moves by stride.
So each of the prod(stride) residue classes ("phases") of dx is a
stride-1 correlation of dy with the transposed, reversed sub-kernel of its
taps (dilation dilation/gcd(stride, dilation)), written straight into
dx[..., r::stride]; a phase with no taps is zero. Stride 1 is one phase.
When C is much smaller than O (the 7x7 stem: 3 vs 64) the phases would copy
O-channel columns for C-channel results; there a tiled col2im
(``numpy_im2col.scatter_data``) moves C-channel columns instead.
"""

from __future__ import annotations

import itertools
import math
import os

import numpy as np

from ..geometry import ConvGeometry
from ..padding import pad_backward_unchecked as pad_backward  # noqa: F401 - backend interface
from ..padding import pad_unchecked as pad  # noqa: F401 - backend interface
from ..precision import accumulator, bias_view, store
from . import (numpy_depthwise, numpy_direct, numpy_im2col, numpy_pointwise, numpy_threads, numpy_wide,
               numpy_winograd)  # fmt: skip
from .numpy_convert import widened

name = "numpy"

# backward_data takes the col2im path when C * SCATTER_RATIO <= O (see _scatter_is_cheaper):
# with the direct kernels, phases win at O = 2C (4x4 s2, C 64: 12.2 vs 14.4 ms) and 4C (s1, C 16:
# 3.6 vs 4.4), tie at 4C with stride 2, and lose from 8C (3x3 s2, C 16: 4.9 vs 3.5 ms)
SCATTER_RATIO = 6
SCATTER_MAX_BYTES = 64 << 20


def bias_grad(dy: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """db = sum of dy over the batch and spatial axes, in the accumulator dtype (float16: each
    image widened by the conversion kernel, then summed; NumPy's casting sum of float16 took
    3 ms for a 1.6 M-value dy)."""
    acc = accumulator(dy.dtype)
    if dy.dtype == acc or dy.size == 0:
        return dy.sum(axis=(0, *range(2, dy.ndim)), dtype=acc)
    total = np.zeros(dy.shape[1], acc)
    for image in dy:  # (C, *Q) -> (C, prod(Q)), summed along each channel
        total += widened(image, acc).reshape(dy.shape[1], -1).sum(axis=1)
    return total


def _check_memory(shape, dtype, what: str, geom: ConvGeometry) -> None:
    """Refuse, before allocating, a result larger than the free memory: a MemoryError, not an
    OOM kill (the scratch of the tiles is small; the result is what can be absurd)."""
    need = math.prod(shape) * np.dtype(dtype).itemsize
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return
    if need > free:
        raise MemoryError(
            f"this convolution needs about {need / 2**30:.1f} GiB of buffers ({what} of shape "
            f"{list(shape)}, padding {list(geom.padding)}, stride {list(geom.stride)}), but only "
            f"{free / 2**30:.1f} GiB of memory is free"
        )


def _empty(shape, dtype, what: str, geom: ConvGeometry) -> np.ndarray:
    _check_memory(shape, dtype, what, geom)
    return np.empty(shape, dtype)


def _correlate(x: np.ndarray, w: np.ndarray, g: ConvGeometry, out: np.ndarray, acc, bias=None):
    """out (B, O, *Q) = conv(x, w) (+ bias (O,)) on the fastest path for ``g``, accumulated in
    ``acc`` and rounded once into ``out``."""
    if out.size == 0 or x.size == 0 or w.size == 0:  # an empty sum (or nothing to write)
        store(np.zeros((), acc), out, None if bias is None else bias_view(bias, g.ndim + 1, 0))
    elif numpy_depthwise.applies(g) and not numpy_direct.applies(g, x, out):
        numpy_depthwise.forward(x, w, g, out, acc, bias)
    elif numpy_pointwise.applies(g):
        numpy_pointwise.forward(x, w, g, out, acc, bias)
    elif numpy_winograd.applies(g, x, w):
        numpy_winograd.correlate(x, w, g, out, bias)
    elif numpy_direct.applies(g, x, out):
        numpy_direct.forward(x, w, g, out, bias)
    elif numpy_wide.applies(g):
        numpy_wide.correlate(x, w, g, out, acc, bias)
    else:
        numpy_im2col.correlate(x, w, g, out, acc, bias)


# Each primitive holds OpenBLAS to one thread (numpy_threads.blas_pinned) for all of its work:
# a GEMM on the calling thread with OpenBLAS's threads (Winograd's weight transform) left them
# spinning into the next call's kernels (the video layer's backward: 33.7 ms right after its
# forward, 23.3 after another backward)
@numpy_threads.blas_pinned()
def forward(x: np.ndarray, w: np.ndarray, geom: ConvGeometry, out_dtype=None, bias=None):
    """y = conv(x, w) + bias, in ``out_dtype`` (rounded once from the accumulator) or the
    accumulator; the bias is added per tile, in the accumulator."""
    acc = accumulator(x.dtype)
    y = _empty(geom.output_shape(x.shape[0]), out_dtype or acc, "output", geom)
    _correlate(x, w, geom, y, acc, None if bias is None else bias.astype(acc, copy=False))
    return y


def _phase_axis(size, out, k, stride, dilation, before):
    """The residues r of one axis that some tap reaches: (positions slice, taps high to low,
    sub-conv parts); every other residue class of dx is zero."""
    reached = sorted(r for r in {(i * dilation - before) % stride for i in range(k)} if r < size)
    for r in reached:
        count = (size - r + stride - 1) // stride  # positions u = r, r + stride, ... < size
        taps = [i for i in reversed(range(k)) if (r + before - i * dilation) % stride == 0]
        first = (r + before - taps[0] * dilation) // stride  # dy index of the first tap at u = r
        step = dilation // math.gcd(stride, dilation)  # dy distance between consecutive taps
        # dy positions m + first + j*step, j < len(taps), for m < count, as a padded window
        lo, hi = -first, count - 1 + first + (len(taps) - 1) * step - (out - 1)
        yield slice(r, None, stride), taps, (count, step, (lo, hi))


def _scatter_is_cheaper(g: ConvGeometry, dtype) -> bool:
    """col2im moves C-channel columns, the phases O-channel ones; a shifted add costs about two
    copies, and one image's columns must stay small."""
    if numpy_depthwise.applies(g) or numpy_pointwise.applies(g):
        return False
    columns = numpy_im2col.scatter_bytes(g, accumulator(dtype).itemsize)
    return SCATTER_RATIO * g.in_channels <= g.out_channels and columns <= SCATTER_MAX_BYTES


@numpy_threads.blas_pinned()
def backward_data(dy: np.ndarray, w: np.ndarray, geom: ConvGeometry, out_dtype=None, bias=None):
    """dx = A_w^T dy + bias: stride phases, or col2im when C << O (see the module docstring);
    in ``out_dtype`` (rounded once from the accumulator) or the accumulator. The phases add
    the bias as a forward does (each element of dx is one phase's); col2im adds into dx, so
    there the bias is added to the whole dx after it, in the accumulator, then rounded once."""
    if bias is not None and (dy.size == 0 or w.size == 0 or _scatter_is_cheaper(geom, dy.dtype)):
        dx = backward_data(dy, w, geom)
        out = dx if out_dtype is None else np.empty(dx.shape, out_dtype)
        return store(dx, out, bias_view(bias.astype(dx.dtype, copy=False), dx.ndim))
    batch, groups = dy.shape[0], geom.groups
    og, cg = geom.out_channels // groups, geom.in_channels // groups
    # w (O, Cg, *k) -> (G, Og, Cg, *k) -> (G, Cg, Og, *k) -> (C, Og, *k): the transposed conv weight
    wt = w.reshape(groups, og, cg, *geom.kernel_size).swapaxes(1, 2)
    wt = wt.reshape(geom.in_channels, og, *geom.kernel_size)
    shape, acc = geom.input_shape(batch), accumulator(dy.dtype)
    dtype = out_dtype or acc
    _check_memory(shape, dtype, "input gradient", geom)
    if dy.size == 0 or w.size == 0:
        return np.zeros(shape, dtype)
    if _scatter_is_cheaper(geom, dy.dtype):
        dx = np.empty(shape, dtype)
        numpy_im2col.scatter_data(dy, w, geom, dx, acc)
        return dx
    axes = [
        list(_phase_axis(*args))
        for args in zip(
            geom.in_size,
            geom.out_size,
            geom.kernel_size,
            geom.stride,
            geom.dilation,
            (lo for lo, _ in geom.padding),
        )
    ]
    covered = all(len(a) == min(s, n) for a, s, n in zip(axes, geom.stride, geom.in_size))
    dx = (np.empty if covered else np.zeros)(shape, dtype)
    if bias is not None:
        bias = bias.astype(acc, copy=False)
        if not covered:  # the residue classes no tap reaches: the bias alone
            dx[...] = bias_view(bias, dx.ndim)
    for phase in itertools.product(*axes):
        _phase(dy, wt, geom, phase, dx, acc, bias)
    return dx


def _phase(dy, wt, geom: ConvGeometry, phase, dx: np.ndarray, acc, bias=None) -> None:
    """One residue class of dx: dx[..., *slices] = conv(dy, the sub-kernel of its taps).

    Its window of dy may start or end inside dy: that part of dy is cut off (a view), so the
    sub-conv has non-negative padding."""
    slices, taps, parts = zip(*phase)
    counts, steps, pads = zip(*parts)
    cut = tuple(slice(max(-lo, 0), n - max(-hi, 0)) for n, (lo, hi) in zip(geom.out_size, pads))
    sub = ConvGeometry(
        geom.out_channels,
        geom.in_channels,
        geom.groups,
        tuple(c.stop - c.start for c in cut),
        tuple(len(t) for t in taps),
        counts,
        (1,) * geom.ndim,
        steps,
        tuple((max(lo, 0), max(hi, 0)) for lo, hi in pads),
    )
    # (C, Og, *k) -> (C, Og, *len(taps)): the phase's taps, highest first
    wsub = wt[(Ellipsis, *np.ix_(*taps))]
    _correlate(dy[(Ellipsis, *cut)], wsub, sub, dx[(Ellipsis, *slices)], acc, bias)


@numpy_threads.blas_pinned()
def backward_filter(dy: np.ndarray, x: np.ndarray, geom: ConvGeometry) -> np.ndarray:
    """dW = B_x^T dy, in the accumulator dtype."""
    acc = accumulator(x.dtype)
    if dy.size == 0 or x.size == 0:
        return np.zeros(
            (geom.out_channels, geom.in_channels // geom.groups, *geom.kernel_size), acc
        )
    if numpy_depthwise.applies(geom):
        return numpy_depthwise.filter_grad(dy, x, geom, acc)
    # the direct kernels before Winograd's (9.1-13.8 ms vs 11.2-17.8: c64, c128, video) and
    # the pointwise GEMMs (1x1 c256->64: 5.4 vs 6.2 ms; float16 5.1 vs 7.7)
    if numpy_direct.applies_to_filter_grad(geom, dy, x):
        return numpy_direct.filter_grad(dy, x, geom)
    if numpy_pointwise.applies(geom):
        return numpy_pointwise.filter_grad(dy, x, geom, acc)
    if numpy_winograd.applies(geom, dy, x):
        return numpy_winograd.filter_grad(dy, x, geom)
    if numpy_wide.applies_to_filter_grad(geom):
        return numpy_wide.filter_grad(dy, x, geom, acc)
    return numpy_im2col.filter_grad(dy, x, geom, acc)
