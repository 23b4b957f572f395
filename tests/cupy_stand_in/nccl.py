"""``cupy.cuda.nccl``: each call checked as NCCL needs it, then done as MPI on the host copy,
its result queued on the given stream."""

from __future__ import annotations

import functools
import types

import numpy as np

from .device import NCCL_VERSION, Device, State, Stream, raw_bytes, resolve, stream_by_ptr


def make_nccl(state: State) -> types.ModuleType:
    nccl = types.ModuleType("cupy.cuda.nccl")
    nccl.available = True
    nccl.get_version = lambda: NCCL_VERSION
    nccl.calls = []  # (method name, count) of every call
    codes = {0: np.int8, 1: np.uint8, 2: np.int32, 3: np.uint32, 4: np.int64, 5: np.uint64,
             6: np.float16, 7: np.float32, 8: np.float64}  # fmt: skip
    for code, name in enumerate(("INT8", "UINT8", "INT32", "UINT32", "INT64", "UINT64")):
        setattr(nccl, f"NCCL_{name}", code)
    nccl.NCCL_FLOAT16, nccl.NCCL_FLOAT32, nccl.NCCL_FLOAT64 = 6, 7, 8
    op_names = {0: "SUM", 1: "PROD", 2: "MAX", 3: "MIN"}
    for code, name in op_names.items():
        setattr(nccl, f"NCCL_{name}", code)
    made = [0]
    group: list | None = None

    class NcclError(RuntimeError):
        pass

    def get_unique_id():
        from mpi4py import MPI

        made[0] += 1
        return (MPI.COMM_WORLD.Get_rank(), made[0]) + (0,) * 126

    def group_start():
        nonlocal group
        if group is not None:
            raise NcclError("nested groupStart")
        group = []

    def group_end():
        nonlocal group
        from mpi4py import MPI

        calls, group = group, None
        if calls is None:
            raise NcclError("groupEnd without groupStart")
        requests, received = [], []
        for kind, comm, buf, peer, stream, target in calls:  # all posted, then all waited for
            if kind == "send":
                requests.append(comm.Isend(buf.copy(), dest=peer, tag=77))
            else:
                scratch = np.empty_like(buf)
                requests.append(comm.Irecv(scratch, source=peer, tag=77))
                received.append((stream, target, buf, scratch))
        MPI.Request.Waitall(requests)
        for stream, target, buf, scratch in received:
            NcclCommunicator._deliver(stream, target, buf, scratch)

    class NcclCommunicator:
        def __init__(self, ndev, commId, rank):  # noqa: N803 - CuPy's names
            from mpi4py import MPI

            if not (isinstance(commId, tuple) and len(commId) == 128):
                raise NcclError(f"commId must be get_unique_id()'s tuple, got {commId!r}")
            creator, serial = commId[:2]
            self.mpi = MPI.COMM_WORLD.Split(creator * 4096 + serial, key=rank)
            if (self.mpi.Get_size(), self.mpi.Get_rank()) != (ndev, rank):
                raise NcclError(f"ndev={ndev}, rank={rank} disagree with the ranks that joined")
            self.rank, self.size, self.device = rank, ndev, state.device
            self.aborted = False
            gpus = self.mpi.allgather((MPI.Get_processor_name(), Device().pci_bus_id))
            if len(set(gpus)) < len(gpus):
                raise NcclError(f"invalid usage: Duplicate GPU detected ({gpus})")

        def check_async_error(self) -> None:
            """ncclCommGetAsyncError: raises NcclError once the communicator has failed."""
            if self.aborted:
                raise NcclError("the communicator was aborted")

        def abort(self) -> None:
            """ncclCommAbort."""
            nccl.calls.append(("abort", 0))
            self.aborted = True

        def _stream(self, name, ptr) -> Stream:
            stream = stream_by_ptr(self.device, ptr)
            if stream is None:
                raise NcclError(f"{name}: {ptr!r} is no stream of device {self.device}")
            return stream

        def _memory(self, name, ptr, count, datatype, stream):
            """(allocation, typed memory) of ``count`` elements at ``ptr``: on this
            communicator's device, no write to it queued on another stream. Empty: (None, [])."""
            if datatype not in codes:
                raise NcclError(f"{name}: datatype {datatype!r}")
            dtype = np.dtype(codes[datatype])
            if count == 0:
                return None, np.empty(0, dtype=dtype)
            buffer, offset = resolve(ptr, count * dtype.itemsize, self.device, f"nccl {name}")
            buffer.check_no_race(stream, f"nccl {name}")
            raw = np.frombuffer(raw_bytes(buffer), dtype=np.uint8)
            return buffer, raw[offset : offset + count * dtype.itemsize].view(dtype)

        @staticmethod
        def _deliver(stream, target, memory, result) -> None:
            """``result`` reaches ``memory`` when ``stream`` runs."""
            if target is not None:
                stream.enqueue(target, functools.partial(np.copyto, memory, result))

        def _begin(self, name, count, stream_ptr, op=None) -> Stream:
            nccl.calls.append((name, count))
            if op is not None and op not in op_names:
                raise NcclError(f"{name}: op {op!r}")
            stream = self._stream(name, stream_ptr)
            stream.catch_up()  # what was queued before on this stream has happened
            return stream

        def _reduce_op(self, op):
            from mpi4py import MPI

            return {0: MPI.SUM, 1: MPI.PROD, 2: MPI.MAX, 3: MPI.MIN}[op]

        def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):  # noqa: N802
            s = self._begin("allReduce", count, stream, op)
            _, send = self._memory("allReduce", sendbuf, count, datatype, s)
            target, recv = self._memory("allReduce", recvbuf, count, datatype, s)
            result = np.empty_like(recv)
            self.mpi.Allreduce(send.copy(), result, op=self._reduce_op(op))
            self._deliver(s, target, recv, result)

        def allGather(self, sendbuf, recvbuf, count, datatype, stream):  # noqa: N802
            s = self._begin("allGather", count, stream)
            _, send = self._memory("allGather", sendbuf, count, datatype, s)
            target, recv = self._memory("allGather", recvbuf, count * self.size, datatype, s)
            result = np.empty_like(recv)
            self.mpi.Allgather(send.copy(), result)
            self._deliver(s, target, recv, result)

        def reduceScatter(self, sendbuf, recvbuf, recvcount, datatype, op, stream):  # noqa: N802
            s = self._begin("reduceScatter", recvcount, stream, op)
            _, send = self._memory("reduceScatter", sendbuf, recvcount * self.size, datatype, s)
            target, recv = self._memory("reduceScatter", recvbuf, recvcount, datatype, s)
            result = np.empty_like(recv)
            self.mpi.Reduce_scatter_block(send.copy(), result, op=self._reduce_op(op))
            self._deliver(s, target, recv, result)

        def broadcast(self, sendbuf, recvbuf, count, datatype, root, stream):  # noqa: N802
            s = self._begin("broadcast", count, stream)
            target, recv = self._memory("broadcast", recvbuf, count, datatype, s)
            result = np.empty_like(recv)
            if self.rank == root:
                result[...] = self._memory("broadcast", sendbuf, count, datatype, s)[1]
            self.mpi.Bcast(result, root=root)
            self._deliver(s, target, recv, result)

        def _p2p(self, kind, ptr, count, datatype, peer, stream_ptr):
            s = self._begin(kind, count, stream_ptr)
            if group is None:
                raise NcclError(f"{kind} outside groupStart/groupEnd would block")
            if not 0 <= peer < self.size:
                raise NcclError(f"{kind}: peer {peer} of {self.size}")
            if count == 0:
                raise NcclError(f"{kind} of 0 elements (hangs NCCL before 2.12.10)")
            target, memory = self._memory(kind, ptr, count, datatype, s)
            group.append((kind, self.mpi, memory, peer, s, target))

        def send(self, sendbuf, count, datatype, peer, stream):
            self._p2p("send", sendbuf, count, datatype, peer, stream)

        def recv(self, recvbuf, count, datatype, peer, stream):
            self._p2p("recv", recvbuf, count, datatype, peer, stream)

    nccl.NcclError, nccl.NcclCommunicator = NcclError, NcclCommunicator
    nccl.get_unique_id, nccl.groupStart, nccl.groupEnd = get_unique_id, group_start, group_end
    return nccl
