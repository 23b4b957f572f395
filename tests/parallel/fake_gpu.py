"""A CPU stand-in for CuPy and NCCL, to run ``parallel``'s GPU transports in real MPI jobs.

Device arrays are NumPy arrays of a subclass whose type lives in module
``cupy`` (so ``parallel`` takes them for CuPy arrays), with ``.data.ptr``,
``.set()`` and ``.get()``; any other ``cupy.<name>`` is NumPy's, its array
results made device arrays. ``cupy.cuda`` has devices (``Device(i).use()``,
``runtime``), one current stream that counts its synchronisations, and
``nccl``, whose ``NcclCommunicator`` runs each NCCL call as the matching MPI
call on the memory behind the raw pointers, after checking what real NCCL
would leave undefined or refuse:

- every pointer plus count lies inside one live device array (a wrong count
  or byte offset fails instead of reading stray memory);
- the stream is the current one, the dtype and op codes are NCCL's;
- send/recv only inside ``groupStart()``/``groupEnd()``, and never of zero
  bytes (which hang NCCL before 2.12.10);
- two ranks of one communicator may not use the same GPU of one host
  (NCCL's "Duplicate GPU detected").

With ``kernels=True`` the module also has ``RawModule`` and cuBLAS from the
kernel tests' stand-in (tests/kernels/fake_cupy.py: the CUDA kernels built
for the host, GEMMs in NumPy), so ``mconv``'s CuPy backend, and with it the
parallel layers, run on these arrays too.

Only CUDA and NCCL are replaced: ``parallel`` runs unchanged. A fake
communicator is built by splitting ``COMM_WORLD``, so every rank of the job
must build its NCCL communicators at the same time (true of the checks that
use it: each builds them in its first collective on a communicator every
rank has).
"""

from __future__ import annotations

import functools
import importlib.machinery
import sys
import types
import weakref
from pathlib import Path

import numpy as np

_LIVE: dict[int, weakref.ref] = {}  # id -> every live device array, to resolve raw pointers
HOST_COPIES = [0]  # ndarray.set() calls (host -> device copies)
_CURRENT = [0]  # the current device


class ndarray(np.ndarray):  # noqa: N801 - CuPy's name
    __module__ = "cupy._core.core"

    def __array_finalize__(self, obj):
        key = id(self)
        _LIVE[key] = weakref.ref(self, lambda _, key=key: _LIVE.pop(key, None))
        self._device = getattr(obj, "_device", _CURRENT[0])  # a view stays where its base is

    @property
    def device(self):
        return types.SimpleNamespace(id=self._device)

    def __array_function__(self, func, types_, args, kwargs):
        """NumPy functions on device arrays return device arrays (CuPy's NEP 18 dispatch)."""
        return on_device(super().__array_function__(func, types_, args, kwargs))

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self):
        return np.array(self.view(np.ndarray))

    def set(self, arr):
        """Host -> device copy; like CuPy, shape and dtype must match and self be contiguous."""
        if isinstance(arr, ndarray) or not isinstance(arr, np.ndarray):
            raise TypeError(f"set() takes a host numpy array, got {type(arr).__name__}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set(): {arr.dtype}{arr.shape} into {self.dtype}{self.shape}")
        if not self.flags.c_contiguous:
            raise RuntimeError("set() into a non-contiguous device array")
        self.view(np.ndarray)[...] = arr
        HOST_COPIES[0] += 1


def on_device(result):
    if isinstance(result, tuple):
        return tuple(on_device(r) for r in result)
    if isinstance(result, np.ndarray) and not isinstance(result, ndarray):
        return result.view(ndarray)
    return result


def _holding(ptr: int, nbytes: int):
    """Every live contiguous device array whose memory holds ``nbytes`` at ``ptr``."""
    for ref in list(_LIVE.values()):
        array = ref()
        if array is not None and array.flags.c_contiguous:
            start = array.ctypes.data
            if start <= ptr and ptr + nbytes <= start + array.nbytes:
                yield array


def resolve(ptr: int, dtype) -> tuple[np.ndarray, int]:
    """The largest live device array of ``dtype`` holding ``ptr``, flat, and the element
    offset of ``ptr`` in it (what the cuBLAS stand-in needs)."""
    arrays = [a for a in _holding(ptr, np.dtype(dtype).itemsize) if a.dtype == dtype]
    if not arrays:
        raise AssertionError(f"pointer {ptr:#x} of {np.dtype(dtype)} is in no device array")
    best = max(arrays, key=lambda a: a.size)
    flat = best.view(np.ndarray).reshape(-1)  # (best.size,)
    return flat, (ptr - best.ctypes.data) // best.itemsize


def memory(ptr: int, nbytes: int) -> np.ndarray:
    """A uint8 view of ``nbytes`` at device pointer ``ptr``, inside one live device array."""
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    for array in _holding(ptr, nbytes):
        start = array.ctypes.data
        raw = array.view(np.ndarray).reshape(-1).view(np.uint8)  # (array.nbytes,)
        return raw[ptr - start : ptr - start + nbytes]
    raise AssertionError(f"{nbytes} bytes at {ptr:#x} lie in no device array")


# -- cupy.cuda -------------------------------------------------------------------------------
class _Stream:
    ptr = 0x5EED

    def __init__(self):
        self.synchronized = 0

    def synchronize(self):
        self.synchronized += 1


class _Runtime:
    def __init__(self, cuda):
        self._cuda = cuda

    def getDeviceCount(self):  # noqa: N802 - CUDA's name
        return self._cuda.device_count

    def getDevice(self):  # noqa: N802
        return _CURRENT[0]


def _cuda_module(device_count: int) -> types.ModuleType:
    cuda = types.ModuleType("cupy.cuda")
    cuda.device_count = device_count
    cuda.runtime = _Runtime(cuda)
    stream = _Stream()
    cuda.get_current_stream = lambda: stream
    cuda.device = types.SimpleNamespace(get_cublas_handle=lambda: 7)  # fake_cupy's handle

    class Device:
        mem_info = (2**30, 2**31)  # (free, total) bytes

        def __init__(self, index=None):
            self.id = _CURRENT[0] if index is None else index

        @property
        def pci_bus_id(self):
            return f"0000:{self.id + 0x17:02x}:00.0"

        def use(self):
            if not 0 <= self.id < cuda.device_count:
                raise ValueError(f"no device {self.id} (count {cuda.device_count})")
            _CURRENT[0] = self.id

        def __enter__(self):
            self._previous = _CURRENT[0]
            self.use()
            return self

        def __exit__(self, *exc):
            _CURRENT[0] = self._previous
            return False

    cuda.Device = Device
    cuda.nccl = _nccl_module(cuda)
    return cuda


# -- cupy.cuda.nccl --------------------------------------------------------------------------
def _nccl_module(cuda) -> types.ModuleType:
    from mpi4py import MPI

    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = True
    nccl.get_version = lambda: 21805
    nccl.calls = []  # (method name, count) of every call
    types_ = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64,
              6: np.float16, 7: np.float32, 8: np.float64}  # fmt: skip
    for code, name in enumerate(("INT8", "UINT8", "INT32", "UINT32", "INT64", "UINT64")):
        setattr(nccl, f"NCCL_{name}", code)
    nccl.NCCL_FLOAT16, nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64 = 6, 7, 8
    ops = {0: MPI.SUM, 1: MPI.PROD, 2: MPI.MAX, 3: MPI.MIN}
    nccl.NCCL_SUM, nccl.NCCL_PROD, nccl.NCCL_MAX, nccl.NCCL_MIN = 0, 1, 2, 3
    made = [0]  # unique ids made by this rank
    group: list | None = None  # send/recv calls since groupStart

    class NcclError(RuntimeError):
        pass

    def get_unique_id():
        made[0] += 1
        return (MPI.COMM_WORLD.Get_rank(), made[0]) + (0,) * 126

    def group_start():
        nonlocal group
        if group is not None:
            raise NcclError("nested groupStart")
        group = []

    def group_end():
        nonlocal group
        calls, group = group, None
        if calls is None:
            raise NcclError("groupEnd without groupStart")
        requests = []
        for kind, comm, buf, peer in calls:  # all posted, then all waited for: no ordering deadlock
            if kind == "send":
                requests.append(comm.Isend(buf.copy(), dest=peer, tag=77))
            else:
                requests.append(comm.Irecv(buf, source=peer, tag=77))
        MPI.Request.Waitall(requests)

    class NcclCommunicator:
        def __init__(self, ndev, commId, rank):  # noqa: N803 - CuPy's names
            if not (isinstance(commId, tuple) and len(commId) == 128):
                raise NcclError(f"commId must be get_unique_id()'s tuple, got {commId!r}")
            creator, serial = commId[:2]
            self.mpi = MPI.COMM_WORLD.Split(creator * 4096 + serial, key=rank)
            if (self.mpi.Get_size(), self.mpi.Get_rank()) != (ndev, rank):
                raise NcclError(f"ndev={ndev}, rank={rank} disagree with the ranks that joined")
            self.rank, self.size = rank, ndev
            gpus = self.mpi.allgather((MPI.Get_processor_name(), cuda.Device().pci_bus_id))
            if len(set(gpus)) < len(gpus):
                raise NcclError(f"invalid usage: Duplicate GPU detected ({gpus})")

        def _typed(self, ptr, count, datatype):
            dtype = np.dtype(types_[datatype])
            return memory(ptr, count * dtype.itemsize).view(dtype)

        def _check(self, name, count, stream, op=None):
            nccl.calls.append((name, count))
            if stream != cuda.get_current_stream().ptr:
                raise NcclError(f"{name}: stream {stream!r} is not the current stream")
            if op is not None and op not in ops:
                raise NcclError(f"{name}: op {op!r}")

        def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802
            self._check("allReduce", count, stream, op)
            recv = self._typed(recvbuf, count, datatype)
            send = MPI.IN_PLACE if sendbuf == recvbuf else self._typed(sendbuf, count, datatype)
            self.mpi.Allreduce(send, recv, op=ops[op])

        def allGather(self, sendbuf, recvbuf, count, datatype, stream):  # noqa: N802
            self._check("allGather", count, stream)
            recv = self._typed(recvbuf, count * self.size, datatype)
            self.mpi.Allgather(self._typed(sendbuf, count, datatype), recv)

        def reduceScatter(self, sendbuf, recvbuf, recvcount, datatype, op, stream):  # noqa: N802
            self._check("reduceScatter", recvcount, stream, op)
            send = self._typed(sendbuf, recvcount * self.size, datatype)
            recv = self._typed(recvbuf, recvcount, datatype)
            self.mpi.Reduce_scatter_block(send, recv, op=ops[op])

        def broadcast(self, sendbuf, recvbuf, count, datatype, root, stream):  # noqa: N802
            self._check("broadcast", count, stream)
            recv = self._typed(recvbuf, count, datatype)
            if self.rank == root and sendbuf != recvbuf:
                recv[...] = self._typed(sendbuf, count, datatype)
            self.mpi.Bcast(recv, root=root)

        def _p2p(self, kind, buf, count, datatype, peer, stream):
            self._check(kind, count, stream)
            if group is None:
                raise NcclError(f"{kind} outside groupStart/groupEnd would block")
            if not 0 <= peer < self.size:
                raise NcclError(f"{kind}: peer {peer} of {self.size}")
            if count == 0:
                raise NcclError(f"{kind} of 0 elements (hangs NCCL before 2.12.10)")
            group.append((kind, self.mpi, self._typed(buf, count, datatype), peer))

        def send(self, sendbuf, count, datatype, peer, stream):
            self._p2p("send", sendbuf, count, datatype, peer, stream)

        def recv(self, recvbuf, count, datatype, peer, stream):
            self._p2p("recv", recvbuf, count, datatype, peer, stream)

    nccl.NcclError, nccl.NcclCommunicator = NcclError, NcclCommunicator
    nccl.get_unique_id, nccl.groupStart, nccl.groupEnd = get_unique_id, group_start, group_end
    return nccl


# -- cupy ------------------------------------------------------------------------------------
class FakeCupy(types.ModuleType):
    """``cupy``: NumPy's functions with device-array results, plus ``asnumpy`` and ``cuda``
    (and, with kernels, ``RawModule``)."""

    def __init__(self, device_count: int, kernel_lib=None):
        super().__init__("cupy")
        self.__spec__ = importlib.machinery.ModuleSpec("cupy", None)
        self.ndarray = ndarray
        self.cuda = _cuda_module(device_count)
        self.lib, self.compiled, self.launched = kernel_lib, [], []
        self.resolve = resolve

    def __getattr__(self, name):
        value = getattr(np, name)
        if not callable(value) or isinstance(value, type):
            return value
        return lambda *args, **kwargs: on_device(value(*args, **kwargs))

    def asarray(self, a, dtype=None):
        return on_device(np.array(a, dtype=dtype))  # always a copy: host -> device

    @staticmethod
    def asnumpy(a):
        return a.get() if isinstance(a, ndarray) else np.asarray(a)

    def RawModule(self, code, options, name_expressions):  # noqa: N802 - CuPy's name
        if self.lib is None:
            raise RuntimeError("fake_gpu was installed without kernels")
        return _kernel_stand_in().FakeCupy.RawModule(self, code, options, name_expressions)


@functools.cache
def _kernel_stand_in():
    """tests/kernels/fake_cupy.py, made to launch kernels on this module's arrays (once)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "kernels"))
    import fake_cupy

    fake_cupy.ndarray = ndarray  # its launcher checks and converts arguments of this type
    return fake_cupy


def install(device_count: int, kernels: bool = False) -> FakeCupy:
    """Put the fake in ``sys.modules`` as cupy, cupy.cuda and cupy.cuda.nccl (and, with
    ``kernels``, cuBLAS as cupy_backends.cuda.libs.cublas; the host build of the kernels
    is made, or taken from its cache, here)."""
    lib = None
    if kernels:
        from mconv.kernels import host

        lib = host.load()
    cupy = FakeCupy(device_count, lib)
    sys.modules.update({"cupy": cupy, "cupy.cuda": cupy.cuda, "cupy.cuda.nccl": cupy.cuda.nccl})
    if kernels:
        cublas = _kernel_stand_in().fake_cublas(cupy)
        for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
            sys.modules[name] = types.ModuleType(name)
        sys.modules["cupy_backends.cuda.libs"].cublas = cublas
        sys.modules["cupy_backends.cuda.libs.cublas"] = cublas
    return cupy
