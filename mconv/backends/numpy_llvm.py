"""Kernels written in LLVM IR and compiled in this process by llvmlite (numba's code
generator, installed with it: ``pip install mconv[fast]``).

numba compiles Python loops, but it keeps a register-blocked kernel's
accumulators in memory: it has no vector types, and LLVM does not turn a
dozen scalar sums into vector registers. In IR the accumulators are
``<8 x float>`` values, and LLVM keeps them in registers. A kernel is IR
text (a function ``@kernel`` taking pointers and ``i64``), compiled once per
process on first use for the host CPU (tens of milliseconds, reported in
``numpy_jit.compile_seconds()``) and called through ``ctypes``, which
releases the GIL, so ``numpy_threads``' workers run kernels side by side.

The kernels run when :func:`available`: llvmlite imports, its LLVM reads
opaque-pointer IR (LLVM 15 or later), and the JIT is not switched off
(``MCONV_JIT=0``, ``numpy_jit.set_enabled(False)``). A kernel that fails to
compile makes :meth:`Kernel.function` return None, and the caller keeps its
NumPy path.
"""

from __future__ import annotations

import ctypes
import threading
import time

from . import numpy_jit

_state: dict = {"llvm": None}
_lock = threading.Lock()


def _binding():
    """llvmlite.binding with the native target set up, or False."""
    if _state["llvm"] is None:
        try:
            import llvmlite.binding as llvm

            if llvm.llvm_version_info < (15,):
                raise ImportError("opaque pointers need LLVM 15 or later")
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            features = llvm.get_host_cpu_features().flatten()
            _state["host"] = {"cpu": llvm.get_host_cpu_name(), "features": features, "opt": 3}
            _state["registers"] = 32 if "+avx512f" in features.split(",") else 16
        except Exception:  # not installed, too old, or no native target: the NumPy paths
            llvm = False
        _state["llvm"] = llvm
    return _state["llvm"]


def available() -> bool:
    """Whether IR kernels can run here (llvmlite, and the JIT not switched off)."""
    return numpy_jit.switched_on() and bool(_binding())


def vector_registers() -> int:
    """How many vector registers the host has for a kernel's accumulators (AVX-512: 32)."""
    return _state["registers"] if _binding() else 16


def loop(name: str, bound: str, after: str) -> list[str]:
    """IR lines: the head of ``for name in range(bound)`` (an ``i64`` in ``%name.a``, set to
    0 before); the body follows and ends with :func:`step`; when done, jump to ``after``."""
    return [f"  br label %{name}.head", f"{name}.head:", f"  %{name} = load i64, ptr %{name}.a",
            f"  %{name}.go = icmp slt i64 %{name}, {bound}",
            f"  br i1 %{name}.go, label %{name}.body, label %{after}", f"{name}.body:"]  # fmt: skip


def step(name: str, by: str = "1") -> list[str]:
    """IR lines: the end of :func:`loop`'s body (``name += by``, back to the head)."""
    return [f"  %{name}.n = add i64 %{name}, {by}", f"  store i64 %{name}.n, ptr %{name}.a",
            f"  br label %{name}.head"]  # fmt: skip


class Kernel:
    """IR text whose ``@kernel`` has the C signature ``argtypes`` (ctypes types), compiled on
    the first :meth:`function` call. The machine code lives as long as this object: keep it
    (the callers keep theirs in module-level tables) while its function may be called."""

    def __init__(self, name: str, ir: str, argtypes):
        self.name, self.ir, self.argtypes = name, ir, argtypes
        self._function, self._engine, self._context = None, None, None

    def function(self):
        """The compiled function (a ctypes callable), or None where it does not compile."""
        if self._function is None:
            with _lock:
                if self._function is None:
                    self._function = self._compile() or False
        return self._function or None

    def _compile(self):
        llvm = _binding()
        if not llvm:
            return None
        start = time.perf_counter()
        try:
            # a context of its own: LLVM's global one is numba's, whose compiles may run on
            # other threads meanwhile (an LLVM context is not thread-safe)
            context = llvm.create_context()
            module = llvm.parse_assembly(self.ir, context=context)
            module.verify()
            # a machine per kernel: the engine takes it over and frees it with itself
            machine = llvm.Target.from_default_triple().create_target_machine(**_state["host"])
            builder = llvm.create_pass_builder(
                machine, llvm.create_pipeline_tuning_options(speed_level=3)
            )
            builder.getModulePassManager().run(module, builder)
            engine = llvm.create_mcjit_compiler(module, machine)
            engine.finalize_object()
            address = engine.get_function_address("kernel")
        except Exception:  # an LLVM that rejects the IR: the caller's NumPy path
            return None
        finally:
            numpy_jit.record_compile(self.name, time.perf_counter() - start)
        self._engine, self._context = engine, context  # the machine code lives as long
        return ctypes.CFUNCTYPE(None, *self.argtypes)(address)
