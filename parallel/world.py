"""``init()``: the world communicator, the GPU of each rank, and how a job ends.

An uncaught exception on one rank would leave the others waiting forever in
their next collective. ``init(abort_on_error=True)`` (the default) installs
a ``sys.excepthook`` that prints the traceback and then calls ``MPI_Abort``
on ``COMM_WORLD``, which ends every rank of the job. Launching with
``python -m mpi4py script.py`` does the same for exceptions raised before
``init()`` (and is what docs/parallel.md recommends).

A rank that ends without an exception (``sys.exit``, any code, or the end of
the script) while others still wait for it is no error to Python. With a
timeout (``init(timeout=...)`` or ``MCONV_PARALLEL_TIMEOUT``; see
``parallel.timeout``) the end of the program is a collective too: at exit,
each rank waits, at most the timeout, until every rank has reached its end,
and aborts the job otherwise (as the ranks waiting for it do when their
collective times out). So, with a timeout, ranks must end within the timeout
of one another.

>>> import parallel
>>> comm = parallel.init()
>>> 0 <= comm.rank < comm.size and comm.local_rank <= comm.rank
True
"""

from __future__ import annotations

import atexit
import sys
from typing import Any

from . import gpu
from . import timeout as _timeout
from .comm import Communicator, _mpi

_abort_hook_installed = False
_exit_comm = None  # a duplicate of COMM_WORLD for the exit barrier only


def _install_abort_hook(MPI) -> None:
    """An uncaught exception on one rank prints its traceback and aborts every rank."""
    global _abort_hook_installed
    if _abort_hook_installed:
        return
    previous = sys.excepthook

    def abort_on_error(kind, value, traceback):
        previous(kind, value, traceback)
        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            _timeout.abort_after_message(1)

    sys.excepthook = abort_on_error
    _abort_hook_installed = True


def _end_together() -> None:
    """At exit (with a timeout): wait until every rank has reached its end, or abort."""
    from mpi4py import MPI

    if _timeout.seconds() is None or not MPI.Is_initialized() or MPI.Is_finalized():
        return
    what = "exit (this rank is ending while others have not ended: they are still working, or waiting for this rank in a collective)"  # fmt: skip
    _timeout.wait(_exit_comm.Ibarrier(), what)


def _install_exit_barrier() -> None:
    """Collective over COMM_WORLD, once: the communicator and the atexit hook."""
    global _exit_comm
    if _exit_comm is None:
        _exit_comm = _timeout.dup(_mpi().COMM_WORLD, "init (duplicating COMM_WORLD)")
        atexit.register(_end_together)


def init(
    comm: Any = None, *, timeout: Any = None, abort_on_error: bool = True, bind_gpu: bool = True
) -> Communicator:
    """The world communicator (a duplicate of ``COMM_WORLD``, or of ``comm``); collective.

    ``timeout``: seconds (default: ``MCONV_PARALLEL_TIMEOUT``, else none) that
    any collective may wait before the job is aborted with a message naming
    the rank and the collective; the same on every rank, and for the whole
    process (the last ``init`` sets it). ``abort_on_error``: an uncaught
    exception on any rank aborts the whole job instead of leaving the other
    ranks waiting. ``bind_gpu``: when CuPy sees GPUs, make GPU
    ``local_rank % count`` current (``comm.device``; None on the CPU).
    """
    for name, flag in (("abort_on_error", abort_on_error), ("bind_gpu", bind_gpu)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, but got {name}={flag!r}")
    seconds = _timeout.configure(timeout)  # checked before MPI starts
    MPI = _mpi()
    if comm is None:
        comm = MPI.COMM_WORLD
    elif isinstance(comm, Communicator):
        comm = comm.mpi
    elif not isinstance(comm, MPI.Intracomm):
        raise TypeError(
            f"comm must be an mpi4py Intracomm or a parallel.Communicator, but got "
            f"{type(comm).__name__}"
        )
    if abort_on_error:
        _install_abort_hook(MPI)
    world = Communicator(_timeout.dup(comm))  # a rank that never comes: aborted, not a hang
    world.check_same(repr(seconds), "parallel.init(timeout=...) (or MCONV_PARALLEL_TIMEOUT)")
    if comm.Compare(MPI.COMM_WORLD) in (MPI.IDENT, MPI.CONGRUENT):
        _install_exit_barrier()
    world.device = gpu.bind_device(world.local_rank) if bind_gpu else None
    return world
