"""Worker threads for the NumPy backend.

NumPy copies and ufuncs run on one core; BLAS runs on its own threads.
The backend cuts a convolution into independent tasks (image chunks, row
tiles, channel blocks) and runs them on a small pool of Python threads, so
the im2col copies of one task overlap the GEMM of another (NumPy and BLAS
release the GIL). Each worker owns its scratch buffers. Tasks that write
disjoint outputs are taken first come, first served; tasks that accumulate
(filter gradients) are dealt ``w, w + n, w + 2n, ...`` to worker w, so
results are deterministic for a fixed thread count.

While the workers run, BLAS runs single-threaded (each worker's GEMM on
its own core): OpenBLAS threads that spin between calls would otherwise
take the cores the copies need (measured: the im2col copies ran 5x slower
beside them; a multi-threaded GEMM on the calling thread leaves them
spinning into the next call, so every path, 1x1 included, runs its GEMMs in
the pool). That setting is process-wide in OpenBLAS, so it is held only for
the duration of a call (or of several, ``blas_pinned``) and restored after;
where no OpenBLAS with a thread setter is loaded (MKL, Accelerate), calls
run on one Python thread and BLAS keeps its own threads.

The count comes from ``set_num_threads``, else the ``MCONV_NUM_THREADS``
environment variable, else the CPUs this process may run on (at most 8).
Under MPI, with one rank per core, use 1 (the examples do).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

from .. import _args

_MAX_DEFAULT = 8
# Work below this many multiply-adds runs inline: a thread hand-off costs ~50 us.
MIN_PARALLEL_WORK = 2_000_000

_DONE = object()  # end of a shared task queue
_state = {"threads": None, "pool": None, "blas": None, "pinned": 0, "saved": None}
_lock = threading.Lock()
_SETTERS = ("openblas_set_num_threads", "scipy_openblas_set_num_threads64_",
            "scipy_openblas_set_num_threads", "openblas_set_num_threads64_")  # fmt: skip


def _blas_setter():
    """(get, set) of the loaded OpenBLAS's thread count, or None when there is none to set."""
    if _state["blas"] is None:
        _state["blas"] = False
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "openblas" in line.lower()}
        except OSError:  # not Linux
            paths = set()
        for path in sorted(paths):
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                continue
            for name in _SETTERS:
                getter = name.replace("set_num_threads", "get_num_threads")
                if hasattr(lib, name) and hasattr(lib, getter):
                    get, set_ = getattr(lib, getter), getattr(lib, name)
                    get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                    _state["blas"] = (get, set_)
                    break
            if _state["blas"]:
                break
    return _state["blas"] or None


@contextlib.contextmanager
def _single_threaded_blas():
    """BLAS on one thread while workers run; the first in saves, the last out restores."""
    get, set_ = _blas_setter()
    with _lock:
        if _state["pinned"] == 0:
            _state["saved"] = get()
            set_(1)
        _state["pinned"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["pinned"] -= 1
            if _state["pinned"] == 0:
                set_(_state["saved"])


@contextlib.contextmanager
def blas_pinned():
    """Hold BLAS single-threaded across several ``run`` calls and the GEMMs between them (each
    primitive of ``numpy_backend`` holds it for its whole call): one pin instead of one per
    call, so no OpenBLAS thread wakes up in between."""
    if get_num_threads() <= 1 or _blas_setter() is None:
        yield
    else:
        with _single_threaded_blas():
            yield


def _default_threads() -> int:
    env = os.environ.get("MCONV_NUM_THREADS")
    if env is not None:
        try:
            value = int(env)
        except ValueError:
            raise ValueError(
                f"MCONV_NUM_THREADS must be a positive integer, but got {env!r}"
            ) from None
        if value < 1:
            raise ValueError(f"MCONV_NUM_THREADS must be a positive integer, but got {env!r}")
        return value
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, _MAX_DEFAULT))


def get_num_threads() -> int:
    """Threads the NumPy backend uses for one convolution."""
    if _state["threads"] is None:
        _state["threads"] = _default_threads()
    return _state["threads"]


def set_num_threads(threads: int) -> None:
    """Use ``threads`` worker threads in the NumPy backend (1 = no worker threads).

    >>> import mconv
    >>> before = mconv.get_num_threads()
    >>> mconv.set_num_threads(1); mconv.get_num_threads()
    1
    >>> mconv.set_num_threads(before)
    """
    if not _args.is_int(threads):
        raise TypeError(f"threads must be an int, but got threads={threads!r}")
    if threads < 1:
        raise ValueError(f"threads must be at least 1, but got threads={threads}")
    with _lock:
        _state["threads"] = int(threads)
        pool, _state["pool"] = _state["pool"], None
    if pool is not None:
        pool.shutdown(wait=False)


def _pool(workers: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _state["pool"]
        if pool is None or pool._max_workers < workers:  # noqa: SLF001 - size check only
            pool = _state["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="mconv")
        return pool


def run(tasks: Sequence, work: Callable, make_scratch: Callable, size: int, *, sums=False) -> list:
    """Run ``work(task, scratch)`` over ``tasks``; return one scratch per worker used.

    ``size`` is the multiply-add count of the whole call: small calls run on
    the calling thread. Each worker has its own ``make_scratch()`` result.
    Tasks that write disjoint outputs go first come, first served (a worker
    slowed by anything else on the machine takes fewer). Tasks that add into
    their scratch (``sums=True``) are dealt as ``tasks[w::n]`` to worker w,
    so each sum, and the order the caller adds them in, is fixed for a given
    thread count: the results repeat bit for bit.
    """
    workers = min(get_num_threads(), len(tasks))
    if workers <= 1 or size < MIN_PARALLEL_WORK or _blas_setter() is None:
        scratch = make_scratch()
        for task in tasks:
            work(task, scratch)
        return [scratch]
    queue = iter(tasks)
    taking = threading.Lock()

    def next_task():
        with taking:
            return next(queue, _DONE)

    def worker(index: int):
        scratch = make_scratch()
        if sums:
            for task in tasks[index::workers]:
                work(task, scratch)
        else:
            while (task := next_task()) is not _DONE:
                work(task, scratch)
        return scratch

    with _single_threaded_blas():
        futures = [_pool(workers).submit(worker, i) for i in range(workers)]
        return [f.result() for f in futures]
