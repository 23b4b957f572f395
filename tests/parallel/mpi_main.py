"""Entry point of the check jobs: ``mpiexec -n P python -m mpi4py mpi_main.py OUT [names...]``.

Runs every check registered for P ranks (or only ``names``) and writes the
results to OUT on rank 0.
"""

import sys

import mpi_checks_agreement  # noqa: F401  (registers checks)
import mpi_checks_comm  # noqa: F401
import mpi_checks_layers  # noqa: F401
import mpi_checks_norm  # noqa: F401
import mpi_checks_training  # noqa: F401
from mpi_harness import names_for, run

if __name__ == "__main__":
    from mpi4py import MPI

    out = sys.argv[1] if len(sys.argv) > 1 else None
    names = sys.argv[2:] or names_for(MPI.COMM_WORLD.Get_size())
    run(names, out)
