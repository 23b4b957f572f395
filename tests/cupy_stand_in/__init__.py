"""The one CPU stand-in for CuPy, cuBLAS and NCCL: strict where CuPy is strict.

Installed as ``cupy`` (``install()``), it runs mconv's CuPy backend and
``parallel``'s GPU transports unchanged on a machine without a GPU, and
fails where a real GPU would fail, or would compute garbage:

- **Device arrays are not NumPy arrays.** ``ndarray`` wraps host memory; it is
  no ``numpy.ndarray`` subclass and has no ``__array__``: NumPy operands in
  ufuncs, ``cupy.*`` / ``np.*`` functions on device arrays and item
  assignment raise CuPy's ``TypeError: Unsupported type <class
  'numpy.ndarray'>`` (even 0-d ones; NumPy *scalars* are fine, as in CuPy),
  and ``np.asarray(device_array)`` raises as CuPy does. ``.get()`` and
  ``cupy.asnumpy`` are the way to the host.
- **Devices.** Every array lives on the device that was current when it was
  made; computing on an array while another device is current raises CuPy's
  "different from the current device" ``ValueError``. Kernels run only on the
  device their module was loaded on; cuBLAS handles and NCCL communicators
  belong to one device and refuse pointers of another.
- **Streams, asynchronously.** Each device has a current stream
  (``cuda.get_current_stream(device_id)``, ``Stream``, ``with stream:``).
  Every write to device memory (kernels, GEMMs, ufuncs, item assignment,
  host-to-device copies, NCCL results) is queued on the stream that was
  current, or given, and reaches memory only when that stream runs: at the
  stream's next operation, ``stream.synchronize()``, ``Device.synchronize()``
  or a ``.get()`` on it. Until then the memory of a new array holds poison
  (all bits set: NaN, -1). So a reader that bypasses the stream — MPI on a
  raw pointer (``__cuda_array_interface__``), another stream — sees poison
  where a synchronisation is missing, and using an array on one stream while
  another stream still has a write to it queued raises ``RaceError``.
- **cuBLAS** (``cupy_backends.cuda.libs.cublas``): ``gemmStridedBatchedEx``
  resolves every raw pointer to a live device array (the whole operand must
  lie inside it), checks the handle, pointer mode, dtype and compute codes,
  that fp16 outputs are computed with
  ``CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION`` set, and runs the
  NumPy emulation of ``mconv.kernels.host``.
- **RawModule** launches the host build of each kernel (``mconv.kernels.host``:
  the same ``.cu`` sources under g++), after checking the name expression,
  grid and block, that pointers are contiguous device arrays on the module's
  device and scalars ``numpy.int64``.
- **NCCL** (``cuda.nccl``, with ``kernels`` or not): each call is checked as
  real NCCL would need it (pointer and count inside one live array on the
  communicator's device, a stream of that device, NCCL's dtype and op codes,
  send/recv only between ``groupStart``/``groupEnd`` and never of 0 bytes, no
  two ranks on one GPU), then done as the matching MPI call on the host copy
  of the data, its result queued on the given stream. ``get_version()``
  encodes versions as NCCL does (2.7.8 -> 2708, 2.18.5 -> 21805).

Only the hardware is replaced: the code under test runs unchanged. The
stand-in errs on the strict side where CuPy's behaviour depends on the
machine (peer access between GPUs is never assumed).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

import numpy as np

from . import device
from .arrays import empty, ndarray, new_array, run, unsupported
from .cublas import make_cublas
from .device import Device, Event, RaceError, State, TrackedStream, current_stream, make_runtime
from .device import version_code
from .kernels import RawModule
from .nccl import make_nccl

__all__ = ["MODULES", "FakeCupy", "RaceError", "install", "ndarray", "version_code"]

#: The modules ``install`` puts in ``sys.modules``.
MODULES = ("cupy", "cupy.cuda", "cupy.cuda.nccl", "cupy_backends", "cupy_backends.cuda",
           "cupy_backends.cuda.libs", "cupy_backends.cuda.libs.cublas", "cupyx", "cupyx.scipy",
           "cupyx.scipy.special")  # fmt: skip
_DTYPE_FUNCTIONS = {"dtype", "result_type", "promote_types", "issubdtype", "can_cast", "iinfo",
                    "finfo"}  # fmt: skip


def _cuda(state: State, with_nccl: bool) -> types.ModuleType:
    cuda = types.ModuleType("cupy.cuda")
    cuda.Device, cuda.Stream, cuda.runtime = Device, TrackedStream, make_runtime(state)
    cuda.Event = Event
    cuda.get_current_stream = lambda device_id=-1: current_stream(device_id)
    cuda.device = types.SimpleNamespace(get_cublas_handle=lambda: 1000 + state.device)
    if with_nccl:
        cuda.nccl = make_nccl(state)
    return cuda


class FakeCupy(types.ModuleType):
    """``cupy``: CuPy's functions by NumPy's names, strict about operands; host <-> device
    copies; ``get_array_module``, ``RawModule`` and ``cuda``."""

    def __init__(self, state: State, kernel_lib, with_nccl: bool):
        super().__init__("cupy")
        self.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
        self.__version__ = "13.6.0+stand-in"
        self.ndarray, self.RawModule, self.empty = ndarray, RawModule, empty
        self.state, self.lib = state, kernel_lib
        self.cuda = _cuda(state, with_nccl)
        self.compiled: list[dict] = []  # RawModule(...) arguments
        self.launched: list[tuple] = []  # (kernel, types, grid, block)

    def __getattr__(self, name):
        value = getattr(np, name)  # AttributeError for what NumPy has not either
        if not callable(value) or isinstance(value, type) or name in _DTYPE_FUNCTIONS:
            return value

        def function(*args, **kwargs):
            if isinstance(value, np.ufunc) and any(
                isinstance(a, ndarray) for a in (*args, *kwargs.values())
            ):  # through ndarray.__array_ufunc__, as NumPy dispatches it
                return value(*args, **kwargs)
            return run(value, args, kwargs, what=f"cupy.{name}")

        function.__name__ = name
        return function

    def asarray(self, a, dtype=None, order=None):
        """A device array as it is (another device's: copied here); host data copied over."""
        if isinstance(a, ndarray):
            if a._buf.device != self.state.device:
                a = a.copy()
            return a if dtype is None else a.astype(dtype, copy=False)
        return new_array(np.array(a, dtype=dtype, order=order or "K"))

    asanyarray = asarray

    def array(self, a, dtype=None, copy=True, order="K"):
        if isinstance(a, ndarray):
            return self.asarray(a).astype(dtype or a.dtype, copy=copy)
        return new_array(np.array(a, dtype=dtype, order=order))

    @staticmethod
    def asnumpy(a, stream=None):
        return a.get(stream) if isinstance(a, ndarray) else np.asarray(a)

    @staticmethod
    def get_array_module(*args):
        return sys.modules["cupy"] if any(isinstance(a, ndarray) for a in args) else np

    @staticmethod
    def copyto(dst, src, casting="same_kind", where=True):
        """``dst[...] = src``: a device write, queued on the current stream."""
        if not isinstance(dst, ndarray) or where is not True:
            raise unsupported(dst if not isinstance(dst, ndarray) else where)
        dst[...] = src

    @staticmethod
    def empty_like(a, dtype=None):
        if not isinstance(a, ndarray):
            raise unsupported(a)
        return empty(a.shape, dtype=dtype or a.dtype)


def _cupyx() -> dict:
    """cupyx.scipy.special.erf/erfc: elementwise kernels (math's on the host memory)."""
    import math

    special = types.ModuleType("cupyx.scipy.special")
    for name in ("erf", "erfc"):
        fn = np.frompyfunc(getattr(math, name), 1, 1)
        kernel = (lambda f: lambda a: f(a).astype(a.dtype))(fn)
        setattr(special, name, (lambda k, n: lambda x: run(k, (x,), {}, what=n))(kernel, name))
    scipy = types.ModuleType("cupyx.scipy")
    scipy.special = special
    cupyx = types.ModuleType("cupyx")
    cupyx.scipy = scipy
    return {"cupyx": cupyx, "cupyx.scipy": scipy, "cupyx.scipy.special": special}


def install(device_count: int = 1, kernels: bool = False, nccl: bool = True) -> FakeCupy:
    """Put the stand-in in ``sys.modules`` (``MODULES``) with ``device_count`` GPUs, device 0
    current; ``kernels``: RawModule runs the host build of mconv's kernels (made, or taken
    from its cache, here); ``nccl``: with ``cupy.cuda.nccl`` (which needs mpi4py). Returns
    the ``cupy`` module. Arrays of an earlier install stop working."""
    lib = None
    if kernels:
        from mconv.kernels import host

        lib = host.load()
    state = device.reset(device_count)
    cupy = FakeCupy(state, lib, nccl)
    cupy.cublas = make_cublas(state)
    sys.modules.update({"cupy": cupy, "cupy.cuda": cupy.cuda})
    if nccl:
        sys.modules["cupy.cuda.nccl"] = cupy.cuda.nccl
    for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["cupy_backends.cuda.libs"].cublas = cupy.cublas
    sys.modules["cupy_backends.cuda.libs.cublas"] = cupy.cublas
    sys.modules.update(_cupyx())
    from mconv.backends import cupy_backend

    cupy_backend._backends.clear()  # executors of an earlier install hold its arrays
    return cupy
