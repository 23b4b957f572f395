"""CuPy backend (``mconv.backends.base.Backend``): mconv's CUDA kernels and cuBLAS.

The algorithm is ``mconv.kernels.ops.KernelBackend`` (tested on a CPU through
the host build); this module only supplies its GPU executor and the device
helpers. CuPy is imported when a CuPy array (or a ``'cuda'`` device) is
first seen, so ``mconv`` works without it.

- kernels: one ``cupy.RawModule`` per device, compiled from the package's
  ``.cu`` sources with a name expression per ``(T, Acc, Out)`` instantiation;
- GEMMs: ``cublasGemmStridedBatchedEx`` with CUBLAS_COMPUTE_32F for fp16 and
  fp32 (fp16 operands, fp32 or fp16 result), CUBLAS_COMPUTE_64F for fp64 —
  never CuPy's batched fp16 ``matmul`` (which upcasts by copying).

``compute_mode='float32'``: primitives return fp32 for fp16 inputs (the GEMM
writes fp32, every kernel accumulates and writes fp32; the bias is added in
fp32), and the caller rounds once. ``'default'``: the same fp32 arithmetic
inside each GEMM and kernel, but intermediates and results are stored as fp16
(``mconv.precision.stored``).
"""

from __future__ import annotations

import re

import numpy as np

from .. import _args, kernels
from ..kernels import plan
from ..kernels.ops import KernelBackend

name = "cupy"

# cudaDataType_t (library_types.h)
_CUDA_DTYPES = {"float16": 2, "float32": 0, "float64": 1}
# cublasMath_t flag (cublas_api.h; CuPy does not name it): reductions across split-K partial
# sums in the compute type, never in a narrower output type (PyTorch sets it too)
DISALLOW_REDUCED_PRECISION_REDUCTION = 16
_DEVICE = re.compile(r"cuda(?::(\d+))?")
_backends: dict[int, KernelBackend] = {}


def _cupy():
    """Import CuPy, or raise ImportError saying how to install it."""
    try:
        import cupy  # noqa: PLC0415 - optional dependency
    except ImportError as error:
        raise ImportError(
            "the CuPy backend needs CuPy: pip install 'mconv[cuda12]' (or 'mconv[cuda13]'); "
            f"importing cupy failed with: {error}"
        ) from error
    return cupy


# -- devices ---------------------------------------------------------------------------------
def device_index(device: str) -> int:
    """'cuda' (the current device) or 'cuda:i' -> i, checking that CuPy and the GPU exist."""
    match = _DEVICE.fullmatch(device) if isinstance(device, str) else None
    if match is None:
        raise ValueError(
            f"device must be 'cpu', 'cuda' or 'cuda:<index>', but got device={device!r}"
        )
    try:
        cupy = _cupy()
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:  # ImportError, or CUDARuntimeError without a driver or GPU
        raise ValueError(
            f"device must be 'cpu' on this machine: {error} (CUDA devices need CuPy and an "
            f"NVIDIA GPU), but got device={device!r}"
        ) from None
    index = cupy.cuda.runtime.getDevice() if match.group(1) is None else int(match.group(1))
    if index >= count:
        raise ValueError(
            f"device {device!r} does not exist: CuPy sees {count} CUDA device(s), "
            f"but got device={device!r}"
        )
    return index


def check_device(device: str) -> str:
    """The canonical name of a CUDA device ('cuda:i'); raises ValueError as device_index."""
    return f"cuda:{device_index(device)}"


is_cupy, device_of = _args.is_cupy, _args.device_of  # one definition, in mconv._args


def to_device(array, device: str):
    """``array`` on ``device`` ('cpu' or a CUDA device); no copy when it is already there."""
    if device == "cpu":
        return array.get() if is_cupy(array) else array
    index = device_index(device)
    cupy = _cupy()
    if is_cupy(array) and array.device.id == index:
        return array
    with cupy.cuda.Device(index):
        # ndarray.copy() copies into the current device, even from another GPU
        return array.copy() if is_cupy(array) else cupy.asarray(array)


# -- the executor ----------------------------------------------------------------------------
class CupyExecutor:
    """Runs ``KernelBackend`` on one GPU: RawModule kernels and cuBLAS GEMMs."""

    name = "cupy"

    def __init__(self, device_id: int):
        self.xp = _cupy()
        self.device_id = device_id
        self._module = None
        self._functions: dict = {}
        self._params: dict = {}

    def _function(self, kernel: kernels.Kernel, types: tuple[str, ...]):
        key = (kernel.name, types)
        if key not in self._functions:
            if self._module is None:
                self._module = self.xp.RawModule(
                    code=kernels.source(),
                    options=tuple(kernels.nvrtc_options()),
                    name_expressions=kernels.name_expressions(),
                )
            try:  # RawModule compiles on first use
                self._functions[key] = self._module.get_function(kernel.expression(types))
            except Exception as error:
                if kernels.cuda_include_dirs() or "cuda_fp16" not in str(error):
                    raise
                raise RuntimeError(f"{kernels.MISSING_HEADERS}: {error}") from error
        return self._functions[key]

    def launch(self, name: str, types: tuple[str, ...], total: int, *args) -> None:
        if total == 0:
            return
        kernel = kernels.KERNELS_BY_NAME[name]
        converted = tuple(  # host: scalars passed by value as long long
            arg if "*" in decl else np.int64(arg) for decl, arg in zip(kernel.params, args)
        )
        grid, block = plan.launch_config(total)
        self._function(kernel, types)((grid,), (block,), converted)

    def params(self, values):
        """An int64 parameter array, cached per value (no host-to-device copy per call). CuPy
        copies host data asynchronously on the current stream, so the copy is waited for once:
        a cached array may be read by kernels on any stream later."""
        key = tuple(int(v) for v in values)
        if key not in self._params:
            if len(self._params) > 1024:
                self._params.clear()
            host = np.asarray(key, dtype=np.int64)  # host: copied to the device once
            self._params[key] = self.xp.asarray(host)
            self.xp.cuda.get_current_stream().synchronize()
        return self._params[key]

    def gemm(self, call: plan.GemmCall, a, b, c) -> None:
        """cublasGemmStridedBatchedEx on the current stream (cuBLAS sets it per call), with
        reduced-precision reductions disallowed on the shared handle for the call (its math
        mode is restored after)."""
        from cupy_backends.cuda.libs import cublas  # noqa: PLC0415 - with CuPy only

        wide = a.dtype == np.float64
        compute = cublas.CUBLAS_COMPUTE_64F if wide else cublas.CUBLAS_COMPUTE_32F
        scale = np.float64 if wide else np.float32
        # host: alpha and beta are read through host pointers (CUBLAS_POINTER_MODE_HOST)
        alpha, beta = np.array(1.0, dtype=scale), np.array(call.beta, dtype=scale)
        handle = self.xp.cuda.device.get_cublas_handle()
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        mode = cublas.getMathMode(handle)
        cublas.setMathMode(handle, mode | DISALLOW_REDUCED_PRECISION_REDUCTION)
        try:
            self._gemm_ex(cublas, handle, call, a, b, c, alpha, beta, compute)
        finally:
            cublas.setMathMode(handle, mode)

    @staticmethod
    def _gemm_ex(cublas, handle, call, a, b, c, alpha, beta, compute) -> None:
        ops = (cublas.CUBLAS_OP_N, cublas.CUBLAS_OP_T)
        cublas.gemmStridedBatchedEx(
            handle, ops[call.transa], ops[call.transb], call.m, call.n, call.k,
            alpha.ctypes.data,
            a.data.ptr + call.offset_a * a.itemsize, _CUDA_DTYPES[a.dtype.name], call.lda,
            call.stride_a,
            b.data.ptr + call.offset_b * b.itemsize, _CUDA_DTYPES[b.dtype.name], call.ldb,
            call.stride_b,
            beta.ctypes.data,
            c.data.ptr + call.offset_c * c.itemsize, _CUDA_DTYPES[c.dtype.name], call.ldc,
            call.stride_c,
            call.batch, compute, cublas.CUBLAS_GEMM_DEFAULT,
        )  # fmt: skip


def _backend(array) -> KernelBackend:
    index = array.device.id
    if index not in _backends:
        _backends[index] = KernelBackend(CupyExecutor(index))
    return _backends[index]


def _on_device(method: str):
    def primitive(*args, **kwargs):
        array, cupy = args[0], _cupy()
        for other in (*args[1:], *kwargs.values()):
            if _args.is_ndarray(other) and device_of(other) != device_of(array):
                raise ValueError(
                    f"all arrays of a convolution must be on one device, but got arrays on "
                    f"{device_of(array)} and {device_of(other)}"
                )
        with cupy.cuda.Device(array.device.id):
            return getattr(_backend(array), method)(*args, **kwargs)

    primitive.__name__ = method
    primitive.__doc__ = getattr(KernelBackend, method).__doc__
    return primitive


# -- the backend contract (mconv.backends.base.Backend) -------------------------------------
forward = _on_device("forward")
backward_data = _on_device("backward_data")
backward_filter = _on_device("backward_filter")
pad = _on_device("pad")
pad_backward = _on_device("pad_backward")
bias_grad = _on_device("bias_grad")
