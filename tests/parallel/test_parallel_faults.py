"""A rank that raises, dies, or is configured differently ends the whole job.

The other ranks are blocked in a gradient allreduce when the last rank
fails; without an abort they would wait forever. Each job gets a 60 s
timeout; a job still running then is killed and the test fails. (The time
a job took is reported, never asserted.)
"""

from __future__ import annotations

import pytest
from mpi_launch import HERE, launch

JOB = HERE / "fault_job.py"


@pytest.mark.parametrize(
    "ranks,mode,runner,expected",
    [
        (3, "raise", True, "RuntimeError: boom on rank 2"),
        (3, "raise", False, "RuntimeError: boom on rank 2"),  # parallel.init()'s abort hook
        (2, "kill", True, None),  # what hydra prints about it varies
        (2, "mismatch", True, "configuration must be the same on every rank"),
    ],
    ids=["raise-with-mpi4py-runner", "raise-plain-python", "sigkill", "config-mismatch"],
)
def test_one_failing_rank_ends_the_job(ranks, mode, runner, expected):
    job = launch(ranks, [JOB, mode], timeout=60, use_mpi4py_runner=runner)
    assert not job.timed_out, f"the job hung after a rank failed ({mode}):\n{job.tail()}"
    assert job.returncode != 0, job.tail()
    output = job.stdout + job.stderr
    assert expected is None or expected in output, job.tail()
    assert "the job went on" not in output
    print(f"{mode}: the job ended in {job.seconds:.1f} s with code {job.returncode}")
