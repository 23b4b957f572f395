"""The CuPy side of ``parallel``: device binding and the GPU transports.

Nothing here imports CuPy at module import time, and nothing here runs for
NumPy arrays: the CPU path never touches this file beyond importing it.

For CuPy arrays a communicator picks one transport, the same on every rank,
in this order (``choose_transport``):

1. ``nccl`` — ``cupy.cuda.nccl``, bootstrapped by broadcasting rank 0's
   unique id over MPI;
2. ``cuda-aware-mpi`` — mpi4py on device pointers, when the MPI library is
   CUDA-aware (``MCONV_CUDA_AWARE_MPI=1``; else ``MPIX_Query_cuda_support()``,
   which Open MPI and MPICH 4 provide, MVAPICH's ``MV2_USE_CUDA=1`` or Cray
   MPICH's ``MPICH_GPU_SUPPORT_ENABLED=1``). Open MPI 4 answers from how it
   was built, not how it runs: set ``MCONV_CUDA_AWARE_MPI=0`` where it says
   yes but the transport (UCX without CUDA, say) cannot;
3. ``host`` — copy to host memory, use MPI, copy back.

NCCL also needs every rank of the communicator on a GPU of its own (it
refuses two ranks on one device; GPUs are told apart by host and PCI bus id,
which ``CUDA_VISIBLE_DEVICES`` does not renumber), so more ranks than GPUs
on a host fall back to the next transport; and NCCL 2.7 or later, for
alltoall's send/recv (zero-byte messages, which hang NCCL before 2.12.10,
are never posted). ``MCONV_PARALLEL_GPU_TRANSPORT=nccl|cuda-aware-mpi|host``
forces a choice.

Tested in MPI jobs on a strict CPU stand-in for CuPy and NCCL that checks
every pointer, count, dtype code, device and stream handed to it and queues
NCCL's results on the stream (tests/cupy_stand_in);
tests/gpu/test_gpu_parallel.py runs the same checks on real GPUs, which no
session has had yet.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np

from mconv import _args

from . import timeout
from .transport import MpiTransport, displacements

TRANSPORTS = ("nccl", "cuda-aware-mpi", "host")


is_cupy = _args.is_cupy  # told by the type's module, without importing CuPy


def choose_transport(flags_per_rank, forced: str | None = None) -> str:
    """The first transport every rank can use.

    ``flags_per_rank``: one ``{'nccl': bool, 'cuda-aware-mpi': bool, 'gpu': (host, device)}``
    per rank. NCCL refuses a communicator in which two ranks use one GPU (more
    ranks than GPUs on a host), so it needs every rank's ``gpu`` known and distinct.

    >>> choose_transport([{"nccl": True, "gpu": ("a", 0)}, {"nccl": True, "gpu": ("a", 1)}])
    'nccl'
    >>> choose_transport([{"nccl": True, "cuda-aware-mpi": True, "gpu": ("a", 0)},
    ...                   {"nccl": True, "cuda-aware-mpi": True, "gpu": ("a", 0)}])
    'cuda-aware-mpi'
    """
    if forced is not None:
        if forced not in TRANSPORTS:
            raise ValueError(
                f"MCONV_PARALLEL_GPU_TRANSPORT must be one of {TRANSPORTS}, but got {forced!r}"
            )
        return forced
    gpus = [flags.get("gpu") for flags in flags_per_rank]
    usable = {
        "nccl": None not in gpus and len(set(gpus)) == len(gpus),
        "cuda-aware-mpi": True,
    }
    for name in TRANSPORTS[:-1]:
        if usable[name] and all(flags.get(name, False) for flags in flags_per_rank):
            return name
    return "host"


def cuda_aware_mpi() -> bool:
    """Whether this rank's MPI library can read device pointers (False when unsure)."""
    forced = os.environ.get("MCONV_CUDA_AWARE_MPI")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes")
    if os.environ.get("MV2_USE_CUDA") == "1" or os.environ.get("MPICH_GPU_SUPPORT_ENABLED") == "1":
        return True
    try:
        from mpi4py import MPI

        query = getattr(ctypes.CDLL(MPI.__file__), "MPIX_Query_cuda_support", None)
        return bool(query and query())
    except OSError:
        return False


NCCL_P2P_VERSION = (2, 7)  # ncclSend/ncclRecv


def nccl_version(code: int) -> tuple[int, int, int]:
    """(major, minor, patch) of ``ncclGetVersion``'s code, which NCCL writes as
    X*1000+Y*100+Z up to 2.8 and X*10000+Y*100+Z from 2.9 on.

    >>> nccl_version(2708), nccl_version(21805)
    ((2, 7, 8), (2, 18, 5))
    """
    major = code // 10000 if code >= 10000 else code // 1000
    rest = code % 10000 if code >= 10000 else code % 1000
    return major, rest // 100, rest % 100


def local_flags() -> dict:
    """What this rank can use, and its GPU as (host, PCI bus id); CuPy is imported only if it
    is installed."""
    nccl, device = False, None
    if importlib.util.find_spec("cupy") is not None:
        try:
            import cupy
            from cupy.cuda import nccl as nccl_module
            from mpi4py import MPI

            nccl = bool(nccl_module.available) and (
                nccl_version(nccl_module.get_version())[:2] >= NCCL_P2P_VERSION
            )
            device = (MPI.Get_processor_name(), cupy.cuda.Device().pci_bus_id)
        except Exception:  # a broken CUDA install means: no NCCL
            nccl, device = False, None
    return {"nccl": nccl, "cuda-aware-mpi": cuda_aware_mpi(), "gpu": device}


def bind_device(local_rank: int) -> int | None:
    """Make GPU ``local_rank % count`` current when CuPy sees a GPU; its id, or None."""
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        import cupy

        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # CuPy installed without a usable driver: stay on the CPU
        return None
    if count == 0:
        return None
    device = local_rank % count
    cupy.cuda.Device(device).use()
    return device


def make_transport(mpi_comm):
    """Collective: agree on a transport for CuPy arrays and build it."""
    flags = timeout.allgather_object(mpi_comm, local_flags(), "choosing the GPU transport")
    name = choose_transport(flags, os.environ.get("MCONV_PARALLEL_GPU_TRANSPORT"))
    if name == "nccl":
        return NcclTransport(mpi_comm)
    if name == "cuda-aware-mpi":
        return MpiTransport(mpi_comm, synchronize=True)
    return HostStagingTransport(mpi_comm)


class HostStagingTransport:
    """Device -> host -> MPI -> host -> device."""

    name = "host"

    def __init__(self, mpi_comm):
        self._host = MpiTransport(mpi_comm)

    @staticmethod
    def _call(method, send, recv, *args) -> None:
        import cupy

        host_recv = np.empty(recv.shape, dtype=recv.dtype)  # host: staging
        method(cupy.asnumpy(send), host_recv, *args)
        recv.set(host_recv)

    def allreduce(self, send, recv, op):
        self._call(self._host.allreduce, send, recv, op)

    def allgatherv(self, send, recv, counts):
        self._call(self._host.allgatherv, send, recv, counts)

    def reduce_scatterv(self, send, recv, counts, op):
        self._call(self._host.reduce_scatterv, send, recv, counts, op)

    def bcast(self, buf, root):
        import cupy

        host = cupy.asnumpy(buf)
        self._host.bcast(host, root)
        buf.set(host)

    def alltoallv(self, send, send_counts, recv, recv_counts):
        import cupy

        host_recv = np.empty(recv.shape, dtype=recv.dtype)  # host: staging
        self._host.alltoallv(cupy.asnumpy(send), send_counts, host_recv, recv_counts)
        recv.set(host_recv)


class NcclTransport:
    """NCCL on the current stream of the communicator's GPU (the one current when it was
    built); uneven blocks are padded to the largest one. Buffers on another GPU are refused:
    NCCL would read and write them as memory of its own device.

    With a timeout (``parallel.timeout``) the host waits for each call's work on the stream
    (an event, polled with NCCL's asynchronous error): past the timeout the NCCL
    communicator is aborted (``ncclCommAbort``), then the job. Without one, calls stay
    asynchronous, as NCCL's are.
    """

    name = "nccl"

    def __init__(self, mpi_comm):
        import cupy
        from cupy.cuda import nccl

        self._nccl = nccl
        self.device = cupy.cuda.runtime.getDevice()
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = timeout.bcast_object(mpi_comm, uid, 0, "NCCL set-up (unique id)")
        self._comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._ops = {"sum": nccl.NCCL_SUM, "max": nccl.NCCL_MAX, "min": nccl.NCCL_MIN}
        self._types = {
            "b": nccl.NCCL_INT8,
            "B": nccl.NCCL_UINT8,
            "i": nccl.NCCL_INT32,
            "I": nccl.NCCL_UINT32,
            "l": nccl.NCCL_INT64,
            "L": nccl.NCCL_UINT64,
            "q": nccl.NCCL_INT64,
            "Q": nccl.NCCL_UINT64,
            "f": nccl.NCCL_FLOAT32,
            "d": nccl.NCCL_FLOAT64,
        }

    def _stream(self, *buffers) -> int:
        """The stream to run on, after checking that every buffer is on this GPU."""
        import cupy

        for buf in buffers:
            if buf.device.id != self.device:
                raise ValueError(
                    f"NCCL: this rank's communicator is on cuda:{self.device}, but got an array "
                    f"on cuda:{buf.device.id}; move it there (Module.to / cupy.asarray under "
                    f"cupy.cuda.Device({self.device}))"
                )
        return cupy.cuda.get_current_stream(self.device).ptr

    def _wait(self, op: str) -> None:
        """Within the timeout: the host waits until the stream has run this call."""
        if timeout.seconds() is None:
            return
        import cupy

        event = cupy.cuda.Event(block=False, disable_timing=True)
        event.record(cupy.cuda.get_current_stream(self.device))

        def done() -> bool:
            self._comm.check_async_error()  # raises NcclError for a failed communicator
            return event.done

        timeout.until(done, f"{op} (nccl, {self.size} ranks)", pause=True,
                      on_expiry=self._comm.abort)  # fmt: skip

    def _type(self, array):
        if array.dtype.char not in self._types:
            raise TypeError(f"NCCL reduces ints and fp32/fp64 only, but got dtype={array.dtype}")
        return self._types[array.dtype.char]

    @staticmethod
    def _as_real(*arrays):
        """Complex buffers as their (real, imag) pairs: a sum is the sum of each part."""
        if arrays[0].dtype.kind != "c":
            return arrays
        real = arrays[0].real.dtype
        return tuple(a.view(real) for a in arrays)  # (2 * size,) from (size,)

    def allreduce(self, send, recv, op):
        send, recv = self._as_real(send, recv)
        stream = self._stream(send, recv)
        self._comm.allReduce(
            send.data.ptr, recv.data.ptr, send.size, self._type(send), self._ops[op], stream
        )
        self._wait("allreduce")

    def allgatherv(self, send, recv, counts):
        import cupy

        block = max(counts)
        stream = self._stream(send, recv)
        if all(c == block for c in counts):
            self._comm.allGather(send.data.ptr, recv.data.ptr, block, self._nccl.NCCL_UINT8, stream)
            self._wait("allgather")
            return
        padded = cupy.zeros(block, dtype=cupy.uint8)
        padded[: send.size] = send
        gathered = cupy.empty(block * self.size, dtype=cupy.uint8)
        self._comm.allGather(
            padded.data.ptr, gathered.data.ptr, block, self._nccl.NCCL_UINT8, stream
        )
        self._wait("allgather")
        for r, (start, count) in enumerate(zip(displacements(counts), counts)):
            recv[start : start + count] = gathered[r * block : r * block + count]

    def reduce_scatterv(self, send, recv, counts, op):
        import cupy

        stream = self._stream(send, recv)
        if send.dtype.kind == "c":
            send, recv = self._as_real(send, recv)
            counts = [2 * c for c in counts]
        block = max(counts)
        if any(c != block for c in counts):  # lay block r out at r*block, zero-padded
            padded = cupy.zeros(block * self.size, dtype=send.dtype)
            for r, (start, count) in enumerate(zip(displacements(counts), counts)):
                padded[r * block : r * block + count] = send[start : start + count]
            send = padded
        out = recv if recv.size == block else cupy.empty(block, dtype=recv.dtype)
        self._comm.reduceScatter(
            send.data.ptr, out.data.ptr, block, self._type(send), self._ops[op], stream
        )
        self._wait("reduce_scatter")
        if out is not recv:
            recv[...] = out[: recv.size]

    def bcast(self, buf, root):
        self._comm.broadcast(
            buf.data.ptr, buf.data.ptr, buf.size, self._nccl.NCCL_UINT8, root, self._stream(buf)
        )
        self._wait("broadcast")

    def alltoallv(self, send, send_counts, recv, recv_counts):
        """Grouped send/recv; empty blocks are skipped on both sides (counts agree)."""
        stream, uint8 = self._stream(send, recv), self._nccl.NCCL_UINT8
        self._nccl.groupStart()
        try:  # a group left open would defer every later NCCL call
            for peer, (start, count) in enumerate(zip(displacements(send_counts), send_counts)):
                if count:
                    self._comm.send(send.data.ptr + start, count, uint8, peer, stream)
            for peer, (start, count) in enumerate(zip(displacements(recv_counts), recv_counts)):
                if count:
                    self._comm.recv(recv.data.ptr + start, count, uint8, peer, stream)
        finally:
            self._nccl.groupEnd()
        self._wait("alltoall")
