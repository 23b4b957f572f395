"""parallel on real GPUs: the checks of tests/parallel/mpi_checks_gpu.py (which CI runs on
a CPU stand-in for CuPy and NCCL) in real ``mpiexec`` jobs with CuPy.

1 rank always; 2 ranks too (NCCL when there are 2 GPUs, else host staging,
and CUDA-aware MPI where the MPI library is). Needs mpi4py and mpiexec
beside CuPy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gpu_env
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))

from mpi_checks_gpu import GPU_CHECKS  # noqa: E402
from mpi_harness import names_for  # noqa: E402
from mpi_launch import assert_check_passed, check_results  # noqa: E402

pytestmark = gpu_env.requires_gpu
CASES = [(ranks, name) for ranks in (1, 2) for name in names_for(ranks, GPU_CHECKS)]


@pytest.fixture(scope="module")
def job_results(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("MCONV_TEST_REAL_GPU", "1")
    return check_results(tmp_path_factory, "mpi_main_gpu.py")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("ranks,name", CASES, ids=[f"{r}ranks-{n}" for r, n in CASES])
def test_gpu_parallel_check(job_results, ranks, name):
    assert_check_passed(job_results, ranks, name, "mpi_main_gpu.py")
