"""float16 <-> float32 copies by an LLVM IR kernel (``numpy_llvm``), where NumPy's are slow.

NumPy converts float16 one element at a time in C (about 0.4 G/s narrowing
and 0.6 G/s widening here), so a float16 conv spent more time converting
its input and output than a float32 conv spends computing. The kernel is a
plain loop over rows of contiguous runs that LLVM vectorises with the CPU's
conversion instructions (F16C's ``vcvtph2ps``/``vcvtps2ph``: rounding to
nearest even, as NumPy rounds). :func:`copy_into` takes any pair of arrays
whose axes fold into rows of one contiguous run; anything else, and hosts
without llvmlite, keep NumPy's copy: the same values either way.

>>> import numpy as np
>>> a = np.arange(6, dtype=np.float32).reshape(2, 3) / 3
>>> b = np.empty((2, 3), np.float16)
>>> copy_into(b, a)
>>> bool((b == a.astype(np.float16)).all())
True
>>> bool((widened(b, np.float32) == b.astype(np.float32)).all())
True
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import numpy_llvm
from .numpy_llvm import loop, step

MIN_SIZE = 4096  # smaller copies: NumPy's call costs less than a kernel's
MAX_SPLIT = 64  # arrays that fold only below their first axis: a call per entry, up to this
_TYPES = {np.dtype(np.float16): "half", np.dtype(np.float32): "float"}
_kernels: dict[tuple[str, str], numpy_llvm.Kernel] = {}


def _ir(src: str, dst: str) -> str:
    """``@kernel(src, dst, rows, cols, src_row_stride, dst_row_stride)`` (strides in
    elements): ``dst[r, c] = src[r, c]`` converted, a scalar loop LLVM vectorises."""
    cast = "fpext" if src == "half" else "fptrunc"
    out = ["define void @kernel(ptr noalias %src, ptr noalias %dst, i64 %rows, i64 %cols, "
           "i64 %srs, i64 %drs) {", "entry:", "  %r.a = alloca i64", "  %c.a = alloca i64",
           "  store i64 0, ptr %r.a", *loop("r", "%rows", "exit"),
           "  %so = mul i64 %r, %srs", "  %sr = getelementptr " + src + ", ptr %src, i64 %so",
           "  %do = mul i64 %r, %drs", "  %dr = getelementptr " + dst + ", ptr %dst, i64 %do",
           "  store i64 0, ptr %c.a", *loop("c", "%cols", "r.next"),
           f"  %sp = getelementptr {src}, ptr %sr, i64 %c", f"  %v = load {src}, ptr %sp",
           f"  %w = {cast} {src} %v to {dst}", f"  %dp = getelementptr {dst}, ptr %dr, i64 %c",
           f"  store {dst} %w, ptr %dp", *step("c"), "r.next:", *step("r"),
           "exit:", "  ret void", "}"]  # fmt: skip
    return "\n".join(out)


def _kernel(src: str, dst: str):
    if (src, dst) not in _kernels:
        args = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4
        _kernels[src, dst] = numpy_llvm.Kernel(f"convert_{src}_{dst}", _ir(src, dst), args)
    return _kernels[src, dst].function()


def _rows(shape, *strides_of) -> tuple[int, int, tuple[int, ...]] | None:
    """(rows, cols, row strides) of arrays of ``shape`` with these element strides folded
    into rows of one contiguous run, or None where they do not fold so."""
    axes = [(n, s) for n, *s in zip(shape, *strides_of) if n != 1]
    if not axes or any(s != 1 for s in axes[-1][1]):
        return None if axes else (1, 1, (0,) * len(strides_of))
    cols, last = axes[-1][0], len(axes) - 1
    while last > 0 and all(s == cols for s in axes[last - 1][1]):  # contiguous with the run
        last -= 1
        cols *= axes[last][0]
    if last == 0:
        return 1, cols, (0,) * len(strides_of)
    if last > 1:  # rows of two or more axes: only one row stride is passed
        return None
    return axes[0][0], cols, tuple(axes[0][1])


def copy_into(dest: np.ndarray, src: np.ndarray) -> None:
    """``dest[...] = src`` (same shape), by the kernel where one is float16 and the other
    float32 and both fold into rows of a contiguous run (or do so below a first axis of a
    few entries, one call each); NumPy's copy otherwise."""
    pair = (_TYPES.get(src.dtype), _TYPES.get(dest.dtype))
    if (
        src.shape == dest.shape
        and dest.size >= MIN_SIZE
        and None not in pair
        and pair[0] != pair[1]
        and numpy_llvm.available()
        and _kernel(*pair) is not None
    ):
        strides = [tuple(s // a.itemsize for s in a.strides) for a in (src, dest)]
        folded = _rows(dest.shape, *strides)
        if folded is not None:
            rows, cols, (srs, drs) = folded
            _kernel(*pair)(src.ctypes.data, dest.ctypes.data, rows, cols, srs, drs)
            return
        if 1 < dest.ndim and dest.shape[0] <= MAX_SPLIT:
            for d, s in zip(dest, src):
                copy_into(d, s)
            return
    np.copyto(dest, src, casting="unsafe")


def widened(array: np.ndarray, dtype) -> np.ndarray:
    """``array`` as ``dtype`` (itself when it has that dtype already), float16 to float32 by
    the kernel."""
    if array.dtype == dtype:
        return array
    out = np.empty(array.shape, dtype)
    copy_into(out, array)
    return out
