"""``cupy_backends.cuda.libs.cublas``: handles, modes and ``gemmStridedBatchedEx`` on the
NumPy emulation of ``mconv.kernels.host``."""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import types

import numpy as np

from .device import CUDA_DTYPES, DISALLOW_REDUCED_PRECISION_REDUCTION, RaceError, State
from .device import current_stream, flat, resolve


def make_cublas(state: State) -> types.ModuleType:
    from mconv.kernels import host, plan

    module = types.ModuleType("cupy_backends.cuda.libs.cublas")
    module.CUBLAS_COMPUTE_32F, module.CUBLAS_COMPUTE_64F = 68, 70
    module.CUBLAS_OP_N, module.CUBLAS_OP_T = 0, 1
    module.CUBLAS_POINTER_MODE_HOST, module.CUBLAS_POINTER_MODE_DEVICE = 0, 1
    module.CUBLAS_GEMM_DEFAULT = -1
    module.CUBLAS_DEFAULT_MATH, module.CUBLAS_TENSOR_OP_MATH = 0, 1
    handles = {1000 + d: {"device": d, "pointer": 0, "math": 0} for d in range(state.device_count)}
    module.handles, module.calls = handles, []

    def handle_of(h):
        if h not in handles:
            raise RaceError(f"cuBLAS handle {h!r} was never created")
        return handles[h]

    module.setPointerMode = lambda h, mode: handle_of(h).__setitem__("pointer", mode)
    module.getPointerMode = lambda h: handle_of(h)["pointer"]
    module.setMathMode = lambda h, mode: handle_of(h).__setitem__("math", int(mode))
    module.getMathMode = lambda h: handle_of(h)["math"]

    def gemm(handle, transa, transb, m, n, k, alpha, a, atype, lda, stride_a, b, btype, ldb,
             stride_b, beta, c, ctype, ldc, stride_c, batch, compute, algo):  # fmt: skip
        info = handle_of(handle)
        device = info["device"]
        if device != state.device:
            raise RaceError(f"cuBLAS handle of device {device} used on device {state.device}")
        assert algo == -1 and info["pointer"] == 0, (algo, info)
        dtypes = [np.dtype(CUDA_DTYPES[t]) for t in (atype, btype, ctype)]
        wide = dtypes[0] == np.float64
        assert compute == (70 if wide else 68), compute  # fp32 compute for fp16 and fp32
        if dtypes[2] == np.float16 and not info["math"] & DISALLOW_REDUCED_PRECISION_REDUCTION:
            raise RaceError("fp16 GEMM output without CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_"
                            "REDUCTION: split-K partial sums may be reduced in fp16")  # fmt: skip
        scale = ctypes.c_double if wide else ctypes.c_float
        assert scale.from_address(alpha).value == 1.0
        call = plan.GemmCall(bool(transa), bool(transb), m, n, k, lda, ldb, ldc, 0, 0, 0,
                             stride_a, stride_b, stride_c, batch,
                             scale.from_address(beta).value)  # fmt: skip
        stream = current_stream()
        stream.catch_up()
        operands = []
        for ptr, dtype, rows, cols, ld, stride in (
            (a, dtypes[0], *((k, m) if transa else (m, k)), lda, stride_a),
            (b, dtypes[1], *((n, k) if transb else (k, n)), ldb, stride_b),
            (c, dtypes[2], m, n, ldc, stride_c),
        ):
            extent = ((batch - 1) * stride + (cols - 1) * ld + rows) * dtype.itemsize
            buffer, offset = resolve(ptr, extent, device, "gemmStridedBatchedEx")
            buffer.check_no_race(stream, "gemmStridedBatchedEx")
            assert offset % dtype.itemsize == 0, "misaligned pointer"
            operands.append((buffer, offset // dtype.itemsize, dtype))
        (ab, oa, da), (bb, ob, db), (cb, oc, dc) = operands
        call = dataclasses.replace(call, offset_a=oa, offset_b=ob, offset_c=oc)
        module.calls.append(("gemm", call, atype, btype, ctype, info["math"]))
        scratch = np.array(flat(cb, dc))  # C as it is now; written when the stream runs
        host.gemm_reference(call, np.array(flat(ab, da)), np.array(flat(bb, db)), scratch)
        stream.enqueue(cb, functools.partial(np.copyto, flat(cb, dc), scratch))

    module.gemmStridedBatchedEx = gemm
    return module
