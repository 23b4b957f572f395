"""Entry point of the GPU jobs: ``mpiexec -n P python -m mpi4py mpi_main_gpu.py OUT``.

Installs the strict CuPy stand-in (tests/cupy_stand_in: 4 GPUs per host, the host build of
the kernels, NCCL) as CuPy before ``parallel.init()`` binds devices, unless ``MCONV_TEST_REAL_GPU=1`` (then CuPy and the GPUs are
real), runs every check of ``mpi_checks_gpu`` registered for P ranks (or
only the names given) and writes the results to OUT on rank 0.
"""

import os
import sys
from mpi_checks_gpu import GPU_CHECKS
from mpi_harness import names_for, run, stand_in

if __name__ == "__main__":  # only then: pytest imports this module to collect doctests
    from mpi4py import MPI

    if os.environ.get("MCONV_TEST_REAL_GPU") != "1":
        stand_in().install(device_count=4, kernels=True)
    out = sys.argv[1] if len(sys.argv) > 1 else None
    names = sys.argv[2:] or names_for(MPI.COMM_WORLD.Get_size(), GPU_CHECKS)
    run(names, out, GPU_CHECKS)
