"""Compile the kernels with NVRTC through ctypes: no GPU, driver or CuPy needed.

NVRTC is the compiler ``cupy.RawModule`` uses on a GPU; the
``nvidia-cuda-nvrtc-cu12`` wheel ships it as a plain shared library. Compiling
every instantiation for real targets (``-arch=sm_90`` produces SASS, so ptxas
runs too) catches what the g++ host build cannot: device-only overloads,
``half`` arithmetic, CUDA-specific keywords.

A user-facing tool (with the ``nvidia-cuda-nvrtc-cu12`` wheel, included in the
``test`` extra): check that mconv's kernels compile for a GPU before running on it,

    python -m mconv.kernels.nvrtc sm_80 sm_90
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
from dataclasses import dataclass, field

from . import name_expressions, nvrtc_options, source


class NvrtcError(RuntimeError):
    """A failed NVRTC call; the message holds the compiler log."""


@dataclass
class Compiled:
    """One compiled program: its log, lowered names and binary size."""

    arch: str
    log: str
    lowered: dict[str, str] = field(default_factory=dict)
    cubin_bytes: int = 0


def find_library() -> str | None:
    """libnvrtc: ``$MCONV_NVRTC``, the nvidia-cuda-nvrtc wheels, the system, /usr/local/cuda."""
    candidates = [os.environ.get("MCONV_NVRTC", "")]
    for entry in sys.path:
        for pattern in ("nvidia/cuda_nvrtc/lib/libnvrtc.so*", "nvidia/cu13/lib/libnvrtc.so*"):
            candidates += sorted(glob.glob(os.path.join(entry or ".", pattern)))
    candidates.append(ctypes.util.find_library("nvrtc") or "")
    candidates += sorted(glob.glob("/usr/local/cuda/lib64/libnvrtc.so*"))
    for path in candidates:
        if path and ("alt" not in os.path.basename(path)) and os.path.exists(path):
            return path
    return None


def _load(path: str | None) -> ctypes.CDLL:
    path = path or find_library()
    if path is None:
        raise NvrtcError(
            "libnvrtc not found: pip install nvidia-cuda-nvrtc-cu12 (or set MCONV_NVRTC)"
        )
    lib = ctypes.CDLL(path)
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


def version(path: str | None = None) -> tuple[int, int]:
    """NVRTC's (major, minor)."""
    lib = _load(path)
    major, minor = ctypes.c_int(), ctypes.c_int()
    lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    return major.value, minor.value


def compile_kernels(
    arch: str,
    code: str | None = None,
    names: list[str] | None = None,
    options: list[str] | None = None,
    library: str | None = None,
) -> Compiled:
    """Compile ``code`` (default: all kernel sources) for ``arch`` (e.g. ``'sm_90'``)
    with a name expression per instantiation; raises ``NvrtcError`` with the log."""
    lib = _load(library)
    code = source() if code is None else code
    names = name_expressions() if names is None else names
    options = nvrtc_options(arch, require_headers=True) if options is None else options

    def check(result: int, what: str, log: str = "") -> None:
        if result != 0:
            message = lib.nvrtcGetErrorString(result).decode()
            raise NvrtcError(f"{what} failed for {arch}: {message}\n{log}")

    program = ctypes.c_void_p()
    check(
        lib.nvrtcCreateProgram(
            ctypes.byref(program), code.encode(), b"mconv_kernels.cu", 0, None, None
        ),
        "nvrtcCreateProgram",
    )
    try:
        for name in names:
            check(lib.nvrtcAddNameExpression(program, name.encode()), "nvrtcAddNameExpression")
        encoded = [opt.encode() for opt in options]
        result = lib.nvrtcCompileProgram(
            program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded)
        )
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(program, buffer)
        log = buffer.value.decode(errors="replace").strip()
        check(result, "nvrtcCompileProgram", log)
        compiled = Compiled(arch, log)
        for name in names:
            lowered = ctypes.c_char_p()
            check(
                lib.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(lowered)),
                f"nvrtcGetLoweredName({name})",
            )
            compiled.lowered[name] = lowered.value.decode()
        if arch.startswith("sm_"):
            check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "nvrtcGetCUBINSize")
            compiled.cubin_bytes = size.value
        return compiled
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def main(argv: list[str] | None = None) -> int:
    """``python -m mconv.kernels.nvrtc ARCH...``: compile every kernel for each ARCH."""
    archs = (sys.argv[1:] if argv is None else argv) or ["sm_80", "sm_90"]
    for arch in archs:
        try:
            compiled = compile_kernels(arch)
        except (NvrtcError, OSError, RuntimeError) as error:
            print(f"{arch}: {error}", file=sys.stderr)
            return 1
        size = f", {compiled.cubin_bytes} bytes of SASS" if compiled.cubin_bytes else ""
        print(f"{arch}: {len(compiled.lowered)} kernels compiled{size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
