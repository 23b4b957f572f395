"""The optional JIT for direct CPU kernels: numba, when installed (``pip install mconv[fast]``).

Kernels are plain Python functions over NumPy arrays, compiled by numba on
first use with ``nogil=True`` (they run in ``numpy_threads``' workers, one
core each) and ``cache=True`` (the machine code is kept next to the module,
so later processes load it instead of compiling: see :func:`compile_seconds`).
Without numba, or with ``MCONV_JIT=0`` in the environment, or after
``set_enabled(False)``, :func:`enabled` is false and the backend keeps its
NumPy-only paths: the same convolutions as plain sums (Winograd, the one JIT
path that rounds differently, is then off too).

>>> from mconv.backends import numpy_jit
>>> isinstance(numpy_jit.enabled(), bool)
True
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
import time

_state = {"numba": None, "enabled": None}
_lock = threading.Lock()
_compile_seconds: dict[str, float] = {}


def _numba():
    if _state["numba"] is None:
        try:
            import numba
        except Exception:  # not installed, or broken beside this NumPy: the NumPy-only paths
            numba = False
        _state["numba"] = numba
    return _state["numba"]


def _env_enabled() -> bool:
    value = os.environ.get("MCONV_JIT", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on", ""):
        raise ValueError(f"MCONV_JIT must be 0 or 1, but got MCONV_JIT={value!r}")
    return value not in ("0", "false", "no", "off")


def switched_on() -> bool:
    """Whether the JIT is switched on (``MCONV_JIT``, :func:`set_enabled`), installed or not."""
    if _state["enabled"] is None:
        _state["enabled"] = _env_enabled()
    return bool(_state["enabled"])


def enabled() -> bool:
    """Whether the JIT kernels run: numba is importable and the JIT is not switched off."""
    return switched_on() and bool(_numba())


def set_enabled(on: bool) -> None:
    """Switch the JIT kernels on or off for this process (off: the NumPy-only paths)."""
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, but got on={on!r}")
    _state["enabled"] = on


def compile_seconds() -> dict[str, float]:
    """Seconds each kernel took to become callable in this process, over the argument types
    it was called with: compiling, or loading from numba's cache (milliseconds once cached)."""
    return dict(_compile_seconds)


def record_compile(name: str, seconds: float) -> None:
    """Add to a kernel's :func:`compile_seconds` (numba's kernels here, IR ones in numpy_llvm)."""
    _compile_seconds[name] = _compile_seconds.get(name, 0.0) + seconds


@contextlib.contextmanager
def _compile_lock():
    """One compile (or cache load) at a time on this machine. MPI ranks start together and
    would otherwise compile the same kernel at once, writing numba's cache files (an index
    and the code, two files) over each other; with the lock the first compiles and writes,
    the others wait and load. An exclusive ``flock``, released when the descriptor closes
    (or the process dies); where it is unavailable, no lock."""
    try:
        import fcntl

        fd = os.open(
            os.path.join(tempfile.gettempdir(), "mconv-jit.lock"), os.O_RDONLY | os.O_CREAT, 0o644
        )
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class Kernel:
    """A function compiled by numba on its first call with each argument types; every
    compile (or load from numba's cache) runs under ``_compile_lock``."""

    def __init__(self, fn, fastmath):
        self.fn, self.fastmath, self.jitted = fn, fastmath, None

    def _compile(self, *args, **kwargs):
        with _compile_lock():
            start = time.perf_counter()
            try:
                return self._compile_for_args(*args, **kwargs)
            finally:
                record_compile(self.fn.__name__, time.perf_counter() - start)

    def __call__(self, *args):
        if self.jitted is None:
            with _lock:
                if self.jitted is None:
                    jitted = _numba().njit(
                        nogil=True, cache=True, fastmath=self.fastmath, error_model="numpy"
                    )(self.fn)
                    # numba calls this on a miss (new argument types): compile under the lock
                    self._compile_for_args = jitted._compile_for_args
                    jitted._compile_for_args = self._compile
                    self.jitted = jitted
        return self.jitted(*args)


def kernel(fastmath=frozenset()):
    """Decorator: ``fn`` becomes a :class:`Kernel` (call only when :func:`enabled`)."""
    return lambda fn: Kernel(fn, set(fastmath) or False)
