"""Launch real multi-rank jobs from pytest: ``mpiexec -n P python -m mpi4py ...``.

``python -m mpi4py`` turns an uncaught exception on any rank into
``MPI_Abort``, so a failing rank ends the job instead of hanging it. Every
launch has a timeout; on expiry the whole process group (mpiexec, its
proxies and the ranks) is killed. A missing ``mpiexec`` or ``mpi4py`` is a
test failure with the install command, never a skip.
"""

from __future__ import annotations

import functools
import json
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
INSTALL = "pip install -e '.[test]' (it brings mpi4py and mpich, which provides mpiexec)"


@functools.lru_cache(maxsize=None)
def mpiexec() -> list[str]:
    """mpiexec next to this Python first (pip's mpich), then on PATH; plus the flags it needs."""
    beside = Path(sys.executable).parent / "mpiexec"
    found = str(beside) if beside.exists() else shutil.which("mpiexec")
    if found is None:
        pytest.fail(f"mpiexec not found next to {sys.executable} nor on PATH; {INSTALL}")
    if importlib.util.find_spec("mpi4py") is None:
        pytest.fail(f"mpi4py is not installed for {sys.executable}; {INSTALL}")
    version = subprocess.run(
        [found, "--version"], capture_output=True, text=True, timeout=30
    ).stdout
    flags = []
    if "Open MPI" in version or "OpenRTE" in version:  # MPICH needs neither
        flags = ["--oversubscribe"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            flags.append("--allow-run-as-root")
    return [found, *flags]


def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """One BLAS thread per rank; the repository importable from every rank; then ``extra``."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", MCONV_NUM_THREADS="1"
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(HERE), env.get("PYTHONPATH")]))
    env.update(extra or {})
    return env


class Finished:
    """What a job left: return code, output, seconds, and whether the timeout killed it."""

    def __init__(self, returncode, stdout, stderr, seconds, timed_out):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr
        self.seconds, self.timed_out = seconds, timed_out

    def tail(self, chars: int = 4000) -> str:
        return f"--- stdout ---\n{self.stdout[-chars:]}\n--- stderr ---\n{self.stderr[-chars:]}"


def launch(
    ranks: int,
    argv: list[str],
    timeout: float,
    use_mpi4py_runner: bool = True,
    env: dict[str, str] | None = None,
) -> Finished:
    """Run ``argv`` (a script and its arguments) on ``ranks`` ranks, with ``env`` added to the
    environment; kill everything on timeout."""
    runner = ["-m", "mpi4py"] if use_mpi4py_runner else []
    command = [*mpiexec(), "-n", str(ranks), sys.executable, *runner, *map(str, argv)]
    start = time.monotonic()
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        timed_out = True
    return Finished(process.returncode, stdout, stderr, time.monotonic() - start, timed_out)


def check_results(tmp_path_factory, main: str, env: dict[str, str] | None = None):
    """``results(ranks)``: (job, {check: failures} or None) of ``mpiexec -n ranks main OUT``
    (``env`` added to the environment), one job per rank count, run on first use."""
    jobs = {}

    def results(ranks: int):
        if ranks not in jobs:
            out = tmp_path_factory.mktemp(f"ranks{ranks}") / "results.json"
            job = launch(ranks, [HERE / main, out], timeout=300, env=env)
            jobs[ranks] = (job, json.loads(out.read_text()) if out.exists() else None)
        return jobs[ranks]

    return results


def assert_check_passed(job_results, ranks: int, name: str, main: str) -> None:
    job, results = job_results(ranks)
    if results is None or job.returncode != 0:
        pytest.fail(
            f"mpiexec -n {ranks} {main} ended with code {job.returncode}"
            f"{' (timed out, killed)' if job.timed_out else ''} before reporting:\n{job.tail()}"
        )
    failures = results[name]
    assert not failures, f"{len(failures)} failure(s):\n" + "\n".join(failures[:25])
