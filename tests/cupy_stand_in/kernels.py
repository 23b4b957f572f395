"""``cupy.RawModule`` on the host build of mconv's CUDA kernels."""

from __future__ import annotations

import functools

import numpy as np

from .arrays import ndarray, run
from .device import RaceError, current_stream, module, state


class RawModule:
    """cupy.RawModule over the host build: loaded on the current device, one function per
    name expression."""

    def __init__(self, code=None, options=(), name_expressions=None, **kwargs):
        cupy = module()
        if cupy.lib is None:
            raise RuntimeError("the CuPy stand-in was installed without kernels")
        self.device = state().device
        self.names = tuple(name_expressions or ())
        cupy.compiled.append(dict(code=code, options=tuple(options), names=self.names,
                                    device=self.device))  # fmt: skip

    def get_function(self, expression: str):
        from mconv import kernels

        if expression not in self.names:
            raise RuntimeError(f"name expression {expression!r} was not given to RawModule")
        kernel, types_ = next(
            (k, t) for k, t in kernels.instantiations() if k.expression(t) == expression
        )
        symbol = getattr(module().lib, kernel.symbol(types_))
        device = self.device

        def launch(grid, block, args, **kwargs):
            if state().device != device:
                raise RaceError(f"{expression} loaded on device {device}, launched on "
                                f"device {state().device}: invalid resource handle")  # fmt: skip
            assert isinstance(grid, tuple) and isinstance(block, tuple), (grid, block)
            assert len(args) == len(kernel.params), (expression, len(args))
            arrays = [a for a in args if isinstance(a, ndarray)]

            def execute(*host_args):
                converted, written = [], []
                for decl, arg, value in zip(kernel.params, args, host_args):
                    if "*" in decl:
                        assert isinstance(arg, ndarray), (decl, type(arg))
                        assert arg._a.flags.c_contiguous, f"{decl}: a non-contiguous array"
                        if decl.startswith("const"):
                            converted.append(value.ctypes.data)
                        else:  # written: into scratch memory, queued on the stream
                            scratch = np.array(value)
                            written.append((arg, scratch))
                            converted.append(scratch.ctypes.data)
                    else:
                        assert isinstance(arg, np.int64), (decl, type(arg))  # long long
                        converted.append(int(arg))
                module().launched.append((kernel.name, types_, grid[0], block[0]))
                symbol(grid[0], block[0], *converted)
                for arg, scratch in written:
                    current_stream().enqueue(arg._buf, functools.partial(np.copyto, arg._a,
                                                                         scratch))  # fmt: skip

            run(execute, tuple(args), {}, what=expression, arrays=arrays, writes=True)

        return launch
