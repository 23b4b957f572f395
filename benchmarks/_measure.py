"""Measurement for the conv benchmark: one layer timed in mconv and torch, best-of-N time,
peak memory of one call, the sgemm peak and the machine's facts.

Peak memory is Linux-only: it reads VmRSS / VmHWM from ``/proc/self/status`` and resets the
high-water mark by writing ``5`` to ``/proc/self/clear_refs``.
"""

from __future__ import annotations

import ctypes
import datetime
import functools
import gc
import math
import os
import platform
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from mconv import functional as F

PASSES = ("fwd", "fwd+bwd")
LIBRARIES = ("mconv", "torch")
OPS = {
    "conv": (F.conv, F.conv_backward),
    "conv_transpose": (F.conv_transpose, F.conv_transpose_backward),
}

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
MIB = 1 << 20


class Case(NamedTuple):
    name: str
    op: str  # "conv" or "conv_transpose"
    x: tuple  # (B, C, *S)
    w: tuple  # conv (O, C/groups, *k); conv_transpose (C, O/groups, *k)
    kwargs: dict


def forward_flops(case: Case, y_shape) -> int:
    """2 * multiply-adds: a (C/groups) * prod(kernel) reduction per output element of a conv,
    per input element of a transposed conv (that is, per output element of its equivalent conv)."""
    elements = math.prod(y_shape if case.op == "conv" else case.x)
    return 2 * elements * math.prod(case.w[1:])


def make_calls(case: Case, dtype):
    """The calls to time, ``{(library, pass): fn}`` (each returns its outputs), and forward flops."""
    rng = np.random.default_rng(0)
    groups = case.kwargs.get("groups", 1)
    out_channels = case.w[0] if case.op == "conv" else case.w[1] * groups
    x = rng.standard_normal(case.x).astype(dtype)
    w = (rng.standard_normal(case.w) / math.sqrt(math.prod(case.w[1:]))).astype(dtype)
    b = rng.standard_normal(out_channels).astype(dtype)
    kw = dict(case.kwargs, compute_mode="float32" if dtype == np.float16 else "default")
    forward, backward = OPS[case.op]
    y = forward(x, w, b, **kw)
    dy = rng.standard_normal(y.shape).astype(dtype)
    torch_forward = getattr(torch.nn.functional, f"{case.op}{len(case.w) - 2}d")
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    tdy = torch.tensor(dy)

    def mconv_fwd_bwd():
        return forward(x, w, b, **kw), backward(dy, x, w, has_bias=True, **kw)

    def torch_fwd():
        with torch.no_grad():
            return torch_forward(tx, tw, tb, **case.kwargs)

    def torch_fwd_bwd():
        ty = torch_forward(tx, tw, tb, **case.kwargs)
        return ty, torch.autograd.grad(ty, (tx, tw, tb), tdy)

    calls = {
        ("mconv", "fwd"): lambda: forward(x, w, b, **kw),
        ("mconv", "fwd+bwd"): mconv_fwd_bwd,
        ("torch", "fwd"): torch_fwd,
        ("torch", "fwd+bwd"): torch_fwd_bwd,
    }
    return calls, forward_flops(case, y.shape)


def _ratio(a, b):
    return a / b if a is not None and b else None


def measure_case(case: Case, dtype, repeat: int, torch_fp16_repeat: int) -> dict:
    """Time, GFLOP/s and peak memory of both libraries on one shape and dtype."""
    calls, flops = make_calls(case, dtype)
    gflop = {"fwd": flops / 1e9, "fwd+bwd": 3 * flops / 1e9}
    row = dict(shape=case.name, op=case.op, x=case.x, w=case.w, kwargs=case.kwargs)
    row.update(dtype=np.dtype(dtype).name, gflop=gflop)
    for step in PASSES:  # the libraries take turns, so a slow moment of the VM hits both
        fns = {lib: calls[lib, step] for lib in LIBRARIES}
        repeats = {lib: torch_fp16_repeat if lib == "torch" and dtype == np.float16 else repeat
                   for lib in LIBRARIES}  # fmt: skip
        for lib, seconds in best_times(fns, repeats).items():
            row.setdefault(lib, {})[step] = {"ms": seconds * 1e3, "gflops": gflop[step] / seconds}
    for (lib, step), fn in calls.items():  # one separate run each, after the timing
        row[lib][step]["peak_mib"] = peak_memory(fn)
    mconv, ref = row["mconv"], row["torch"]
    row["ratio"] = {s: mconv[s]["ms"] / ref[s]["ms"] for s in PASSES}
    row["mem_ratio"] = {s: _ratio(mconv[s]["peak_mib"], ref[s]["peak_mib"]) for s in PASSES}
    return row


ROUNDS = 2  # blocks of runs per function, taking turns: see best_times


def best_times(fns: dict, repeats: dict) -> dict:
    """Minimum wall time in seconds of each ``fns[name]()``, after one warm-up run each: the
    functions take turns in ROUNDS blocks of ``repeats[name]`` runs each. Runs of one
    function follow each other within a block, so each library is timed as it runs in a
    loop of its own: the first runs after a switch share the cores with the other
    library's threads, which spin for a while after its call (torch's OpenMP threads; the
    OpenBLAS threads of mconv's NumPy GEMMs, for up to 0.1 s), and taking turns call by
    call slowed both (mconv's c256 14x14 forward 9.5 -> 11.9 ms, torch's c128 28x28 9 ->
    17 ms). Blocks that take turns still let a slow minute of the VM hit both."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            for _ in range(repeats[name]):
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def best_time(fn, repeat: int) -> float:
    """Minimum wall time of ``fn()`` in seconds over ROUNDS x ``repeat`` runs, after one
    warm-up run."""
    return best_times({"fn": fn}, {"fn": repeat})["fn"]


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values))


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status, such as VmRSS or VmHWM."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_free_memory() -> None:
    """Collect garbage and hand glibc's free heap pages back to the system."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def can_measure_memory() -> bool:
    """Whether the peak-RSS mark can be read and reset here."""
    try:
        _CLEAR_REFS.write_text("5")
        _status_kib("VmHWM")
    except (OSError, KeyError):
        return False
    return True


def peak_memory(fn) -> float | None:
    """MiB of resident memory ``fn()`` adds at its peak, its returned outputs included.

    Whatever exists before the call (its inputs) is in the baseline and does not count.
    None where the high-water mark cannot be reset (see :func:`can_measure_memory`)."""
    _release_free_memory()
    try:
        baseline = _status_kib("VmRSS")
        _CLEAR_REFS.write_text("5")
    except (OSError, KeyError):
        return None
    outputs = fn()  # noqa: F841 -- kept alive until the peak is read
    peak = _status_kib("VmHWM")
    del outputs
    return max(peak - baseline, 0) * 1024 / MIB


def sgemm_peak(repeat: int, n: int = 2048) -> float:
    """Best GFLOP/s of an ``n``-cubed float32 matrix product in NumPy."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
    return 2 * n**3 / best_time(lambda: a @ b, repeat) / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blas_info():
    try:
        config = np.show_config(mode="dicts")
    except TypeError:  # NumPy < 1.26 only prints
        return None
    return config.get("Build Dependencies", {}).get("blas", config)


def environment() -> dict:
    """Date, machine and load, Python, NumPy and its BLAS, torch and its threads."""
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "blas": _blas_info(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
