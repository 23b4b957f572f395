"""The backend contract (``mconv.backends.base.Backend``) on the CUDA kernels and cuBLAS.

``KernelBackend(executor)`` implements ``forward``, ``backward_data``,
``backward_filter``, ``pad``, ``pad_backward`` and ``bias_grad`` once, against an
*executor* that owns the device:

    executor.xp                       the array module (cupy, or numpy on the host)
    executor.params(values)           an int64 parameter array on the device
    executor.launch(name, types, total, *args)   run mconv::name<types> over total items
    executor.gemm(call, a, b, c)      one cublasGemmStridedBatchedEx (plan.GemmCall)

The CuPy backend gives it a CuPy executor; the tests give it
``mconv.kernels.host.HostExecutor`` and compare with the NumPy backend.

Dtypes (``mconv.precision``): T is the input dtype (inputs are never upcast).
Acc = ``accumulator(T)``: every kernel sums and every GEMM computes in it
(cuBLAS CUBLAS_COMPUTE_32F/_64F). Out = ``stored(T, compute_mode)``, the dtype
of each result and of the intermediate columns: Acc under
``compute_mode='float32'`` (one rounding, by the caller) and T under
``'default'`` (half the memory traffic).
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..geometry import ConvGeometry
from ..precision import accumulator, bias_view, store
from ..precision import stored
from . import CTYPES, plan

#: Column workspace per call, bytes ($MCONV_WORKSPACE_MB, default 1024): larger
#: batches are processed in chunks of images.
DEFAULT_WORKSPACE = 1 << 30


def _workspace_limit() -> int:
    value = os.environ.get("MCONV_WORKSPACE_MB")
    return int(value) << 20 if value else DEFAULT_WORKSPACE


def _types(*dtypes) -> tuple[str, ...]:
    return tuple(CTYPES[np.dtype(d).name] for d in dtypes)


def _longest(chunks) -> int:
    return max(stop - start for start, stop in chunks)


def _flat(a):
    """A contiguous array as a 1-d view (element offsets index it)."""
    return a.reshape(-1)  # (...) -> (numel,), a view


class KernelBackend:
    """The mconv backend interface on an executor (see the module docstring)."""

    def __init__(self, executor, workspace: int | None = None):
        self.ex = executor
        self.xp = executor.xp
        self.name = f"kernels[{getattr(executor, 'name', type(executor).__name__)}]"
        self.workspace = workspace

    # -- helpers -----------------------------------------------------------------------------
    def _gemm(self, call: plan.RowGemm, a, b, c) -> None:
        self.ex.gemm(call.cublas(), _flat(b), _flat(a), _flat(c))  # column-major: B, A swap

    def _chunks(self, geom: ConvGeometry, batch: int, itemsize: int):
        """Batch chunks whose columns fit the workspace, and the column elements per image."""
        per_image = geom.in_channels * math.prod(geom.kernel_size) * math.prod(geom.out_size)
        limit = self.workspace if self.workspace is not None else _workspace_limit()
        return plan.batch_chunks(batch, per_image * itemsize, limit), per_image

    def _im2col(self, x, cols, geom, images: int, per_group: bool) -> None:
        ck = geom.in_channels * math.prod(geom.kernel_size)
        p = math.prod(geom.out_size)
        strides = (p, images * p) if per_group else (ck * p, p)
        self.ex.launch("im2col", _types(x.dtype), cols.size, x,
                       cols, self.ex.params(plan.conv_params(geom, images)), *strides)  # fmt: skip

    def _reduce(self, partial, out, rows: int, lanes: int) -> None:
        self.ex.launch("reduce_rows", _types(partial.dtype, out.dtype), rows, partial, out, rows,
                       lanes)  # fmt: skip

    # -- primitives --------------------------------------------------------------------------
    def forward(self, x, w, geom: ConvGeometry, out_dtype=None, bias=None):
        """y (B, O, *Q) = conv(x (B, C, *S), w (O, C/G, *k)) + bias, in ``stored(dtype, compute_mode)`` (the
        bias added in that dtype); ``out_dtype`` (the dtype the caller casts to afterwards) is
        accepted and ignored."""
        y = self._forward(x, w, geom)
        return y if bias is None else store(y, y, bias_view(bias, y.ndim))

    def _forward(self, x, w, geom: ConvGeometry):
        xp, batch = self.xp, x.shape[0]
        x, w = xp.ascontiguousarray(x), xp.ascontiguousarray(w)
        out = stored(x.dtype, geom.compute_mode)
        y = xp.empty((batch, geom.out_channels, *geom.out_size), dtype=out)
        if batch == 0:
            return y
        if plan.is_depthwise(geom):
            self.ex.launch("depthwise_forward", _types(x.dtype, accumulator(x.dtype), out),
                           y.size, x, w, y, self.ex.params(plan.conv_params(geom, batch)))  # fmt: skip
            return y
        chunks, per_image = self._chunks(geom, batch, x.dtype.itemsize)
        pointwise = plan.is_pointwise(geom)
        workspace = None if pointwise else xp.empty(_longest(chunks) * per_image, dtype=x.dtype)
        for start, stop in chunks:
            xc, yc = x[start:stop], y[start:stop]
            cols = xc if pointwise else workspace[: (stop - start) * per_image]
            if not pointwise:
                self._im2col(xc, cols, geom, stop - start, per_group=False)
            for call in plan.forward_gemms(geom, stop - start):
                self._gemm(call, w, cols, yc)
        return y

    def backward_data(self, dy, w, geom: ConvGeometry, out_dtype=None, bias=None):
        """dx (B, C, *S) = col2im(W^T dy) + bias: the adjoint of ``forward`` in x (``out_dtype``
        and the bias: as in ``forward``)."""
        dx = self._backward_data(dy, w, geom)
        return dx if bias is None else store(dx, dx, bias_view(bias, dx.ndim))

    def _backward_data(self, dy, w, geom: ConvGeometry):
        xp, batch = self.xp, dy.shape[0]
        dy, w = xp.ascontiguousarray(dy), xp.ascontiguousarray(w)
        acc, out = accumulator(dy.dtype), stored(dy.dtype, geom.compute_mode)
        dx = xp.empty((batch, geom.in_channels, *geom.in_size), dtype=out)
        if batch == 0:
            return dx
        if plan.is_depthwise(geom):
            self.ex.launch("depthwise_backward_data", _types(dy.dtype, acc, out), dx.size, dy, w,
                           dx, self.ex.params(plan.conv_params(geom, batch)))  # fmt: skip
            return dx
        chunks, per_image = self._chunks(geom, batch, out.itemsize)
        pointwise = plan.is_pointwise(geom)
        workspace = None if pointwise else xp.empty(_longest(chunks) * per_image, dtype=out)
        for start, stop in chunks:
            images, dyc, dxc = stop - start, dy[start:stop], dx[start:stop]
            cols = dxc if pointwise else workspace[: images * per_image]  # 1x1: cols are dx
            for call in plan.backward_data_gemms(geom, images):
                self._gemm(call, w, dyc, cols)
            if not pointwise:
                self.ex.launch("col2im", _types(out, acc, out), dxc.size, cols, dxc,
                               self.ex.params(plan.conv_params(geom, images)),
                               per_image, math.prod(geom.out_size))  # fmt: skip
        return dx

    def backward_filter(self, dy, x, geom: ConvGeometry):
        """dW (O, C/G, *k) = dy im2col(x)^T, summed over the batch."""
        xp, batch = self.xp, x.shape[0]
        dy, x = xp.ascontiguousarray(dy), xp.ascontiguousarray(x)
        acc, out = accumulator(x.dtype), stored(x.dtype, geom.compute_mode)
        shape = (geom.out_channels, geom.in_channels // geom.groups, *geom.kernel_size)
        if batch == 0:
            return xp.zeros(shape, dtype=out)
        if plan.is_depthwise(geom):
            rows, p = geom.out_channels * math.prod(geom.kernel_size), math.prod(geom.out_size)
            lanes = plan.reduction_lanes(batch * p, rows)
            partial = xp.empty(rows * lanes, dtype=acc)
            self.ex.launch("depthwise_backward_filter", _types(x.dtype, acc), partial.size, dy, x,
                           partial, self.ex.params(plan.conv_params(geom, batch)), lanes)  # fmt: skip
            dw = xp.empty(shape, dtype=out)
            self._reduce(partial, dw, rows, lanes)
            return dw
        chunks, per_image = self._chunks(geom, batch, x.dtype.itemsize)
        dw = xp.empty(shape, dtype=acc if len(chunks) > 1 else out)  # chunks add up in Acc
        p = math.prod(geom.out_size)
        workspace = xp.empty(_longest(chunks) * per_image, dtype=x.dtype)
        for index, (start, stop) in enumerate(chunks):
            images = stop - start
            cols = workspace[: images * per_image]
            self._im2col(x[start:stop], cols, geom, images, per_group=True)
            # dy (B, O, *Q) -> (B, O, P) -> (O, B, P): dy^T with the batch inside each row
            dyt = xp.ascontiguousarray(dy[start:stop].reshape(images, -1, p).transpose(1, 0, 2))
            for call in plan.backward_filter_gemms(geom, images, beta=float(index > 0)):
                self._gemm(call, dyt, cols, dw)
        return dw.astype(out, copy=False)

    # -- padding and bias --------------------------------------------------------------------
    def pad(self, x, pairs, mode: str):
        """Pad the last ``len(pairs)`` axes (``mconv.padding.pad_unchecked``'s contract)."""
        x = self.xp.ascontiguousarray(x)
        first = x.ndim - len(pairs)
        shape = x.shape[:first] + tuple(s + lo + hi for s, (lo, hi) in zip(x.shape[first:], pairs))
        y = self.xp.empty(shape, dtype=x.dtype)
        self.ex.launch("pad", _types(x.dtype), y.size, x, y,
                       self.ex.params(plan.pad_params(x.shape, pairs, mode)))  # fmt: skip
        return y

    def pad_backward(self, dy, pairs, mode: str):
        """Adjoint of ``pad``: one gather per padded axis, summing in Acc."""
        first = dy.ndim - len(pairs)
        dy = self.xp.ascontiguousarray(dy)
        types = _types(dy.dtype, accumulator(dy.dtype), dy.dtype)
        for axis, (lo, hi) in enumerate(pairs, start=first):
            if not (lo or hi):
                continue
            n = dy.shape[axis] - lo - hi
            dx = self.xp.empty(dy.shape[:axis] + (n,) + dy.shape[axis + 1 :], dtype=dy.dtype)
            outer, inner = math.prod(dy.shape[:axis]), math.prod(dy.shape[axis + 1 :])
            self.ex.launch("pad_backward_axis", types, dx.size, dy, dx, outer, n, inner, lo, hi,
                           plan.PAD_MODES[mode])  # fmt: skip
            dy = dx
        return dy

    def bias_grad(self, dy, geom: ConvGeometry):
        """db (O,) = sum of dy over the batch and spatial axes, in Acc."""
        dy = self.xp.ascontiguousarray(dy)
        acc, out = accumulator(dy.dtype), stored(dy.dtype, geom.compute_mode)
        batch, channels = dy.shape[0], dy.shape[1]
        numel = math.prod(dy.shape[2:])
        lanes = plan.reduction_lanes(batch * numel, channels)
        partial = self.xp.empty(channels * lanes, dtype=acc)
        self.ex.launch("bias_grad", _types(dy.dtype, acc), partial.size, dy, partial, batch,
                       channels, numel, lanes)  # fmt: skip
        db = self.xp.empty(channels, dtype=out)
        self._reduce(partial, db, channels, lanes)
        return db
