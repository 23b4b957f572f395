"""mconv's CUDA kernels: the sources, and the table of their template instantiations.

The ``.cu`` files are CUDA C++ templates over ``(T, Acc, Out)`` (storage,
accumulator and output types). They are compiled three ways from the same
text:

- on a GPU by ``cupy.RawModule`` (``mconv.backends.cupy_backend``), with one
  name expression per instantiation;
- for the host by g++ after ``host_shim.h`` (``mconv.kernels.host``), which
  runs the grid as loops: tests compare every kernel against NumPy;
- for sm_80/sm_90 by NVRTC without a GPU (``mconv.kernels.nvrtc``): catches
  the errors only the CUDA compiler sees.

>>> sorted(k.name for k in KERNELS)[:3]
['bias_grad', 'col2im', 'depthwise_backward_data']
>>> KERNELS_BY_NAME["col2im"].expression(("half", "float", "float"))
'mconv::col2im<half, float, float>'
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Kernel sources in inclusion order (common.cuh first).
SOURCES = ("common.cuh", "im2col.cu", "pad.cu", "depthwise.cu", "reduce.cu")

#: numpy dtype name -> C++ type name (``half`` is cuda_fp16's, _Float16 on the host).
CTYPES = {"float16": "half", "float32": "float", "float64": "double"}

_SINGLE = (("half",), ("float",), ("double",))
# (T, Acc, Out): fp16 accumulates in fp32 and writes fp16 ('default') or fp32 ('float32').
_ACCUMULATE = (
    ("half", "float", "half"),
    ("half", "float", "float"),
    ("float", "float", "float"),
    ("double", "double", "double"),
)
_PARTIAL = (("half", "float"), ("float", "float"), ("double", "double"))
_FINAL = (("float", "half"), ("float", "float"), ("double", "double"))


@dataclass(frozen=True)
class Kernel:
    """One ``__global__`` template: its parameters (C++ text) and instantiations."""

    name: str
    template: tuple[str, ...]  # template parameter names, e.g. ("T", "Acc", "Out")
    params: tuple[str, ...]  # C++ parameter declarations using those names
    types: tuple[tuple[str, ...], ...]  # instantiations

    def expression(self, types: tuple[str, ...]) -> str:
        """The name expression of one instantiation, e.g. ``mconv::pad<float>``."""
        return f"mconv::{self.name}<{', '.join(types)}>"

    def symbol(self, types: tuple[str, ...]) -> str:
        """The ``extern "C"`` name of its host-build launcher."""
        return f"mconv_host_{self.name}__{'_'.join(types)}"

    def concrete_params(self, types: tuple[str, ...]) -> list[str]:
        """Parameter declarations with the template names replaced by ``types``."""
        out = []
        for decl in self.params:
            words = decl.replace("*", " * ").split()
            words = [dict(zip(self.template, types)).get(w, w) for w in words]
            out.append(" ".join(words).replace(" * ", "* "))
        return out


_GEO = "const index_t* geo"
KERNELS = (
    Kernel("im2col", ("T",), ("const T* x", "T* cols", _GEO, "index_t batch_stride",
                               "index_t row_stride"), _SINGLE),
    Kernel("col2im", ("T", "Acc", "Out"), ("const T* cols", "Out* dx", _GEO,
                                           "index_t batch_stride", "index_t row_stride"),
           _ACCUMULATE),
    Kernel("pad", ("T",), ("const T* x", "T* y", "const index_t* pp"), _SINGLE),
    Kernel("pad_backward_axis", ("T", "Acc", "Out"),
           ("const T* dy", "Out* dx", "index_t outer", "index_t n", "index_t inner",
            "index_t before", "index_t after", "index_t mode"), _ACCUMULATE),
    Kernel("depthwise_forward", ("T", "Acc", "Out"), ("const T* x", "const T* w", "Out* y", _GEO),
           _ACCUMULATE),
    Kernel("depthwise_backward_data", ("T", "Acc", "Out"),
           ("const T* dy", "const T* w", "Out* dx", _GEO), _ACCUMULATE),
    Kernel("depthwise_backward_filter", ("T", "Acc"),
           ("const T* dy", "const T* x", "Acc* partial", _GEO, "index_t lanes"), _PARTIAL),
    Kernel("bias_grad", ("T", "Acc"), ("const T* dy", "Acc* partial", "index_t batch",
                                       "index_t channels", "index_t numel", "index_t lanes"),
           _PARTIAL),
    Kernel("reduce_rows", ("Acc", "Out"), ("const Acc* partial", "Out* out", "index_t rows",
                                           "index_t lanes"), _FINAL),
)  # fmt: skip
KERNELS_BY_NAME = {k.name: k for k in KERNELS}


def instantiations() -> list[tuple[Kernel, tuple[str, ...]]]:
    """Every (kernel, types) pair, in table order."""
    return [(kernel, types) for kernel in KERNELS for types in kernel.types]


def name_expressions() -> list[str]:
    """The name expressions of every instantiation (for RawModule / NVRTC)."""
    return [kernel.expression(types) for kernel, types in instantiations()]


def source() -> str:
    """All kernel sources as one translation unit (common.cuh first)."""
    return "\n".join((HERE / name).read_text() for name in SOURCES)


def source_hash() -> str:
    """A short hash of the sources and the kernel table (cache key of compiled builds)."""
    digest = hashlib.sha256(source().encode())
    digest.update((HERE / "host_shim.h").read_bytes())
    digest.update(repr(KERNELS).encode())
    return digest.hexdigest()[:16]


def cuda_include_dirs() -> list[str]:
    """Directories holding ``cuda_fp16.h`` (needed by NVRTC), most specific first.

    ``$MCONV_CUDA_INCLUDE``, ``$CUDA_PATH/include``, ``$CONDA_PREFIX/include``, the
    ``nvidia-cuda-runtime`` wheels (CUDA 12: ``nvidia/cuda_runtime/include``, CUDA 13:
    ``nvidia/cu13/include``), then ``/usr/local/cuda/include``.
    """
    candidates = [os.environ.get("MCONV_CUDA_INCLUDE", "")]
    for prefix in ("CUDA_PATH", "CONDA_PREFIX"):
        if os.environ.get(prefix):
            candidates.append(os.path.join(os.environ[prefix], "include"))
    for entry in sys.path:
        for sub in ("nvidia/cuda_runtime/include", "nvidia/cu13/include", "nvidia/cu12/include"):
            candidates.append(os.path.join(entry or ".", sub))
    candidates.append("/usr/local/cuda/include")
    found = []
    for path in candidates:
        if path and os.path.isfile(os.path.join(path, "cuda_fp16.h")):
            real = os.path.realpath(path)
            if real not in found:
                found.append(real)
    return found


#: What to do when the kernels do not compile for want of ``cuda_fp16.h``.
MISSING_HEADERS = (
    "mconv's CUDA kernels need cuda_fp16.h: install the CUDA runtime headers "
    "(pip install nvidia-cuda-runtime-cu12, included in 'mconv[cuda12]') or set "
    "MCONV_CUDA_INCLUDE to a directory holding cuda_fp16.h"
)


def nvrtc_options(arch: str | None = None, require_headers: bool = False) -> list[str]:
    """NVRTC options for the kernels (``arch`` like ``'sm_90'``; None lets CuPy choose).

    ``-I`` names the first of ``cuda_include_dirs()``. When there is none, CuPy may still
    find the headers itself (its RawModule adds the CUDA toolkit's include path), so the
    options go without; ``require_headers=True`` (a bare NVRTC, which has no such search)
    raises ``RuntimeError`` instead."""
    include = cuda_include_dirs()
    if not include and require_headers:
        raise RuntimeError(f"{MISSING_HEADERS}; none found")
    options = ["--std=c++17", *(f"-I{path}" for path in include[:1])]
    if arch is not None:
        options.insert(0, f"-arch={arch}")
    return options
