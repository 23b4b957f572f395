"""Run a script on the GPU stand-in: ``mpiexec -n P python -m mpi4py stand_in_run.py SCRIPT
ARGS...`` installs the strict CuPy stand-in (tests/cupy_stand_in: 4 GPUs per host, the host
build of the kernels, NCCL) as CuPy in every rank, then runs SCRIPT as ``__main__`` with
ARGS."""

import runpy
import sys

from mpi_harness import stand_in

if __name__ == "__main__":
    stand_in().install(device_count=4, kernels=True)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
