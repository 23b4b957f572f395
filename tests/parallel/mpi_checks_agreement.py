"""Checks that ranks agree before they compute: a parallel layer fed inputs of different batch
or spatial sizes raises the same ValueError on every rank (instead of computing garbage), and
the collectives' bounded (timeout) path gives the same results as the default one."""

from __future__ import annotations

import numpy as np
from mpi_harness import check

import parallel
from parallel import timeout


@check(sizes=(2, 3))
def parallel_layers_refuse_inputs_of_different_sizes(comm, t):
    layers = [
        parallel.GroupParallelConv2d(6, 6, 3, padding=1, groups=6, comm=comm),
        parallel.ColumnParallelConv2d(2, 6, 3, padding=1, comm=comm),
        parallel.RowParallelConv2d(6, 2, 3, padding=1, comm=comm),
    ]
    last = comm.size - 1
    cases = {  # what the last rank passes instead of (2, C, 5, 5)
        "a smaller batch": lambda c: (1, c, 5, 5),
        "another spatial size": lambda c: (2, c, 5, 4),
        "an unbatched input": lambda c: (c, 5, 5),
    }
    for layer in layers:
        name = type(layer).__name__
        channels = layer.in_channels
        for what, odd in cases.items():
            shape = odd(channels) if comm.rank == last else (2, channels, 5, 5)
            x = np.ones(shape, dtype=np.float32)
            err = t.raises(ValueError, lambda: layer(x), f"{name}, {what} on rank {last}",  # noqa: B023
                           match=f"{name}: every rank must pass input of the same batch")  # fmt: skip
            if err is not None:
                t.true(f"rank {last}: " in str(err) and "rank 0: (2, 5, 5)" in str(err),
                       f"{name}, {what}: the message names the ranks and sizes: {err}")  # fmt: skip
        y = layer(np.ones((2, channels, 5, 5), dtype=np.float32))  # still in step afterwards
        t.true(y.shape[0] == 2, f"{name}: agreeing inputs still work")


@check(sizes=(1, 2, 3))
def collectives_with_a_timeout_equal_the_default(comm, t):
    before = timeout.seconds()
    try:
        x = np.arange(7 * (comm.rank + 1), dtype=np.float64).reshape(-1, 7)  # uneven rows
        plain = (comm.allreduce(x[:1]), comm.allgather(x), comm.broadcast_object({"r": 0}))
        timeout.configure(600)
        bounded = (comm.allreduce(x[:1]), comm.allgather(x), comm.broadcast_object({"r": 0}))
        comm.barrier()
        t.equal(bounded[0], plain[0], "allreduce with a timeout")
        t.equal(bounded[1], plain[1], "allgather with a timeout")
        t.true(bounded[2] == plain[2] == {"r": 0}, "broadcast_object with a timeout")
        t.true(comm.allgather_object(comm.rank) == list(range(comm.size)), "allgather_object")
    finally:
        timeout.configure(before)


@check(sizes=(1, 2))
def objects_between_ranks_are_plain_data(comm, t):
    """What a peer sends is read by the restricted unpickler: a class instance never loads."""
    odd = np.float64(1.0) if comm.rank == 0 else 1.0  # numpy scalar: needs a global to load
    for name, call in (("allgather_object", lambda: comm.allgather_object(odd)),
                       ("broadcast_object", lambda: comm.broadcast_object(odd, 0))):  # fmt: skip
        t.raises(TypeError, call, f"{name} of a numpy scalar from rank 0",
                 match=f"{name}: objects sent between ranks must be plain data")  # fmt: skip
    plain = {"a": [1, 2.5, "s", b"b", None, (True,)], "b": {3}}
    t.true(comm.broadcast_object(plain if comm.rank == 0 else None) == plain, "plain data arrives")
