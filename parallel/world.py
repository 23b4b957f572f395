"""``init()``: the world communicator, the GPU of each rank, and abort-on-error.

An uncaught exception on one rank would leave the others waiting forever in
their next collective. ``init(abort_on_error=True)`` (the default) installs
a ``sys.excepthook`` that prints the traceback and then calls ``MPI_Abort``
on ``COMM_WORLD``, which ends every rank of the job. Launching with
``python -m mpi4py script.py`` does the same for exceptions raised before
``init()`` (and is what docs/parallel.md recommends).

>>> import parallel
>>> comm = parallel.init()
>>> 0 <= comm.rank < comm.size and comm.local_rank <= comm.rank
True
"""

from __future__ import annotations

import sys
from typing import Any

from . import gpu
from .comm import Communicator, _mpi

_abort_hook_installed = False


def _install_abort_hook(MPI) -> None:
    """An uncaught exception on one rank prints its traceback and aborts every rank."""
    global _abort_hook_installed
    if _abort_hook_installed:
        return
    previous = sys.excepthook

    def abort_on_error(kind, value, traceback):
        previous(kind, value, traceback)
        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            sys.stderr.flush()
            MPI.COMM_WORLD.Abort(1)

    sys.excepthook = abort_on_error
    _abort_hook_installed = True


def init(comm: Any = None, *, abort_on_error: bool = True, bind_gpu: bool = True) -> Communicator:
    """The world communicator (a duplicate of ``COMM_WORLD``, or of ``comm``); collective.

    ``abort_on_error``: an uncaught exception on any rank aborts the whole
    job instead of leaving the other ranks waiting. ``bind_gpu``: when CuPy
    sees GPUs, make GPU ``local_rank % count`` current (``comm.device``;
    None on the CPU).
    """
    MPI = _mpi()
    for name, flag in (("abort_on_error", abort_on_error), ("bind_gpu", bind_gpu)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, but got {name}={flag!r}")
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
    world = Communicator(comm.Dup())
    world.device = gpu.bind_device(world.local_rank) if bind_gpu else None
    return world
