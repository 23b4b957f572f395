"""Runs registered checks inside one MPI job and reports every rank's failures.

A check is ``fn(comm, t)``, run by every rank. Comparisons are soft
(``t.close``, ``t.true``, ``t.raises`` record a failure and go on), so a
rank whose numbers are wrong still makes every collective the others make,
and the job never deadlocks on a wrong value. An unexpected exception is a
bug: its traceback is printed and the job aborted (the pytest side then
reports the output). Rank 0 writes ``{check: [failures]}`` as JSON.

Importing this module starts nothing (pytest imports it to list checks).
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import traceback
from pathlib import Path

import numpy as np

from mconv._args import is_cupy

CHECKS: dict[str, tuple] = {}


def stand_in():
    """tests/cupy_stand_in, imported by its path (putting tests/ on sys.path would make
    tests/parallel shadow the ``parallel`` package) and registered as ``cupy_stand_in``."""
    if "cupy_stand_in" not in sys.modules:
        folder = Path(__file__).resolve().parents[1] / "cupy_stand_in"
        spec = importlib.util.spec_from_file_location(
            "cupy_stand_in", folder / "__init__.py", submodule_search_locations=[str(folder)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["cupy_stand_in"] = module
        spec.loader.exec_module(module)
    return sys.modules["cupy_stand_in"]


def check(sizes=(1, 2, 3, 4), registry: dict | None = None):
    """Register ``fn`` as a check for jobs of these sizes (in ``registry``, default CHECKS)."""

    def register(fn):
        (CHECKS if registry is None else registry)[fn.__name__] = (fn, tuple(sizes))
        return fn

    return register


def names_for(size: int, registry: dict | None = None) -> list[str]:
    registry = CHECKS if registry is None else registry
    return [name for name, (_, sizes) in registry.items() if size in sizes]


def host(array):
    """A NumPy array of ``array``'s values (a device array is copied to the host)."""
    return array.get() if is_cupy(array) else np.asarray(array)


TOL = {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-5, np.dtype(np.float16): 2e-2}


class Soft:
    """Soft assertions: failures are collected, never raised."""

    def __init__(self, rank: int):
        self.rank = rank
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        self.failures.append(f"rank {self.rank}: {what}")

    def true(self, condition, what: str) -> bool:
        if not condition:
            self.fail(what)
        return bool(condition)

    def close(self, actual, expected, what: str, tol: float | None = None) -> bool:
        """max |actual - expected| <= tol * max|expected| (tol from the dtype unless given)."""
        actual, expected = host(actual), host(expected)
        if actual.shape != expected.shape:
            self.fail(f"{what}: shape {actual.shape} != expected {expected.shape}")
            return False
        if tol is None:
            tol = TOL.get(np.dtype(actual.dtype), 0.0)
        wide = np.complex128 if "c" in (actual.dtype.kind, expected.dtype.kind) else np.float64
        scale = max(float(np.abs(expected.astype(wide)).max(initial=0.0)), 1e-300)
        err = float(np.abs(actual.astype(wide) - expected.astype(wide)).max(initial=0.0))
        return self.true(
            err <= tol * scale, f"{what}: max abs error {err:.3e} > {tol:.0e} * {scale:.3e}"
        )

    def equal(self, actual, expected, what: str) -> bool:
        actual, expected = host(actual), host(expected)
        ok = actual.shape == expected.shape and actual.dtype == expected.dtype
        ok = ok and bool(np.array_equal(actual, expected, equal_nan=actual.dtype.kind == "f"))
        return self.true(
            ok,
            f"{what}: got {actual.dtype}{actual.shape}, expected {expected.dtype}{expected.shape} (or values differ)",
        )

    def raises(self, kind, fn, what: str, match: str | None = None):
        """``fn()`` must raise ``kind`` (message matching ``match``); returns the exception."""
        try:
            fn()
        except kind as err:
            if match is not None and not re.search(match, str(err)):
                self.fail(f"{what}: message {str(err)!r} does not match {match!r}")
            return err
        except Exception as err:  # noqa: BLE001 - reported, not raised
            self.fail(f"{what}: expected {kind.__name__}, got {type(err).__name__}: {err}")
            return None
        self.fail(f"{what}: expected {kind.__name__}, nothing was raised")
        return None


def run(names: list[str], out_path: str | None, registry: dict | None = None) -> None:
    import parallel

    comm = parallel.init()
    results = {}
    for name in names:
        fn, _ = (CHECKS if registry is None else registry)[name]
        t = Soft(comm.rank)
        try:
            fn(comm, t)
        except Exception:  # a bug, maybe mid-collective: end the job now
            sys.stderr.write(f"check {name} raised on rank {comm.rank}:\n{traceback.format_exc()}")
            sys.stderr.flush()
            comm.abort(1)
        failures = comm.mpi.gather(t.failures, root=0)
        if comm.rank == 0:
            results[name] = [f for per_rank in failures for f in per_rank]
    if comm.rank == 0:
        text = json.dumps(results, indent=1)
        if out_path:
            with open(out_path, "w") as f:
                f.write(text)
        else:
            print(text)
