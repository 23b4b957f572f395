"""Transports: the five collectives on flat, contiguous 1-D buffers.

A ``Communicator`` turns user arrays (any shape, axis, dtype, contiguity)
into flat buffers and hands them to a transport; the transport only moves
bytes or reduces elements. Movement collectives (allgatherv, bcast,
alltoallv) receive ``uint8`` views and counts in bytes; reductions receive
the wire dtype (fp16 already widened to fp32) and counts in elements.

``MpiTransport`` serves NumPy arrays, and CuPy arrays when the MPI library
is CUDA-aware (``synchronize=True`` then waits, before each call, for the
current stream of every device the buffers live on: MPI reads and writes
device memory outside CUDA's stream order). The NCCL and host-staging
transports for CuPy live in ``parallel.gpu``.

Every call posts MPI's non-blocking collective and waits for it within the
job's timeout (``parallel.timeout``).
"""

from __future__ import annotations

import numpy as np

from . import timeout


def displacements(counts) -> list[int]:
    """Exclusive prefix sum: where each rank's block starts."""
    return [int(v) for v in np.concatenate(([0], np.cumsum(counts)[:-1]))]  # host: counts


class MpiTransport:
    """Collectives through mpi4py's buffer interface (NumPy, or CUDA-aware CuPy)."""

    name = "mpi"

    def __init__(self, mpi_comm, synchronize: bool = False):
        from mpi4py import MPI

        self._MPI = MPI
        self.mpi = mpi_comm
        self._ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._synchronize = synchronize
        if synchronize:
            self.name = "cuda-aware-mpi"

    def _wait(self, request, op: str) -> None:
        timeout.wait(request, f"{op} ({self.name}, {self.mpi.Get_size()} ranks)")

    def _sync(self, *buffers) -> None:
        if self._synchronize:
            import cupy

            for device in sorted({b.device.id for b in buffers}):
                cupy.cuda.get_current_stream(device).synchronize()

    def allreduce(self, send, recv, op: str) -> None:
        """recv = op over ranks of send (``recv is send`` reduces in place)."""
        self._sync(send, recv)
        source = self._MPI.IN_PLACE if recv is send else send
        self._wait(self.mpi.Iallreduce(source, recv, op=self._ops[op]), "allreduce")

    def allgatherv(self, send, recv, counts) -> None:
        """recv = the ranks' send blocks (``counts[r]`` bytes each) in rank order."""
        self._sync(send, recv)
        byte = self._MPI.BYTE
        recv_spec = [recv, (list(counts), displacements(counts)), byte]
        self._wait(self.mpi.Iallgatherv([send, byte], recv_spec), "allgather")

    def reduce_scatterv(self, send, recv, counts, op: str) -> None:
        """recv = block ``rank`` (``counts[rank]`` elements) of op over ranks of send."""
        self._sync(send, recv)
        request = self.mpi.Ireduce_scatter(send, recv, recvcounts=list(counts), op=self._ops[op])
        self._wait(request, "reduce_scatter")

    def bcast(self, buf, root: int) -> None:
        self._sync(buf)
        self._wait(self.mpi.Ibcast([buf, self._MPI.BYTE], root=root), "broadcast")

    def alltoallv(self, send, send_counts, recv, recv_counts) -> None:
        """Block j of send (``send_counts[j]`` bytes) goes to rank j; blocks arrive in rank order."""
        self._sync(send, recv)
        byte = self._MPI.BYTE
        request = self.mpi.Ialltoallv(
            [send, (list(send_counts), displacements(send_counts)), byte],
            [recv, (list(recv_counts), displacements(recv_counts)), byte],
        )
        self._wait(request, "alltoall")
