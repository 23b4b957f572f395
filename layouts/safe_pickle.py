"""The one restricted unpickler every reader uses: nothing from the file runs.

A pickle can only call what ``find_class`` hands it. Here ``find_class``
answers from an explicit allowlist of ``(module, name)`` pairs, each mapped
to a harmless stand-in of ours (a dtype marker, a tensor builder that only
slices arrays) or to a plain container type. Any other global, including
``posix.system`` or ``builtins.eval``, raises :class:`UnsafePickleError`
naming it, before anything is called; REDUCE and BUILD can therefore only
reach allowed callables and the objects they return.
"""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any, Callable, Mapping

import numpy as np

from .errors import CheckpointError, UnsafePickleError


def _numpy_reconstruct(subtype, shape, dtype):
    """numpy's ndarray pickle entry point, for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refusing to rebuild an ndarray subclass {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise UnsafePickleError(f"refusing a numpy scalar of dtype {dtype!r}")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_dtype(*args):
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise UnsafePickleError("refusing numpy object arrays (dtype 'O') from a checkpoint")
    return dtype


def _numpy_frombuffer(buffer, dtype, shape, order):
    """numpy's protocol-5 ndarray entry point (a buffer, not an object array)."""
    dtype = _numpy_dtype(dtype)
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


# numpy moved its pickle entry points from numpy.core to numpy._core in 2.0
NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    (module, name): fn
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name, fn in (("_reconstruct", _numpy_reconstruct), ("scalar", _numpy_scalar))
}
NUMPY_GLOBALS.update({("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): _numpy_dtype})
NUMPY_GLOBALS.update(
    {(m, "_frombuffer"): _numpy_frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")}
)


def _latin1_bytes(text, encoding="latin1"):
    """How protocol 2 pickles ``bytes``: ``_codecs.encode(str, 'latin1')``, nothing else."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


CONTAINER_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals come only from ``allowed``."""

    def __init__(self, file, allowed: Mapping[tuple[str, str], Any],
                 persistent_load: Callable[[Any], Any] | None = None):  # fmt: skip
        super().__init__(file)
        self._allowed = allowed
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing to load the global {module}.{name}: it is not on the allowlist "
                "(a checkpoint must not run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafePickleError(f"unexpected persistent id in the pickle: {pid!r}")
        return self._persistent(pid)


class BoundedReader:
    """A file view that never reads past the end of the file: a forged length in the
    pickle then ends as a truncation error instead of a giant read."""

    def __init__(self, file):
        self._file = file
        start = file.tell()
        file.seek(0, io.SEEK_END)
        self._end = file.tell()
        file.seek(start)

    def _left(self) -> int:
        return max(self._end - self._file.tell(), 0)

    def read(self, n: int = -1) -> bytes:
        return self._file.read(self._left() if n is None or n < 0 else min(n, self._left()))

    def readline(self, limit: int = -1) -> bytes:
        return self._file.readline(
            self._left() if limit is None or limit < 0 else min(limit, self._left())
        )


def restricted_load(file, source: str, allowed: Mapping[tuple[str, str], Any],
                    persistent_load: Callable[[Any], Any] | None = None) -> Any:  # fmt: skip
    """Unpickle one object from ``file`` (a binary file or bytes); any failure is a
    :class:`CheckpointError` that names ``source``."""
    if isinstance(file, (bytes, bytearray, memoryview)):
        file = io.BytesIO(file)
    file = BoundedReader(file)
    try:
        return RestrictedUnpickler(file, allowed, persistent_load).load()
    except CheckpointError as error:
        raise type(error)(f"{source}: {error}") from None
    except MemoryError:
        raise CheckpointError(f"{source}: the pickle declares a record larger than the memory "
                              "available (a corrupted or forged length)") from None  # fmt: skip
    except Exception as error:  # a corrupted pickle can raise almost anything
        raise CheckpointError(
            f"{source}: corrupted pickle ({type(error).__name__}: {error})"
        ) from None
