"""parallel on GPUs in real ``mpiexec`` jobs of 1-4 ranks, on the CPU stand-in for CuPy and
NCCL (tests/cupy_stand_in, with the host build of the CUDA kernels; the checks are in
``mpi_checks_gpu``): the transports, DataParallel and the parallel layers.

One job per rank count, as in test_parallel_mpi; each check is reported as
its own test. On real GPUs the same collectives are run by tests/gpu. These
jobs run with a collective timeout (``MCONV_PARALLEL_TIMEOUT``), so every
transport's bounded path is checked here (NCCL's waits on an event); the
CPU jobs of test_parallel_mpi run without one.
"""

from __future__ import annotations

import pytest
from mpi_checks_gpu import GPU_CHECKS
from mpi_harness import names_for
from mpi_launch import assert_check_passed, check_results

from mconv.kernels import host

CASES = [(ranks, name) for ranks in (1, 2, 3, 4) for name in names_for(ranks, GPU_CHECKS)]


@pytest.fixture(scope="module")
def job_results(tmp_path_factory):
    host.build()  # the kernels' host build, once, before the ranks look for it in the cache
    return check_results(tmp_path_factory, "mpi_main_gpu.py", {"MCONV_PARALLEL_TIMEOUT": "300"})


@pytest.mark.parametrize("ranks,name", CASES, ids=[f"{r}ranks-{n}" for r, n in CASES])
def test_gpu_transport_check(job_results, ranks, name):
    assert_check_passed(job_results, ranks, name, "mpi_main_gpu.py")


def test_every_gpu_check_runs_somewhere():
    assert set(GPU_CHECKS) == {name for _, name in CASES}
    assert any(name == "grid_communicators_on_nccl" for r, name in CASES if r == 4)
