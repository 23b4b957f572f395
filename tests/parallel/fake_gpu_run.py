"""Run a script on the GPU stand-in: ``mpiexec -n P python -m mpi4py fake_gpu_run.py SCRIPT
ARGS...`` installs ``fake_gpu`` (4 GPUs per host, with the host build of the kernels) as CuPy
in every rank, then runs SCRIPT as ``__main__`` with ARGS."""

import runpy
import sys

import fake_gpu

if __name__ == "__main__":
    fake_gpu.install(device_count=4, kernels=True)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
