"""``init()`` and ``Communicator``: MPI collectives on NumPy and CuPy arrays.

A ``Communicator`` wraps an mpi4py intracommunicator (``init`` duplicates
``COMM_WORLD`` so that ours never mixes with a user's messages). Its
collectives take arrays of any shape, axis, dtype and memory layout:

- ``allreduce(x, op)`` with op ``'sum'``, ``'mean'``, ``'max'``, ``'min'``;
- ``allgather(x, axis)``: the ranks' arrays concatenated along ``axis`` in
  rank order (sizes along ``axis`` may differ);
- ``reduce_scatter(x, axis, op)``: rank r keeps block r (``shard_sizes``) of
  the reduced array;
- ``broadcast(x, root)``; ``alltoall(x, split_axis, concat_axis)``.

fp16 is reduced as fp32 on the wire and rounded once. Movement collectives
send raw bytes, so every dtype works. NumPy arrays go through MPI; CuPy
arrays through the transport chosen in ``parallel.gpu``.

Collectives are called by every rank of the communicator in the same
order. Each waits at most the job's timeout (``parallel.init(timeout=...)``,
``parallel.timeout``) and then aborts the job. With ``check=True`` (the default) a collective first exchanges
shapes and dtypes, and a mismatch raises the same ValueError on every rank.

>>> import numpy as np, parallel
>>> comm = parallel.init()
>>> total = comm.allreduce(np.ones(3, dtype=np.float16))
>>> total.dtype, bool((total == comm.size).all())
(dtype('float16'), True)
>>> comm.allgather(np.full((2, 1), comm.rank), axis=1).shape == (2, comm.size)
True
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mconv import _args
from mconv.precision import accumulator

from . import gpu, timeout
from .sharding import shard_sizes
from .transport import MpiTransport

REDUCE_OPS = ("sum", "mean", "max", "min")


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ImportError(
            "parallel needs mpi4py and an MPI library; install them with "
            "`pip install mpi4py mpich` (the 'mpi' extra of mconv), but got: " + str(err)
        ) from err
    return MPI


def _as_array(x: Any, name: str, op: str):
    """(array module, array) for a NumPy or CuPy array; NumPy scalars become 0-d arrays."""
    if gpu.is_cupy(x):
        return _args.array_module(x), x
    if isinstance(x, np.generic):
        x = np.asarray(x)  # host: a NumPy scalar
    if isinstance(x, np.ndarray):
        return np, x
    raise TypeError(f"{op}: {name} must be a numpy or cupy array, but got {type(x).__name__}")


def _check_axis(axis: Any, ndim: int, name: str, op: str) -> int:
    if not _args.is_int(axis):
        raise TypeError(f"{op}: {name} must be an int, but got {name}={axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{op}: {name} must lie in [-{ndim}, {ndim}) for a {ndim}-D array, but got "
            f"{name}={axis!r}"
        )
    return int(axis) % ndim


def _wire_dtype(dtype, op: str, name: str) -> np.dtype:
    """The dtype a reduction sends: floats their accumulator (fp16 widens to fp32); bool and
    objects are refused."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return accumulator(dtype)
    if dtype.kind in "iu" and dtype.itemsize == 2 and op != "mean":  # NCCL has no 16-bit ints;
        return np.dtype(dtype.kind + "4")  # sums wrap the same once cast back
    if dtype.kind == "c" and op in ("sum", "mean"):
        return dtype
    if dtype.kind in "iu" and op != "mean":
        return dtype
    kinds = "floating-point arrays" if op == "mean" else "floating-point or integer arrays"
    raise TypeError(f"{name}: op={op!r} reduces {kinds}, but got dtype={dtype}")


def _first_difference(a: Any, b: Any) -> tuple[str, str]:
    """Short descriptions of where two values first differ: the first differing item of a
    list, shown as ``name=value`` for ``(name, value)`` pairs."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) == len(b) == 2 and isinstance(a[0], str) and a[0] == b[0]:  # (name, value)
            return f"{a[0]}={a[1]}", f"{b[0]}={b[1]}"
        for item_a, item_b in zip(a, b):
            if item_a != item_b:
                return _first_difference(item_a, item_b)
        if len(a) != len(b):
            return f"{len(a)} items", f"{len(b)} items"
    return repr(a), repr(b)


class Communicator:
    """A group of ranks and its collectives (see the module docstring).

    Built by ``parallel.init()``, ``comm.split()`` and ``comm.grid()``;
    constructing one is collective over ``mpi_comm``.
    """

    def __init__(self, mpi_comm: Any):
        MPI = _mpi()
        if not isinstance(mpi_comm, MPI.Intracomm):
            raise TypeError(
                f"mpi_comm must be an mpi4py Intracomm, but got {type(mpi_comm).__name__}"
            )
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        local = mpi_comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.device = None
        self._host = MpiTransport(mpi_comm)
        self._gpu = None

    def __repr__(self) -> str:
        return (
            f"Communicator(rank={self.rank}, size={self.size}, local_rank={self.local_rank}, "
            f"local_size={self.local_size})"
        )

    # -- plumbing ---------------------------------------------------------------------------
    def _transport(self, xp):
        if xp is np:
            return self._host
        if self._gpu is None:
            self._gpu = gpu.make_transport(self.mpi)
        return self._gpu

    @property
    def gpu_transport(self) -> str | None:
        """The transport chosen for CuPy arrays (None until the first CuPy collective)."""
        return None if self._gpu is None else self._gpu.name

    def _check_root(self, root: Any) -> int:
        if not _args.is_int(root):
            raise TypeError(f"root must be an int, but got root={root!r}")
        if not 0 <= root < self.size:
            raise ValueError(f"root must lie in [0, {self.size}), but got root={root!r}")
        return int(root)

    def _check_sizes(self, sizes: Any, name: str, op: str) -> list[int]:
        if not isinstance(sizes, (list, tuple)) or not all(_args.is_int(s) for s in sizes):
            raise TypeError(f"{op}: {name} must be a list of ints, but got {name}={sizes!r}")
        if len(sizes) != self.size or any(s < 0 for s in sizes):
            raise ValueError(
                f"{op}: {name} must hold {self.size} non-negative ints (one per rank), but got "
                f"{name}={sizes!r}"
            )
        return [int(s) for s in sizes]

    def _check_alike(self, op: str, meta: tuple, what: str) -> list:
        """Exchange ``meta``; raise the same ValueError on every rank unless ``what`` agrees."""
        metas = timeout.allgather_object(self.mpi, meta, f"{op} (checking {what})")
        for r, other in enumerate(metas):
            if other[:-1] != metas[0][:-1]:
                raise ValueError(
                    f"{op}: every rank must pass {what}, but rank 0 passed {metas[0][:-1]} and "
                    f"rank {r} passed {other[:-1]}"
                )
        return metas

    # -- collectives on arrays --------------------------------------------------------------
    def allreduce(self, x: Any, op: str = "sum", *, out: Any = None):
        """Elementwise ``op`` over ranks; ``out`` (may be ``x``) receives the result."""
        xp, x = _as_array(x, "x", "allreduce")
        op = _args.choice(op, REDUCE_OPS, "op")
        wire = _wire_dtype(x.dtype, op, "allreduce")
        if out is not None:
            _, out = _as_array(out, "out", "allreduce")
            if out.shape != x.shape or out.dtype != x.dtype:
                raise ValueError(
                    f"allreduce: out must have x's shape {x.shape} and dtype {x.dtype}, but got "
                    f"out of shape {out.shape} and dtype {out.dtype}"
                )
        flat = xp.ascontiguousarray(x, dtype=wire).reshape(-1)  # (x.size,)
        in_place = out is x or not xp.may_share_memory(flat, x)
        recv = flat if in_place else xp.empty_like(flat)
        self._transport(xp).allreduce(flat, recv, "sum" if op == "mean" else op)
        if op == "mean":
            recv /= self.size
        result = recv.reshape(x.shape)  # (x.shape) from (x.size,)
        if out is None:
            return result.astype(x.dtype, copy=False)
        if not xp.may_share_memory(result, out):
            out[...] = result
        return out

    def allgather(self, x: Any, axis: int = 0, *, sizes: Any = None, check: bool = True):
        """Concatenate every rank's ``x`` along ``axis`` in rank order.

        Sizes along ``axis`` may differ between ranks; ``sizes`` (one per rank)
        skips exchanging them when ``check=False``.
        """
        xp, x = _as_array(x, "x", "allgather")
        axis = _check_axis(axis, max(x.ndim, 1), "axis", "allgather")
        x = x.reshape(1) if x.ndim == 0 else x  # (1,) from ()
        moved = xp.moveaxis(x, axis, 0)  # (x.shape[axis], *other axes)
        if sizes is not None:
            sizes = self._check_sizes(sizes, "sizes", "allgather")
            if sizes[self.rank] != moved.shape[0]:
                raise ValueError(
                    f"allgather: sizes[{self.rank}] must be this rank's x.shape[axis]="
                    f"{moved.shape[0]}, but got sizes={sizes}"
                )
        if check:
            meta = (axis, moved.shape[1:], x.dtype.str, moved.shape[0])
            what = "one axis and arrays of one dtype whose shapes agree outside it"
            found = [m[-1] for m in self._check_alike("allgather", meta, what)]
            if sizes is not None and sizes != found:
                raise ValueError(f"allgather: sizes={sizes} disagrees with the arrays' {found}")
            sizes = found
        elif sizes is None:
            sizes = [moved.shape[0]] * self.size
        row = math.prod(moved.shape[1:]) * x.dtype.itemsize
        send = xp.ascontiguousarray(moved).reshape(-1).view(xp.uint8)  # (bytes,)
        recv = xp.empty(sum(sizes) * row, dtype=xp.uint8)
        self._transport(xp).allgatherv(send, recv, [s * row for s in sizes])
        out = recv.view(x.dtype).reshape(sum(sizes), *moved.shape[1:])  # (total, *other axes)
        return xp.ascontiguousarray(xp.moveaxis(out, 0, axis))

    def reduce_scatter(
        self, x: Any, axis: int = 0, op: str = "sum", *, sizes: Any = None, check: bool = True
    ):
        """Reduce over ranks, then keep block ``rank`` along ``axis``.

        Blocks are ``sizes`` (default ``shard_sizes(x.shape[axis], size)``:
        as equal as possible, the larger ones first).
        """
        xp, x = _as_array(x, "x", "reduce_scatter")
        if x.ndim == 0:
            raise ValueError("reduce_scatter: x must have at least one axis, but got a 0-d array")
        axis = _check_axis(axis, x.ndim, "axis", "reduce_scatter")
        op = _args.choice(op, REDUCE_OPS, "op")
        wire = _wire_dtype(x.dtype, op, "reduce_scatter")
        n = x.shape[axis]
        sizes = (
            shard_sizes(n, self.size)
            if sizes is None
            else self._check_sizes(sizes, "sizes", "reduce_scatter")
        )
        if check:  # first, so that a bad argument raises on every rank, not one
            self._check_alike(
                "reduce_scatter",
                (axis, x.shape, x.dtype.str, sizes, 0),
                "one axis, one sizes and arrays of one shape and dtype",
            )
        if sum(sizes) != n:
            raise ValueError(
                f"reduce_scatter: sizes must add up to x.shape[axis]={n}, but got sizes={sizes}"
            )
        moved = xp.moveaxis(x, axis, 0)  # (n, *other axes)
        per_row = math.prod(moved.shape[1:])
        send = xp.ascontiguousarray(moved, dtype=wire).reshape(-1)  # (n * per_row,)
        recv = xp.empty(sizes[self.rank] * per_row, dtype=wire)
        self._transport(xp).reduce_scatterv(
            send, recv, [s * per_row for s in sizes], "sum" if op == "mean" else op
        )
        if op == "mean":
            recv /= self.size
        block = recv.reshape(sizes[self.rank], *moved.shape[1:])  # (sizes[rank], *other axes)
        return xp.ascontiguousarray(xp.moveaxis(block, 0, axis)).astype(x.dtype, copy=False)

    def broadcast(self, x: Any, root: int = 0):
        """Root's array on every rank (root gets ``x`` itself; other ranks may pass None)."""
        root = self._check_root(root)
        meta = None
        if self.rank == root:  # root's argument errors are sent, so that every rank raises
            try:
                xp, x = _as_array(x, "x", "broadcast")
                if x.dtype.hasobject:
                    raise TypeError(
                        "broadcast: x must not hold Python objects, but got dtype=object"
                    )
                dtype = x.dtype.descr if x.dtype.fields else x.dtype.str  # plain data
                meta = (tuple(int(s) for s in x.shape), dtype, xp.__name__)
            except (TypeError, ValueError) as err:
                meta = ("error", type(err).__name__, str(err))
        meta = timeout.bcast_object(self.mpi, meta, root, "broadcast (shape and dtype)")
        if meta[0] == "error":
            raise timeout.reported_error(meta[1], f"{meta[2]} (on root {root})")
        shape, dtype, module = meta
        if self.rank == root:
            buf = xp.ascontiguousarray(x)
        else:
            xp = np if module == "numpy" else __import__("cupy")
            buf = xp.empty(shape, dtype=np.dtype(dtype))
        self.broadcast_into(buf, root)
        return x if self.rank == root else buf

    def broadcast_into(self, buf: Any, root: int = 0) -> None:
        """In place: every rank passes a C-contiguous array of root's shape and dtype."""
        xp, buf = _as_array(buf, "buf", "broadcast_into")
        if not buf.flags.c_contiguous:
            raise ValueError("broadcast_into: buf must be C-contiguous, but got a strided array")
        raw = buf.reshape(-1).view(xp.uint8)  # (buf.nbytes,) bytes, sharing buf's memory
        self._transport(xp).bcast(raw, self._check_root(root))

    def alltoall(
        self, x: Any, split_axis: int = 0, concat_axis: int | None = None, *, check: bool = True
    ):
        """Split ``x`` along ``split_axis`` into ``size`` blocks (``shard_sizes``), send block j
        to rank j, and concatenate the blocks received along ``concat_axis`` in rank order.

        Every rank passes an array of the same shape and dtype.
        """
        xp, x = _as_array(x, "x", "alltoall")
        if x.ndim == 0:
            raise ValueError("alltoall: x must have at least one axis, but got a 0-d array")
        split_axis = _check_axis(split_axis, x.ndim, "split_axis", "alltoall")
        concat_axis = (
            split_axis
            if concat_axis is None
            else _check_axis(concat_axis, x.ndim, "concat_axis", "alltoall")
        )
        if check:
            self._check_alike(
                "alltoall",
                (split_axis, concat_axis, x.shape, x.dtype.str, 0),
                "one split_axis, one concat_axis and arrays of one shape and dtype",
            )
        sizes = shard_sizes(x.shape[split_axis], self.size)
        moved = xp.moveaxis(x, split_axis, 0)  # (n, *other axes)
        row = math.prod(moved.shape[1:]) * x.dtype.itemsize
        send = xp.ascontiguousarray(moved).reshape(-1).view(xp.uint8)  # (bytes,)
        mine = sizes[self.rank]
        recv = xp.empty(self.size * mine * row, dtype=xp.uint8)
        self._transport(xp).alltoallv(
            send, [s * row for s in sizes], recv, [mine * row] * self.size
        )
        blocks = recv.view(x.dtype).reshape(self.size, mine, *moved.shape[1:])  # (P, mine, *other)
        return xp.concatenate([xp.moveaxis(b, 0, split_axis) for b in blocks], axis=concat_axis)

    # -- objects, groups, control -----------------------------------------------------------
    def allgather_object(self, obj: Any) -> list:
        """Every rank's ``obj`` (plain data: None, bools, ints, floats, strings, bytes, and tuples,
        lists, dicts and sets of them), in rank order. Other objects raise TypeError on every
        rank: what arrives is read by the restricted unpickler and never runs code."""
        return timeout.allgather_object(self.mpi, obj, "allgather_object")

    def broadcast_object(self, obj: Any, root: int = 0) -> Any:
        """Root's ``obj`` (plain data, as ``allgather_object``) on every rank."""
        return timeout.bcast_object(self.mpi, obj, self._check_root(root), "broadcast_object")

    def check_same(self, value: Any, what: str) -> None:
        """Raise the same ValueError on every rank unless ``value`` is equal on all of them."""
        values = timeout.allgather_object(self.mpi, value, f"check_same ({what})")
        for r, other in enumerate(values):
            if other != values[0]:
                mine, theirs = _first_difference(values[0], other)
                raise ValueError(
                    f"{what} must be the same on every rank, but rank 0 has {mine} and rank {r} "
                    f"has {theirs}"
                )

    def barrier(self) -> None:
        timeout.barrier(self.mpi)

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (``MPI_Abort``)."""
        self.mpi.Abort(code)

    def split(self, color: int, key: int | None = None) -> "Communicator":
        """Ranks with the same ``color`` form a new communicator, ordered by ``key``."""
        color = _args.check_int(color, "color", minimum=0)
        key = self.rank if key is None else _args.check_int(key, "key")
        timeout.barrier(self.mpi, "split")  # MPI_Comm_split has no non-blocking form
        return Communicator(self.mpi.Split(color, key))

    def grid(self, group_parallel: int = 1) -> tuple["Communicator", "Communicator"]:
        """``(data_comm, group_comm)`` for P = (P/k data replicas) x (k group shards).

        Rank r is shard ``r % k`` of replica ``r // k``: a group_comm holds k
        consecutive ranks (one host, when ranks fill hosts in order), a
        data_comm the ranks that hold the same shard.
        """
        self.check_same(repr(group_parallel), "grid(group_parallel=...)")
        k = _args.check_int(group_parallel, "group_parallel", minimum=1)
        if self.size % k:
            raise ValueError(
                f"group_parallel must divide the number of ranks ({self.size}), but got "
                f"group_parallel={k}"
            )
        replica, shard = divmod(self.rank, k)
        group_comm = self.split(replica, shard)
        data_comm = self.split(shard, replica)
        return data_comm, group_comm

    def free(self) -> None:
        """Release the MPI communicator (collective)."""
        self.mpi.Free()
