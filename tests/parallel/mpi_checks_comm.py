"""Checks of ``parallel.init`` and the Communicator's collectives (run under mpiexec).

Reference: every rank regenerates every rank's input from its seed and
computes the collective's result with plain NumPy (float64 for floats).
Sizes are odd on purpose (7, 11, uneven blocks, empty blocks), inputs are
non-contiguous views as well as contiguous arrays, and each dtype is used.
"""

from __future__ import annotations

import sys

import numpy as np
from mpi_harness import check

import parallel

FLOATS = (np.float16, np.float32, np.float64)
REDUCE_TOL = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-15}


def data(rank: int, shape, dtype, seed: int = 0):
    """Rank ``rank``'s deterministic input (small values, so integer sums never overflow)."""
    rng = np.random.default_rng([seed, rank])
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    low = 0 if dtype.kind == "u" else -20
    return rng.integers(low, 20, size=shape).astype(dtype)


def reference_reduce(arrays, op):
    stack = np.stack([a.astype(np.float64) if a.dtype.kind == "f" else a for a in arrays])
    return {"sum": stack.sum(0), "mean": stack.mean(0), "max": stack.max(0), "min": stack.min(0)}[
        op
    ]


@check()
def allreduce_dtypes_ops_shapes(comm, t):
    for dtype in (*FLOATS, np.int32, np.int64, np.uint8):
        for op in parallel.REDUCE_OPS:
            if op == "mean" and np.dtype(dtype).kind != "f":
                t.raises(
                    TypeError,
                    lambda dtype=dtype, op=op: comm.allreduce(np.ones(3, dtype), op),
                    f"mean of {np.dtype(dtype)}",
                )
                continue
            for shape in [(7,), (3, 5), (2, 3, 5), (), (0, 3)]:
                arrays = [data(r, shape, dtype) for r in range(comm.size)]
                expected = reference_reduce(arrays, op)
                got = comm.allreduce(arrays[comm.rank], op)
                what = f"allreduce {op} {np.dtype(dtype)} {shape}"
                t.true(got.dtype == np.dtype(dtype) and got.shape == shape, f"{what}: dtype/shape")
                if np.dtype(dtype).kind == "f":
                    t.close(got, expected, what, REDUCE_TOL[dtype])
                else:
                    t.equal(got, expected.astype(dtype), what)


@check()
def allreduce_non_contiguous_and_in_place(comm, t):
    for dtype in FLOATS:
        bases = [data(r, (6, 10), dtype, seed=1) for r in range(comm.size)]
        for view in (lambda a: a[::2, 1::3], lambda a: a.T, lambda a: a[:, ::-1]):
            expected = reference_reduce([view(b) for b in bases], "sum")
            mine = view(bases[comm.rank])
            t.close(comm.allreduce(mine), expected, f"strided {np.dtype(dtype)}", REDUCE_TOL[dtype])
            copy = mine.copy()
            back = comm.allreduce(copy, "mean", out=copy)
            t.true(back is copy, "allreduce(out=x) returns x")
            t.close(
                copy, expected / comm.size, f"in place mean {np.dtype(dtype)}", REDUCE_TOL[dtype]
            )
        target = np.empty((10, 6), dtype=dtype).T  # a strided out
        comm.allreduce(bases[comm.rank], "max", out=target)
        t.close(target, reference_reduce(bases, "max"), "strided out", 0.0)


@check()
def fp16_reduces_through_fp32(comm, t):
    # fp16 overflows past 65504: only an fp32 wire gets the mean of 40000s right.
    got = comm.allreduce(np.full(5, 40000, dtype=np.float16), "mean")
    t.equal(got, np.full(5, 40000, dtype=np.float16), "fp16 mean of 40000")
    parts = comm.reduce_scatter(np.full((comm.size, 2), 40000, dtype=np.float16), 0, "mean")
    t.equal(parts, np.full((1, 2), 40000, dtype=np.float16), "fp16 reduce_scatter mean")


@check()
def allgather_uneven_axes_dtypes(comm, t):
    for dtype in (*FLOATS, np.int64, np.uint8, np.bool_):
        for axis in (0, 1, -1):
            shapes = []
            for r in range(comm.size):
                shape = [2, 3, 4]
                shape[axis] = r % 3  # rank 0 (and 3) send nothing along axis
                shapes.append(tuple(shape))
            arrays = [data(r, shapes[r], dtype, seed=2) for r in range(comm.size)]
            got = comm.allgather(arrays[comm.rank], axis=axis)
            t.equal(
                got, np.concatenate(arrays, axis=axis), f"allgather {np.dtype(dtype)} axis={axis}"
            )
        bases = [data(r, (5, 8), dtype, seed=3) for r in range(comm.size)]
        got = comm.allgather(
            bases[comm.rank][1::2, ::-3], axis=1, sizes=[3] * comm.size, check=False
        )
        t.equal(
            got,
            np.concatenate([b[1::2, ::-3] for b in bases], axis=1),
            f"strided allgather {np.dtype(dtype)}",
        )
    scalars = comm.allgather(np.float64(comm.rank))
    t.equal(scalars, np.arange(comm.size, dtype=np.float64), "allgather of 0-d arrays")


@check()
def reduce_scatter_odd_sizes(comm, t):
    for dtype in (*FLOATS, np.int32):
        for axis, shape in [(0, (7, 3)), (1, (2, 5, 3)), (-1, (3, 4, 11))]:
            for op in ("sum", "mean", "max") if np.dtype(dtype).kind == "f" else ("sum", "min"):
                arrays = [data(r, shape, dtype, seed=4) for r in range(comm.size)]
                full = reference_reduce(arrays, op)
                n = shape[axis]
                block = parallel.shard_range(n, comm)
                expected = np.take(full, list(block), axis=axis)
                got = comm.reduce_scatter(arrays[comm.rank], axis=axis, op=op)
                what = f"reduce_scatter {op} {np.dtype(dtype)} axis={axis}"
                t.true(got.dtype == np.dtype(dtype), f"{what}: dtype {got.dtype}")
                t.close(got, expected, what, REDUCE_TOL.get(dtype, 0.0))
    sizes = [7 - (comm.size - 1)] + [1] * (comm.size - 1)
    arrays = [data(r, (3, 7), np.float64, seed=5) for r in range(comm.size)]
    start = sum(sizes[: comm.rank])
    expected = reference_reduce(arrays, "sum")[:, start : start + sizes[comm.rank]]
    got = comm.reduce_scatter(arrays[comm.rank][:, ::-1][:, ::-1], axis=1, sizes=sizes)
    t.close(got, expected, "reduce_scatter with explicit sizes")


@check()
def broadcast_and_alltoall(comm, t):
    root = comm.size - 1
    for dtype in (*FLOATS, np.int64, np.bool_):
        source = data(root, (5, 7), dtype, seed=6)
        mine = source[::2, 1::2] if comm.rank == root else None
        got = comm.broadcast(mine, root=root)
        t.equal(got, source[::2, 1::2], f"broadcast {np.dtype(dtype)}")
        buf = source.copy() if comm.rank == root else np.zeros_like(source)
        comm.broadcast_into(buf, root=root)
        t.equal(buf, source, f"broadcast_into {np.dtype(dtype)}")
        n = 2 * comm.size + 1
        sizes = parallel.shard_sizes(n, comm.size)
        for split_axis, concat_axis in [(0, 0), (0, 1), (2, 0)]:
            shape = [3, 4, 5]
            shape[split_axis] = n
            arrays = [data(r, tuple(shape), dtype, seed=7) for r in range(comm.size)]
            blocks = [
                np.split(a, np.cumsum(sizes)[:-1], axis=split_axis)[comm.rank] for a in arrays
            ]
            got = comm.alltoall(arrays[comm.rank].T.copy().T, split_axis, concat_axis)
            t.equal(
                got,
                np.concatenate(blocks, axis=concat_axis),
                f"alltoall {np.dtype(dtype)} {split_axis}->{concat_axis}",
            )
    t.equal(
        comm.broadcast(np.float32(3.5) if comm.rank == 0 else None),
        np.array(3.5, np.float32),
        "0-d broadcast",
    )


@check()
def collective_argument_errors(comm, t):
    x = np.ones((2, 3))
    t.raises(ValueError, lambda: comm.allreduce(x, "avg"), "bad op", match="op.*avg")
    t.raises(TypeError, lambda: comm.allreduce([1.0, 2.0]), "list input", match="got list")
    t.raises(TypeError, lambda: comm.allreduce(x > 0), "bool sum", match="bool")
    t.raises(ValueError, lambda: comm.allgather(x, axis=2), "axis out of range", match="axis=2")
    t.raises(TypeError, lambda: comm.allgather(x, axis=1.0), "float axis", match="axis=1.0")
    t.raises(
        ValueError, lambda: comm.broadcast(x, root=comm.size), "root", match=f"root={comm.size}"
    )
    t.raises(
        ValueError, lambda: comm.reduce_scatter(x, 1, sizes=[3] + [0] * comm.size), "sizes length"
    )
    t.raises(ValueError, lambda: comm.allreduce(x, out=np.ones(3)), "out shape", match="out")
    t.raises(
        ValueError,
        lambda: comm.broadcast_into(x.T, 0),
        "strided broadcast_into",
        match="contiguous",
    )


@check(sizes=(2, 3, 4))
def mismatches_raise_on_every_rank(comm, t):
    dtype = np.float32 if comm.rank == 1 else np.float64
    t.raises(
        ValueError,
        lambda: comm.allgather(np.ones((2, 3), dtype)),
        "allgather dtype mismatch",
        match="rank 1",
    )
    shape = (2, 4) if comm.rank == 1 else (2, 3)
    t.raises(
        ValueError,
        lambda: comm.allgather(np.ones(shape), axis=0),
        "allgather shape mismatch",
        match="rank 1",
    )
    t.raises(
        ValueError, lambda: comm.reduce_scatter(np.ones(shape), axis=0), "reduce_scatter mismatch"
    )
    t.raises(ValueError, lambda: comm.alltoall(np.ones(shape)), "alltoall mismatch")
    t.raises(
        ValueError,
        lambda: comm.check_same(comm.rank == 1, "flag"),
        "check_same",
        match="flag must be the same on every rank, but rank 0 has False and rank 1 has True",
    )
    # after the errors, the communicator still works
    t.equal(comm.allreduce(np.ones(2)), np.full(2, float(comm.size)), "still usable")


@check()
def init_grid_and_split(comm, t):
    t.true(comm.local_size == comm.size and comm.local_rank == comm.rank, f"one host: {comm!r}")
    t.true(comm.device is None and comm.gpu_transport is None, "no GPU here")
    t.true("cupy" not in sys.modules, "the CPU path never imports CuPy")
    again = parallel.init()
    t.true(again.mpi != comm.mpi and again.size == comm.size, "init() duplicates COMM_WORLD")
    t.raises(TypeError, lambda: parallel.init(comm="world"), "init(comm=str)", match="got str")
    t.raises(TypeError, lambda: parallel.init(abort_on_error=1), "init flag type")
    for k in range(1, comm.size + 1):
        if comm.size % k:
            t.raises(
                ValueError,
                lambda k=k: comm.grid(group_parallel=k),
                f"grid({k})",
                match=f"group_parallel={k}",
            )
            continue
        data_comm, group_comm = comm.grid(group_parallel=k)
        t.true((data_comm.size, group_comm.size) == (comm.size // k, k), f"grid({k}) sizes")
        t.true((data_comm.rank, group_comm.rank) == divmod(comm.rank, k), f"grid({k}) ranks")
        members = group_comm.allgather(np.array([comm.rank]))
        t.equal(members, np.arange(k) + (comm.rank // k) * k, f"grid({k}) group members")
        replicas = data_comm.allgather(np.array([comm.rank]))
        t.equal(replicas, np.arange(comm.rank % k, comm.size, k), f"grid({k}) data members")
    t.raises(ValueError, lambda: comm.grid(group_parallel=comm.size + 1), "grid too large")
    t.raises(TypeError, lambda: comm.grid(group_parallel="2"), "grid str", match="group_parallel")
    halves = comm.split(comm.rank % 2)
    t.true(halves.size == len(range(comm.rank % 2, comm.size, 2)), "split sizes")


@check(sizes=(2, 3, 4))
def argument_disagreements_raise_on_every_rank(comm, t):
    """What used to return garbage or leave ranks waiting (each case raises on every rank)."""
    x = data(comm.rank, (4, 2 * comm.size), np.float64, seed=8)
    axis = 1 if comm.rank == 1 else 0
    for op, call in [
        ("allgather", lambda: comm.allgather(x, axis=axis)),
        ("reduce_scatter", lambda: comm.reduce_scatter(np.ones((4, 4 * comm.size)), axis=axis)),
        ("alltoall", lambda: comm.alltoall(np.ones((4, 4)), 0, axis)),
    ]:
        t.raises(ValueError, call, f"{op} with axis differing on rank 1", match="rank 1")
    bad = [2 * comm.size + 1] + [0] * (comm.size - 1) if comm.rank == 0 else None
    sizes = bad or parallel.shard_sizes(2 * comm.size, comm.size)
    t.raises(
        ValueError,
        lambda: comm.reduce_scatter(np.ones((2, 2 * comm.size)), axis=1, sizes=sizes),
        "reduce_scatter sizes bad on rank 0 only",
    )
    mine = np.ones((3, 2))
    t.raises(
        ValueError,
        lambda: comm.allgather(mine, axis=0, sizes=[2] * comm.size, check=False),
        "allgather sizes[rank] != x.shape[axis]",
        match=r"sizes\[\d\] must be this rank's x.shape\[axis\]=3",
    )
    root = comm.size - 1
    for what, value in [("a list", [1.0, 2.0]), ("objects", np.array([None, 1], dtype=object))]:
        t.raises(
            TypeError,
            lambda value=value: comm.broadcast(value if comm.rank == root else None, root=root),
            f"broadcast of {what} from root raises everywhere",
            match=f"on root {root}",
        )
    t.equal(comm.allreduce(np.ones(2)), np.full(2, float(comm.size)), "still usable")


@check()
def structured_and_16_bit_arrays(comm, t):
    kind = np.dtype([("a", "<f4"), ("b", "<i4")])
    source = np.array([(1.5, 2), (3.5, -4)], dtype=kind)
    got = comm.broadcast(source if comm.rank == 0 else None)
    t.true(got.dtype == kind and got.tolist() == source.tolist(), f"structured: {got.dtype}")
    for dtype in (np.int16, np.uint16):
        arrays = [data(r, (5, 2 * comm.size), dtype, seed=9) for r in range(comm.size)]
        for op in ("sum", "max"):
            expected = reference_reduce(arrays, op).astype(dtype)
            got = comm.allreduce(arrays[comm.rank], op)
            t.equal(got, expected, f"allreduce {op} {np.dtype(dtype)}")
            got = comm.reduce_scatter(arrays[comm.rank], axis=1, op=op)
            block = list(parallel.shard_range(2 * comm.size, comm))
            t.equal(got, expected[:, block], f"reduce_scatter {op} {np.dtype(dtype)}")
    wraps = comm.allreduce(np.full(3, 30000, dtype=np.int16))  # wraps as int16 arithmetic does
    t.equal(wraps, (np.full(3, 30000, np.int64) * comm.size).astype(np.int16), "int16 wraps")
