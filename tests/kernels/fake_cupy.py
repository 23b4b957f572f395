"""A stand-in for CuPy on the CPU, to run mconv.backends.cupy_backend unchanged.

Arrays are NumPy arrays of a subclass whose module is ``cupy`` (so mconv
dispatches them to the CuPy backend), with ``.device.id``, ``.data.ptr`` and
``.get()``. ``RawModule`` checks its compile options and name expressions and
launches the host build of the kernel each name expression names; cuBLAS's
``gemmStridedBatchedEx`` maps raw device pointers back to arrays and runs the
NumPy emulation. So every argument cupy_backend passes (launch shapes, int64
scalars, pointers, GEMM sizes, strides, dtype codes, compute type, alpha,
beta) is checked, and only CUDA itself is replaced.
"""

from __future__ import annotations

import ctypes
import sys
import types

import numpy as np

from mconv import kernels
from mconv.kernels import host, plan

CUDA_DTYPES = {2: np.float16, 0: np.float32, 1: np.float64}
_OWNERS: list[np.ndarray] = []  # every array that owns its memory, to resolve raw pointers


class ndarray(np.ndarray):  # noqa: N801 - CuPy's name
    __module__ = "cupy._core.core"

    def __array_finalize__(self, obj):
        if self.base is None:  # a new allocation (astype, arithmetic), not a view
            _OWNERS.append(self)

    def __array_function__(self, func, types_, args, kwargs):
        """NumPy functions on device arrays return device arrays (CuPy's NEP 18 dispatch)."""
        result = super().__array_function__(func, types_, args, kwargs)
        return _on_device(result)

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self):
        return np.array(self.view(np.ndarray))


def _on_device(result):
    if isinstance(result, tuple):
        return tuple(_on_device(r) for r in result)
    if isinstance(result, np.ndarray) and not isinstance(result, ndarray):
        _OWNERS.append(result)
        return result.view(ndarray)
    return result


class FakeCupy(types.ModuleType):
    """The module: allocation, RawModule, cuda.{Device, runtime, device}."""

    def __init__(self, lib, device_count=1):
        super().__init__("cupy")
        self.ndarray, self.lib = ndarray, lib
        self.buffers = _OWNERS
        _OWNERS.clear()
        self.launched: list[tuple] = []
        self.compiled: list[dict] = []
        self.cuda = types.SimpleNamespace(
            Device=_Device,
            runtime=types.SimpleNamespace(getDeviceCount=lambda: device_count, getDevice=lambda: 0),
            device=types.SimpleNamespace(get_cublas_handle=lambda: 7),
        )

    def _keep(self, a: np.ndarray) -> ndarray:
        out = a.view(ndarray)
        self.buffers.append(out)
        return out

    def asarray(self, a, dtype=None):
        if isinstance(a, ndarray):
            return a
        return self._keep(np.array(a, dtype=dtype))

    def empty(self, shape, dtype=np.float64):
        return self._keep(np.empty(shape, dtype=dtype))

    def zeros(self, shape, dtype=np.float64):
        return self._keep(np.zeros(shape, dtype=dtype))

    def ones(self, shape, dtype=np.float64):
        return self._keep(np.ones(shape, dtype=dtype))

    def asnumpy(self, a):
        return a.get() if isinstance(a, ndarray) else np.asarray(a)

    def ascontiguousarray(self, a):
        if a.flags.c_contiguous and isinstance(a, ndarray):
            return a
        return self._keep(np.ascontiguousarray(a.view(np.ndarray)))

    def RawModule(self, code, options, name_expressions):  # noqa: N802 - CuPy's name
        self.compiled.append(dict(code=code, options=options, names=name_expressions))
        return _Module(self)

    def resolve(self, ptr: int, dtype) -> tuple[np.ndarray, int]:
        """The flat allocation holding device pointer ``ptr``, and the element offset."""
        for buf in reversed(self.buffers):
            start = buf.ctypes.data
            if buf.dtype == dtype and start <= ptr < start + max(buf.nbytes, 1):
                flat = buf.view(np.ndarray).reshape(-1)  # (...) -> (numel,)
                return flat, (ptr - start) // buf.itemsize
        raise AssertionError(f"pointer {ptr:#x} of {np.dtype(dtype)} is no allocation")


class _Device:
    mem_info = (2**30, 2**31)  # (free, total) bytes

    def __init__(self, index=0):
        self.index = index

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _Module:
    def __init__(self, fake: FakeCupy):
        self.fake = fake

    def get_function(self, expression: str):
        names = self.fake.compiled[-1]["names"]
        assert expression in names, expression
        kernel, types_ = next(
            (k, t) for k, t in kernels.instantiations() if k.expression(t) == expression
        )

        def launch(grid, block, args):
            assert (
                isinstance(grid, tuple)
                and isinstance(block, tuple)
                and len(args) == len(kernel.params)
            )
            converted = []
            for decl, arg in zip(kernel.params, args):
                if "*" in decl:
                    assert isinstance(arg, ndarray), (decl, type(arg))
                    converted.append(arg.ctypes.data)
                else:
                    assert isinstance(arg, np.int64), (decl, type(arg))  # a long long scalar
                    converted.append(int(arg))
            self.fake.launched.append((kernel.name, types_, grid[0], block[0]))
            getattr(self.fake.lib, kernel.symbol(types_))(grid[0], block[0], *converted)

        return launch


def fake_cublas(fake: FakeCupy) -> types.ModuleType:
    """cupy_backends.cuda.libs.cublas: constants and gemmStridedBatchedEx."""
    module = types.ModuleType("cupy_backends.cuda.libs.cublas")
    module.CUBLAS_COMPUTE_32F, module.CUBLAS_COMPUTE_64F = 68, 70
    module.CUBLAS_OP_N, module.CUBLAS_OP_T = 0, 1
    module.CUBLAS_POINTER_MODE_HOST, module.CUBLAS_GEMM_DEFAULT = 0, -1
    module.calls = []
    module.setPointerMode = lambda handle, mode: module.calls.append(("mode", handle, mode))

    def gemm(handle, transa, transb, m, n, k, alpha, a, atype, lda, stride_a, b, btype, ldb,
             stride_b, beta, c, ctype, ldc, stride_c, batch, compute, algo):  # fmt: skip
        assert handle == 7 and algo == -1 and module.calls[-1] == ("mode", 7, 0)
        a_buf, off_a = fake.resolve(a, CUDA_DTYPES[atype])
        b_buf, off_b = fake.resolve(b, CUDA_DTYPES[btype])
        c_buf, off_c = fake.resolve(c, CUDA_DTYPES[ctype])
        wide = a_buf.dtype == np.float64
        assert compute == (70 if wide else 68)  # fp32 compute for fp16 and fp32
        scale = ctypes.c_double if wide else ctypes.c_float
        assert scale.from_address(alpha).value == 1.0
        call = plan.GemmCall(bool(transa), bool(transb), m, n, k, lda, ldb, ldc, off_a, off_b,
                             off_c, stride_a, stride_b, stride_c, batch,
                             scale.from_address(beta).value)  # fmt: skip
        module.calls.append(("gemm", call, atype, btype, ctype))
        host.gemm_reference(call, a_buf, b_buf, c_buf)

    module.gemmStridedBatchedEx = gemm
    return module


def install(monkeypatch, lib, device_count=1) -> FakeCupy:
    """Put the fake in sys.modules (cupy and cupy_backends.cuda.libs.cublas)."""
    fake = FakeCupy(lib, device_count)
    cublas = fake_cublas(fake)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["cupy_backends.cuda.libs"].cublas = cublas
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.cublas", cublas)
    fake.cublas = cublas
    from mconv.backends import cupy_backend

    monkeypatch.setattr(cupy_backend, "_backends", {})
    return fake
