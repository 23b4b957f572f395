"""The optional JIT for direct CPU kernels: numba, when installed (``pip install mconv[fast]``).

Kernels are plain Python functions over NumPy arrays, compiled by numba on
first use with ``nogil=True`` (they run in ``numpy_threads``' workers, one
core each) and ``cache=True`` (the machine code is kept next to the module,
so later processes load it instead of compiling: see :func:`compile_seconds`).
Without numba, or with ``MCONV_JIT=0`` in the environment, or after
``set_enabled(False)``, :func:`enabled` is false and the backend keeps its
NumPy-only paths, which compute the same results.

>>> from mconv.backends import numpy_jit
>>> isinstance(numpy_jit.enabled(), bool)
True
"""

from __future__ import annotations

import os
import threading
import time

_state = {"numba": None, "enabled": None}
_lock = threading.Lock()
_compile_seconds: dict[str, float] = {}


def _numba():
    if _state["numba"] is None:
        try:
            import numba
        except ImportError:
            numba = False
        _state["numba"] = numba
    return _state["numba"]


def _env_enabled() -> bool:
    value = os.environ.get("MCONV_JIT", "1").strip().lower()
    if value not in ("0", "1", "false", "true", "no", "yes", "off", "on", ""):
        raise ValueError(f"MCONV_JIT must be 0 or 1, but got MCONV_JIT={value!r}")
    return value not in ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether the JIT kernels run: numba is importable and the JIT is not switched off."""
    if _state["enabled"] is None:
        _state["enabled"] = _env_enabled()
    return bool(_state["enabled"]) and bool(_numba())


def set_enabled(on: bool) -> None:
    """Switch the JIT kernels on or off for this process (off: the NumPy-only paths)."""
    if not isinstance(on, bool):
        raise TypeError(f"on must be a bool, but got on={on!r}")
    _state["enabled"] = on


def compile_seconds() -> dict[str, float]:
    """Seconds each kernel took to become callable in this process: compiling it, or loading
    it from numba's cache (a few milliseconds once cached)."""
    return dict(_compile_seconds)


class Kernel:
    """A function compiled on first call; ``fastmath`` as numba takes it."""

    def __init__(self, fn, fastmath):
        self.fn, self.fastmath, self.compiled = fn, fastmath, None

    def __call__(self, *args):
        if self.compiled is None:
            with _lock:
                if self.compiled is None:
                    start = time.perf_counter()
                    jitted = _numba().njit(
                        nogil=True, cache=True, fastmath=self.fastmath, error_model="numpy"
                    )(self.fn)
                    result = jitted(*args)  # compile (or load) for these types, and run
                    _compile_seconds[self.fn.__name__] = time.perf_counter() - start
                    self.compiled = jitted
                    return result
        return self.compiled(*args)


def kernel(fastmath=frozenset()):
    """Decorator: ``fn`` becomes a :class:`Kernel` (call only when :func:`enabled`)."""
    return lambda fn: Kernel(fn, set(fastmath) or False)
