"""float16 <-> float32 copies by an LLVM IR kernel (``numpy_llvm``), where NumPy's are slow.

NumPy converts float16 one element at a time in C (about 0.4 G/s narrowing
and 0.6 G/s widening here), so a float16 conv spent more time converting
its input and output than a float32 conv spends computing. The kernel is a
plain loop over (two levels of) rows of contiguous runs that LLVM vectorises with the CPU's
conversion instructions (F16C's ``vcvtph2ps``/``vcvtps2ph``: rounding to
nearest even, as NumPy rounds). :func:`copy_into` takes any pair of arrays
whose axes fold into two levels of rows of contiguous runs (a tile of an
NCHW array: channels, rows, then each row's run); anything else, and hosts
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
    """``@kernel(src, dst, outer, rows, cols, s_outer, s_row, d_outer, d_row)`` (strides in
    elements): ``dst[o, r, c] = src[o, r, c]`` converted; a scalar loop LLVM vectorises."""
    cast = "fpext" if src == "half" else "fptrunc"
    out = ["define void @kernel(ptr noalias %src, ptr noalias %dst, i64 %outer, i64 %rows, "
           "i64 %cols, i64 %sos, i64 %srs, i64 %dos, i64 %drs) {", "entry:",
           "  %o.a = alloca i64", "  %r.a = alloca i64", "  %c.a = alloca i64",
           "  store i64 0, ptr %o.a", *loop("o", "%outer", "exit"),
           "  %so = mul i64 %o, %sos", "  %do = mul i64 %o, %dos",
           "  store i64 0, ptr %r.a", *loop("r", "%rows", "o.next"),
           "  %sr.0 = mul i64 %r, %srs", "  %sr.1 = add i64 %sr.0, %so",
           f"  %sr = getelementptr {src}, ptr %src, i64 %sr.1",
           "  %dr.0 = mul i64 %r, %drs", "  %dr.1 = add i64 %dr.0, %do",
           f"  %dr = getelementptr {dst}, ptr %dst, i64 %dr.1",
           "  store i64 0, ptr %c.a", *loop("c", "%cols", "r.next"),
           f"  %sp = getelementptr {src}, ptr %sr, i64 %c", f"  %v = load {src}, ptr %sp",
           f"  %w = {cast} {src} %v to {dst}", f"  %dp = getelementptr {dst}, ptr %dr, i64 %c",
           f"  store {dst} %w, ptr %dp", *step("c"), "r.next:", *step("r"), "o.next:",
           *step("o"), "exit:", "  ret void", "}"]  # fmt: skip
    return "\n".join(out)


def _kernel(src: str, dst: str):
    if (src, dst) not in _kernels:  # setdefault: workers asking at once share one Kernel
        args = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 7
        kernel = numpy_llvm.Kernel(f"convert_{src}_{dst}", _ir(src, dst), args)
        _kernels.setdefault((src, dst), kernel)
    return _kernels[src, dst].function()


def _fold(shape, src_strides, dst_strides):
    """(outer, rows, cols, (s_outer, s_row), (d_outer, d_row)): two arrays of ``shape`` with
    these element strides as ``[outer][rows]`` of contiguous runs of ``cols``, after merging
    the axes that are contiguous in both; None when more than two axes stay apart."""
    axes = [(n, a, b) for n, a, b in zip(shape, src_strides, dst_strides) if n != 1]
    cols = 1
    while axes and axes[-1][1] == axes[-1][2] == cols:  # the contiguous run
        cols *= axes.pop()[0]
    merged: list[list[int]] = []
    for n, a, b in axes:  # an axis that steps over a whole inner one in both: merge them
        if merged and merged[-1][1] == a * n and merged[-1][2] == b * n:
            merged[-1] = [merged[-1][0] * n, a, b]
        else:
            merged.append([n, a, b])
    if len(merged) > 2:
        return None
    merged = [[1, 0, 0]] * (2 - len(merged)) + merged
    (outer, so, do), (rows, sr, dr) = merged
    return outer, rows, cols, (so, sr), (do, dr)


def copy_into(dest: np.ndarray, src: np.ndarray) -> None:
    """``dest[...] = src`` (same shape), by the kernel where one is float16 and the other
    float32 and both fold into ``[outer][rows]`` of contiguous runs (or do so below a first
    axis of a few entries, one call each); NumPy's copy otherwise."""
    pair = (_TYPES.get(src.dtype), _TYPES.get(dest.dtype))
    usable = (
        src.shape == dest.shape
        and dest.size >= MIN_SIZE
        and None not in pair
        and pair[0] != pair[1]
        and numpy_llvm.available()
    )
    function = _kernel(*pair) if usable else None
    if function is not None:
        strides = [tuple(s // a.itemsize for s in a.strides) for a in (src, dest)]
        folded = _fold(dest.shape, *strides)
        if folded is not None:
            outer, rows, cols, (so, sr), (do, dr) = folded
            function(src.ctypes.data, dest.ctypes.data, outer, rows, cols, so, sr, do, dr)
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
