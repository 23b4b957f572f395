"""The host build of the CUDA kernels: g++, ``host_shim.h`` and ctypes.

``build()`` writes one C++ file that includes the shim and the very same
``.cu`` sources, plus an ``extern "C"`` launcher per instantiation, and
compiles it into a shared library cached under a hash of the sources.
``HostExecutor`` runs ``mconv.kernels.ops`` on NumPy arrays through it, with
cuBLAS's column-major strided-batched GEMM emulated by NumPy, so the whole
GPU algorithm is checked on a CPU.

A user-facing tool as well: step through a kernel, or change one, on a machine
without a GPU (needs g++), e.g.
``KernelBackend(HostExecutor()).forward(x, w, conv_geometry(x.shape, w.shape)[0])``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import CTYPES, HERE, SOURCES, instantiations, plan, source_hash

#: g++ flags: the kernels must be warning-free, including implicit narrowing
#: of 64-bit indices (-Wconversion).
CXXFLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-Wall", "-Wextra", "-Wconversion",
            "-Werror")  # fmt: skip

_loaded: dict[str, ctypes.CDLL] = {}


def _arg_name(decl: str) -> str:
    return decl.replace("*", " ").split()[-1]


def host_source() -> str:
    """The C++ translation unit of the host library."""
    lines = ['#include "host_shim.h"', *(f'#include "{name}"' for name in SOURCES)]
    lines.append("using mconv::index_t;")
    for kernel, types in instantiations():
        params = ", ".join(["unsigned grid", "unsigned block", *kernel.concrete_params(types)])
        args = ", ".join(_arg_name(decl) for decl in kernel.params)
        lines.append(
            f'extern "C" void {kernel.symbol(types)}({params}) {{\n'
            f"  mconv_host::launch(grid, block, [&] {{ mconv::{kernel.name}<{', '.join(types)}>({args}); }});\n"
            "}"
        )
    return "\n".join(lines) + "\n"


def cache_dir() -> Path:
    """``$MCONV_KERNEL_CACHE``, else a per-user folder in the temp directory."""
    path = os.environ.get("MCONV_KERNEL_CACHE") or os.path.join(
        tempfile.gettempdir(), f"mconv-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
    )
    return Path(path)


def build(compiler: str | None = None) -> Path:
    """Compile (once per source hash) and return the path of the host library.

    Raises ``RuntimeError`` when no C++ compiler is found or compilation fails."""
    compiler = compiler or os.environ.get("CXX") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("building the host kernels needs g++ (or $CXX); none found")
    out_dir = cache_dir()
    target = out_dir / f"mconv_kernels_host_{source_hash()}.so"
    if target.exists():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        cpp = Path(tmp) / "host.cpp"
        cpp.write_text(host_source())
        lib = Path(tmp) / "lib.so"
        result = subprocess.run(
            [compiler, *CXXFLAGS, f"-I{HERE}", str(cpp), "-o", str(lib)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"host build of the kernels failed:\n{result.stderr[-20000:]}")
        os.replace(lib, target)  # atomic: a concurrent build leaves one complete file
    return target


def load(compiler: str | None = None) -> ctypes.CDLL:
    """The host library, built if needed, with argument types set."""
    path = str(build(compiler))
    if path not in _loaded:
        lib = ctypes.CDLL(path)
        for kernel, types in instantiations():
            fn = getattr(lib, kernel.symbol(types))
            fn.restype = None
            fn.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
                ctypes.c_void_p if "*" in decl else ctypes.c_longlong for decl in kernel.params
            ]
        lib.mconv_host_set_reverse.argtypes = [ctypes.c_int]
        _loaded[path] = lib
    return _loaded[path]


def _colmajor(buf: np.ndarray, offset: int, rows: int, cols: int, ld: int) -> np.ndarray:
    """The column-major (rows x cols) matrix with leading dimension ``ld`` at ``buf[offset:]``."""
    if rows and cols and (offset < 0 or offset + (cols - 1) * ld + rows > buf.size or ld < rows):
        raise IndexError(
            f"GEMM operand out of bounds: offset {offset}, {rows}x{cols}, ld {ld}, "
            f"buffer of {buf.size} elements"
        )
    item = buf.itemsize
    return as_strided(buf[offset:], shape=(rows, cols), strides=(item, ld * item))


def gemm_reference(call: plan.GemmCall, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
    """cublasGemmStridedBatchedEx on flat NumPy buffers, computing in fp32 (fp64 for
    fp64 operands) as cuBLAS's CUBLAS_COMPUTE_32F / _64F do."""
    compute = np.float64 if a.dtype == np.float64 else np.float32
    for i in range(call.batch):
        shape_a = (call.k, call.m) if call.transa else (call.m, call.k)
        shape_b = (call.n, call.k) if call.transb else (call.k, call.n)
        op_a = _colmajor(a, call.offset_a + i * call.stride_a, *shape_a, call.lda)
        op_b = _colmajor(b, call.offset_b + i * call.stride_b, *shape_b, call.ldb)
        out = _colmajor(c, call.offset_c + i * call.stride_c, call.m, call.n, call.ldc)
        op_a = op_a.T if call.transa else op_a
        op_b = op_b.T if call.transb else op_b
        result = op_a.astype(compute) @ op_b.astype(compute)
        if call.beta:
            result += compute(call.beta) * out.astype(compute)
        out[...] = result.astype(c.dtype)


class HostExecutor:
    """Runs ``mconv.kernels.ops`` on NumPy arrays: kernels from the host library
    (small grids, so grid-stride loops wrap), GEMMs by ``gemm_reference``."""

    xp = np
    name = "host"

    def __init__(self, lib: ctypes.CDLL | None = None, block: int = 32, max_blocks: int = 5,
                 reverse: bool = False):  # fmt: skip
        self.lib = lib if lib is not None else load()
        self.block, self.max_blocks, self.reverse = block, max_blocks, reverse
        self.launches: list[tuple[str, tuple[str, ...]]] = []  # what ran, for tests
        self.gemms: list[plan.GemmCall] = []

    def params(self, values) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)

    def launch(self, name: str, types: tuple[str, ...], total: int, *args) -> None:
        """Run ``mconv::name<types>`` over ``total`` items (arrays by pointer, ints as int64)."""
        from . import KERNELS_BY_NAME

        kernel = KERNELS_BY_NAME[name]
        if types not in kernel.types:
            raise ValueError(f"{name} has no instantiation {types}; it has {kernel.types}")
        converted = []
        for decl, arg in zip(kernel.params, args, strict=True):
            if "*" in decl:
                if not (isinstance(arg, np.ndarray) and arg.flags.c_contiguous):
                    raise TypeError(f"{name}: {decl} must be a C-contiguous ndarray")
                want = CTYPES.get(arg.dtype.name)
                declared = decl.split("*")[0].split()[-1]
                expected = dict(zip(kernel.template, types)).get(declared, "long long")
                if declared != "index_t" and want != expected:
                    raise TypeError(f"{name}: {decl} is {expected}, but got {arg.dtype}")
                converted.append(arg.ctypes.data)
            else:
                converted.append(int(arg))
        grid, block = plan.launch_config(total, self.block, self.max_blocks)
        self.lib.mconv_host_set_reverse(int(self.reverse))
        getattr(self.lib, kernel.symbol(types))(grid, block, *converted)
        self.launches.append((name, types))

    def gemm(self, call: plan.GemmCall, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
        gemm_reference(call, a.reshape(-1), b.reshape(-1), c.reshape(-1))  # any shape -> flat views
        self.gemms.append(call)
