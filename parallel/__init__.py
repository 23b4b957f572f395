"""mpi4py (+NCCL) data-parallel and group/channel-parallel execution.

Not implemented in this release: the package exists so that the
distribution's layout is final. Its API is specified in DESIGN.md
(``init``, ``DataParallel``, ``GroupParallelConv2d``, ...) and arrives with
the parallel issue.
"""

__all__: list[str] = []
