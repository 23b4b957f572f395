"""Every check of mpi_checks_*.py, run in one real ``mpiexec`` job per rank count (1, 2, 3, 4).

One job per rank count runs all of its checks (mpiexec start-up costs about
a second); each check is then reported as its own test. A job that dies
(a bug aborts it) fails every check of that rank count with its output.
"""

from __future__ import annotations

import mpi_checks_agreement  # noqa: F401  (registers checks)
import mpi_checks_comm  # noqa: F401
import mpi_checks_layers  # noqa: F401
import mpi_checks_norm  # noqa: F401
import mpi_checks_training  # noqa: F401
import pytest
from mpi_harness import names_for
from mpi_launch import assert_check_passed, check_results

RANKS = (1, 2, 3, 4)
CASES = [(ranks, name) for ranks in RANKS for name in names_for(ranks)]


@pytest.fixture(scope="module")
def job_results(tmp_path_factory):
    return check_results(tmp_path_factory, "mpi_main.py")


@pytest.mark.parametrize("ranks,name", CASES, ids=[f"{r}ranks-{n}" for r, n in CASES])
def test_mpi_check(job_results, ranks, name):
    assert_check_passed(job_results, ranks, name, "mpi_main.py")


def test_every_check_runs_somewhere():
    from mpi_harness import CHECKS

    assert set(CHECKS) == {name for _, name in CASES}
    assert any(name == "hybrid_grid_equals_serial_training" for r, name in CASES if r == 4)
