"""A rank that raises, dies, exits, leaves, hangs or is configured differently ends the whole job.

The other ranks are blocked in a gradient allreduce (or in ``parallel.init``)
when the last rank fails; without an abort they would wait forever. An
exception ends the job at once (the abort hook, or ``-m mpi4py``); a rank
that exits, leaves the training loop or hangs ends it within the timeout
(``MCONV_PARALLEL_TIMEOUT=15`` here): the waiting ranks' collective, or the
exiting rank's end-of-job barrier, times out and aborts, naming the rank and
what it waited in. Each job is killed after 60 s; the bound asserted is 30 s.
(The time a job took is printed, never asserted beyond that bound.)
"""

from __future__ import annotations

import re

import pytest
from mpi_launch import HERE, launch

import parallel

JOB = HERE / "fault_job.py"
TIMED_OUT = r"parallel: rank \d waited 1\d\.\d s in {}"


def run(ranks, mode, runner, env=None):
    job = launch(ranks, [JOB, mode], timeout=60, use_mpi4py_runner=runner, env=env)
    assert not job.timed_out, f"the job hung after a rank failed ({mode}):\n{job.tail()}"
    assert job.returncode != 0, job.tail()
    assert "the job went on" not in job.stdout + job.stderr
    print(f"{mode}: the job ended in {job.seconds:.1f} s with code {job.returncode}")
    return job


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
    job = run(ranks, mode, runner)
    assert expected is None or expected in job.stdout + job.stderr, job.tail()


@pytest.mark.parametrize(
    "ranks,mode,runner,waited_in",
    [
        (3, "exit1", False, "(allreduce|exit)"),
        (2, "exit0", True, "(allreduce|exit)"),
        (3, "exit0", False, "(allreduce|exit)"),
        (2, "leave", True, "(allreduce|exit)"),
        (3, "raise-before-init", False, "init"),
        (2, "sleep", True, "allreduce"),
    ],
    ids=["exit1-plain-python", "exit0-with-mpi4py-runner", "exit0-plain-python",
         "leave-the-loop", "raise-before-init-plain-python", "sleep"],  # fmt: skip
)
def test_a_rank_that_never_comes_ends_the_job_within_the_timeout(ranks, mode, runner, waited_in):
    job = run(ranks, mode, runner, env={"MCONV_PARALLEL_TIMEOUT": "15"})
    assert job.seconds <= 30, f"{mode}: the job took {job.seconds:.1f} s to end:\n{job.tail()}"
    assert re.search(TIMED_OUT.format(waited_in), job.stderr), job.tail()


@pytest.mark.parametrize(
    "timeout,kind,match",
    [
        ("10", TypeError, r"timeout must be a number of seconds .*timeout='10' of type str"),
        (True, TypeError, r"timeout=True of type bool"),
        (0, ValueError, r"timeout must be a finite number of seconds > 0, but got timeout=0$"),
        (-1.5, ValueError, r"but got timeout=-1.5$"),
        (float("inf"), ValueError, r"but got timeout=inf$"),
        (float("nan"), ValueError, r"but got timeout=nan$"),
    ],
)
def test_bad_timeouts_are_refused_before_mpi_starts(timeout, kind, match):
    with pytest.raises(kind, match=match):
        parallel.init(timeout=timeout)


@pytest.mark.parametrize("text", ["abc", "-3", "0", "nan"])
def test_bad_timeout_environment_variables_are_refused(monkeypatch, text):
    monkeypatch.setenv("MCONV_PARALLEL_TIMEOUT", text)
    with pytest.raises(ValueError, match=rf"MCONV_PARALLEL_TIMEOUT.*MCONV_PARALLEL_TIMEOUT='?{text}'?$"):
        parallel.init()
