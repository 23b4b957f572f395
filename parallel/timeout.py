"""The job's collective timeout: every blocking wait of ``parallel`` ends, or ends the job.

One setting per process, made by ``parallel.init(timeout=...)`` or, when that is None, the
``MCONV_PARALLEL_TIMEOUT`` environment variable (seconds; unset or empty: no timeout, which
is MPI's own behaviour of waiting forever). With a timeout, a rank that waits longer than
that for a collective to complete prints which rank waited in which collective and then
calls ``MPI_Abort`` on ``COMM_WORLD``, which ends every rank of the job (the model is
PyTorch's process-group timeout).

Every collective is posted as a non-blocking operation and completed by ``until`` (MPI
requests; NCCL's work on a stream, through an event). MPI requests are polled without
sleeping, as MPI's own blocking calls do: MPI makes progress only inside its calls, so a
sleeping rank would slow every large transfer; polling costs what ``MPI_Wait`` costs (see
docs/parallel.md, "Faults", for the measured overhead). Pickled objects travel as bytes
(``allgather_object``, ``bcast_object``): mpi4py's pickle collectives have no non-blocking
form. They carry plain data only (None, bools, ints, floats, strings, bytes, and tuples, lists,
dicts and sets of them) and are read back through ``layouts``' restricted unpickler with an
empty allowlist, like a checkpoint: nothing a peer sends can run code.

>>> seconds_from(None, {"MCONV_PARALLEL_TIMEOUT": "2.5"})
2.5
>>> seconds_from(None, {}) is None
True
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import time
from typing import Any, Callable

import numpy as np

ENV = "MCONV_PARALLEL_TIMEOUT"

_seconds: float | None = None


def check_seconds(value: Any, name: str) -> float:
    """A timeout in seconds: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(
            f"{name} must be a number of seconds (int or float) or None, but got "
            f"{name}={value!r} of type {type(value).__name__}"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number of seconds > 0, but got {name}={value!r}")
    return float(value)


def seconds_from(timeout: Any, environ=os.environ) -> float | None:
    """``timeout`` checked, or else ``MCONV_PARALLEL_TIMEOUT``'s value, or else None."""
    if timeout is not None:
        return check_seconds(timeout, "timeout")
    text = environ.get(ENV, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{ENV} must be a finite number of seconds > 0 (or unset), but got "
                         f"{ENV}={text!r}")  # fmt: skip
    return value


def configure(timeout: Any) -> float | None:
    """Set this process's timeout (``parallel.init`` does); returns it."""
    global _seconds
    _seconds = seconds_from(timeout)
    return _seconds


def seconds() -> float | None:
    """The timeout in force (None: wait forever)."""
    return _seconds


def _world_rank() -> str:
    from mpi4py import MPI

    return f"rank {MPI.COMM_WORLD.Get_rank()}" if MPI.Is_initialized() else "a rank"


def expire(what: str, waited: float, detail: str = "") -> None:
    """Say which rank waited how long in what, then end every rank of the job."""
    sys.stdout.flush()
    sys.stderr.write(
        f"parallel: {_world_rank()} waited {waited:.1f} s in {what}, longer than the timeout "
        f"of {_seconds:g} s (parallel.init(timeout=...) or {ENV}){detail}; aborting the job\n"
    )
    abort_after_message(1)


def abort_after_message(code: int = 1) -> None:
    """:func:`abort_job`, half a second after flushing what this rank wrote: mpiexec forwards
    a message (a timeout's, a traceback) before the abort tears the job down (without the
    pause, a loaded machine lost the failing rank's traceback)."""
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(0.5)
    abort_job(code)


def abort_job(code: int = 1) -> None:
    """``MPI_Abort`` on ``COMM_WORLD``: every rank of the job ends. Where MPICH's abort
    returns (it does when called while Python exits), this process ends here, and mpiexec
    then ends the others."""
    from mpi4py import MPI

    try:
        MPI.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


def until(done: Callable[[], bool], what: str, *, pause: bool = False,
          on_expiry: Callable[[], None] | None = None, detail: str = "") -> None:  # fmt: skip
    """Call ``done()`` until it is true; past the timeout, ``on_expiry()`` then ``expire``.

    ``pause``: sleep between calls (from 20 us, doubling, to 1 ms) where nothing needs this
    thread to make progress (a GPU stream); MPI requests are polled back to back.
    """
    if done():
        return
    start = time.monotonic()
    deadline = math.inf if _seconds is None else start + _seconds
    nap = 2e-5
    while not done():
        now = time.monotonic()
        if now > deadline:
            if on_expiry is not None:
                on_expiry()
            expire(what, now - start, detail)
        if pause:
            time.sleep(nap)
            nap = min(2 * nap, 1e-3)


def wait(request, what: str) -> None:
    """Complete an MPI request within the timeout."""
    until(request.Test, what)


# -- bounded forms of MPI's blocking calls ------------------------------------------------------
def barrier(mpi_comm, what: str = "barrier") -> None:
    wait(mpi_comm.Ibarrier(), what)


def dup(mpi_comm, what: str = "init (duplicating the communicator)"):
    """``mpi_comm.Dup()`` within the timeout (``MPI_Comm_idup``)."""
    new, request = mpi_comm.Idup()
    wait(request, what)
    return new


def allgather_object(mpi_comm, obj: Any, what: str) -> list:
    """Every rank's picklable ``obj`` in rank order (mpi4py's ``allgather``), within the
    timeout: the sizes, then the pickled bytes."""
    pickled = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    data = np.frombuffer(pickled, dtype=np.uint8)  # host: this rank's pickle
    sizes = np.empty(mpi_comm.Get_size(), dtype=np.int64)  # host: byte counts per rank
    wait(mpi_comm.Iallgather(np.array([data.size], dtype=np.int64), sizes), what)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))  # host: where each rank's bytes start
    from mpi4py import MPI

    recv = np.empty(int(sizes.sum()), dtype=np.uint8)  # host: every rank's pickle
    wait(
        mpi_comm.Iallgatherv([data, MPI.BYTE], [recv, (sizes.tolist(), starts.tolist()), MPI.BYTE]),
        what,
    )
    return [_plain(recv[s : s + n], what) for s, n in zip(starts.tolist(), sizes.tolist())]


def bcast_object(mpi_comm, obj: Any, root: int, what: str) -> Any:
    """Root's picklable ``obj`` on every rank (mpi4py's ``bcast``), within the timeout."""
    mine = mpi_comm.Get_rank() == root
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) if mine else b""
    size = np.array([len(data)], dtype=np.int64)  # host: the pickle's byte count
    wait(mpi_comm.Ibcast(size, root=root), what)
    n = int(size[0])
    buf = np.frombuffer(data, np.uint8).copy() if mine else np.empty(n, np.uint8)  # host: pickle
    wait(mpi_comm.Ibcast(buf, root=root), what)
    value = _plain(buf, what)  # root too: a refusal raises on every rank
    return obj if mine else value


def _plain(data, what: str) -> Any:
    """Unpickle plain data (no globals at all), or raise TypeError naming the collective."""
    from layouts.errors import CheckpointError  # noqa: PLC0415 - layouts loads readers
    from layouts.safe_pickle import restricted_load  # noqa: PLC0415

    try:
        return restricted_load(bytes(data), what, allowed={})
    except CheckpointError as error:
        raise TypeError(
            f"{what}: objects sent between ranks must be plain data (None, bools, ints, floats, "
            f"strings, bytes, and tuples, lists, dicts and sets of them), but got: {error}"
        ) from None


# The errors a rank may report to its peers (by name, as plain data), to be raised on each.
REPORTED_ERRORS = {"TypeError": TypeError, "ValueError": ValueError}


def reported_error(kind: str, message: str) -> Exception:
    """The exception a peer reported as ``(kind, message)``: TypeError or ValueError."""
    return REPORTED_ERRORS[kind](message)
