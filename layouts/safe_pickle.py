"""The one restricted unpickler every reader uses: nothing from the file runs.

A pickle can only call what ``find_class`` hands it. Here ``find_class``
answers from an explicit allowlist of ``(module, name)`` pairs, each mapped
to a harmless stand-in of ours (a dtype marker, a tensor builder that only
slices arrays) or to a plain container type. Any other global, including
``posix.system`` or ``builtins.eval``, raises :class:`UnsafePickleError`
naming it, before anything is called; REDUCE and BUILD can therefore only
reach allowed callables and the objects they return.

Before unpickling, :func:`layouts.pickle_scan.scan` dry-runs the opcodes and bounds
what the C unpickler would otherwise trust (memo indices, nesting depth, hashing work,
BUILD on a shared global). Stand-ins are immutable (:class:`Inert`): a pickle cannot
change one for a later load. numpy arrays are rebuilt only from an allowlisted set of
plain dtypes, and only once their byte count is checked against the data in the file.
"""

from __future__ import annotations

import collections
import io
import math
import pickle
import reprlib
from typing import Any, Callable, Mapping

import numpy as np

from .errors import CheckpointError, UnsafePickleError
from .pickle_scan import MAX_DEPTH, scan


class Inert:
    """Base of the allowlisted stand-ins: no ``__dict__``, no attribute can be set after
    ``__init__``, and BUILD is refused."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise UnsafePickleError(f"refusing to change the stand-in {type(self).__name__}")

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"refusing to set the state of the stand-in {type(self).__name__}")

    def _init(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)


# -- numpy ----------------------------------------------------------------------------------

# the descriptors numpy pickles for plain dtypes: numpy.dtype(descr, align, copy) + BUILD state
_PLAIN_DTYPES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}


class DTypeSpec:
    """Stand-in for ``numpy.dtype``: REDUCE gives the descriptor, BUILD the byte order; the
    real dtype is made by :meth:`numpy` from the allowlist, never by numpy's ``__setstate__``."""

    __slots__ = ("descr", "order")

    def __init__(self, descr: Any = None, align: Any = False, copy: Any = True):
        if not isinstance(descr, str) or descr not in _PLAIN_DTYPES or align not in (0, 1):
            raise UnsafePickleError(f"refusing the numpy dtype {short_repr(descr)}: only plain bool, "
                                    "int, uint, float and complex dtypes are read (no object "
                                    "arrays, strings or records)")  # fmt: skip
        self.descr, self.order = descr, None

    def __setstate__(self, state: Any) -> None:
        ok = (self.order is None and isinstance(state, tuple) and len(state) in (8, 9)
              and state[0] in (3, 4) and state[1] in ("<", ">", "|", "=")
              and state[2:5] == (None, None, None) and state[5:7] in ((-1, -1), (0, 0)))  # fmt: skip
        if not ok or (state[1] == "|" and np.dtype(self.descr).itemsize > 1):
            raise UnsafePickleError(f"refusing a numpy dtype state {short_repr(state)}: only a plain "
                                    "byte order is read")  # fmt: skip
        self.order = state[1]

    def numpy(self) -> np.dtype:
        dtype = np.dtype(self.descr)
        return dtype.newbyteorder(self.order) if self.order in ("<", ">") else dtype


def _dtype(value: Any) -> np.dtype:
    if not isinstance(value, DTypeSpec):
        raise UnsafePickleError(f"expected a numpy dtype, but got {short_repr(value)}")
    return value.numpy()


def _shape(value: Any) -> tuple[int, ...]:
    if not (isinstance(value, tuple) and len(value) <= 64 and all(
            type(v) is int and 0 <= v < 2**63 for v in value)):  # fmt: skip
        raise CheckpointError(f"an array shape must be a tuple of at most 64 non-negative ints, "
                              f"but got {short_repr(value)}")  # fmt: skip
    return value


def _check_nbytes(shape: tuple[int, ...], dtype: np.dtype, data: Any) -> None:
    """Declared size against the bytes present, before numpy allocates anything."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"refusing array data of type {type(data).__name__} (object "
                                "arrays and other payloads are not read)")  # fmt: skip
    if math.prod(shape) * dtype.itemsize != len(data):
        raise CheckpointError(f"an array of shape {list(shape)} and dtype {dtype} needs "
                              f"{math.prod(shape) * dtype.itemsize} bytes, but its data holds "
                              f"{len(data)}")  # fmt: skip


class NDArrayType(Inert):
    """Stand-in for the ``numpy.ndarray`` global: only a marker for ``_reconstruct``."""

    __slots__ = ()


NDARRAY = NDArrayType()


class PendingArray(np.ndarray):
    """What numpy's ``_reconstruct`` makes: an empty array that BUILD fills once, with a
    checked state. :func:`plain_array` turns it into a plain ndarray."""

    def __setstate__(self, state: Any) -> None:
        if getattr(self, "_filled", False) or not isinstance(state, tuple) or len(state) != 5:
            raise UnsafePickleError(f"refusing an ndarray state {short_repr(state)}")
        version, shape, dtype, fortran, data = state
        shape, dtype = _shape(shape), _dtype(dtype)
        if version != 1 or fortran not in (0, 1):
            raise UnsafePickleError(f"refusing an ndarray state {short_repr(state)}")
        _check_nbytes(shape, dtype, data)
        np.ndarray.__setstate__(self, (1, shape, dtype, bool(fortran), data))
        self._filled = True


def _numpy_reconstruct(subtype: Any, shape: Any = None, dtype: Any = None) -> PendingArray:
    """numpy's ndarray pickle entry point, for plain ndarrays only; allocates nothing."""
    if subtype is not NDARRAY:
        raise UnsafePickleError(f"refusing to rebuild an ndarray subclass {short_repr(subtype)}")
    return np.ndarray.__new__(PendingArray, (0,), np.uint8)


def _numpy_scalar(dtype: Any, data: Any = None) -> np.generic:
    dtype = _dtype(dtype)
    _check_nbytes((), dtype, data)
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """numpy's protocol-5 ndarray entry point (a buffer, not an object array)."""
    dtype, shape = _dtype(dtype), _shape(shape)
    _check_nbytes(shape, dtype, buffer)
    if order not in ("C", "F"):
        raise UnsafePickleError(f"refusing the array order {short_repr(order)}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order)


# numpy moved its pickle entry points from numpy.core to numpy._core in 2.0
NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    (module, name): fn
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name, fn in (("_reconstruct", _numpy_reconstruct), ("scalar", _numpy_scalar))
}
NUMPY_GLOBALS.update({("numpy", "ndarray"): NDARRAY, ("numpy", "dtype"): DTypeSpec})
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
    # protocol 2 names builtins as Python 2 did (torch.save of a module holds a set)
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


def _make_repr() -> reprlib.Repr:
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, 120, 120
    return short


_REPR = _make_repr()


def short_repr(value: Any, limit: int = 120) -> str:
    """A repr for messages, bounded in length and in depth (it never recurses far)."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the unpickler --------------------------------------------------------------------------


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
        except (KeyError, TypeError):
            raise UnsafePickleError(
                f"refusing to load the global {module}.{name}: it is not on the allowlist "
                "(a checkpoint must not run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent is None:
            raise UnsafePickleError(f"unexpected persistent id in the pickle: {short_repr(pid)}")
        return self._persistent(pid)


class _Window:
    """A read-only file over ``data[start:end]`` (an mmap is not copied as a whole)."""

    def __init__(self, data, start: int, end: int):
        self._data, self._pos, self._end = data, start, end

    def read(self, n: int = -1) -> bytes:
        stop = self._end if n is None or n < 0 else min(self._pos + n, self._end)
        chunk = self._data[self._pos : stop]
        self._pos = stop
        return bytes(chunk)

    def readline(self, limit: int = -1) -> bytes:
        newline = self._data.find(b"\n", self._pos, self._end)
        stop = self._end if newline < 0 else newline + 1
        if limit is not None and limit >= 0:
            stop = min(stop, self._pos + limit)
        return self.read(stop - self._pos)


def load_pickle_at(data, start: int, source: str, allowed: Mapping[tuple[str, str], Any],
                   persistent_load: Callable[[Any], Any] | None = None) -> tuple[Any, int]:  # fmt: skip
    """Unpickle the object at ``data[start:]`` (bytes or an mmap); returns it and the offset
    past its STOP. Every failure is a :class:`CheckpointError` that names ``source``."""
    end = scan(data, start, source)
    stream = io.BytesIO(data) if start == 0 and end == len(data) and isinstance(data, bytes) \
        else _Window(data, start, end)  # fmt: skip
    try:
        obj = RestrictedUnpickler(stream, allowed, persistent_load).load()
    except CheckpointError as error:
        raise type(error)(f"{source}: {error}") from None
    except MemoryError:
        raise CheckpointError(f"{source}: the pickle declares a record larger than the memory "
                              "available (a corrupted or forged length)") from None  # fmt: skip
    except Exception as error:  # a corrupted pickle can raise almost anything
        raise CheckpointError(
            f"{source}: corrupted pickle ({type(error).__name__}: {short_repr(str(error))})"
        ) from None
    return obj, end


def restricted_load(data, source: str, allowed: Mapping[tuple[str, str], Any],
                    persistent_load: Callable[[Any], Any] | None = None) -> Any:  # fmt: skip
    """Unpickle the one object in ``data`` (bytes or an mmap); see :func:`load_pickle_at`."""
    return load_pickle_at(data, 0, source, allowed, persistent_load)[0]


# -- walking what was unpickled -------------------------------------------------------------


def plain_array(value: Any, source: str) -> Any:
    """A rebuilt :class:`PendingArray` -> a plain ndarray; anything else unchanged."""
    if isinstance(value, PendingArray):
        if not getattr(value, "_filled", False):
            raise CheckpointError(f"{source}: an ndarray is rebuilt without its data")
        return value.view(np.ndarray)
    return value


def rebuild(obj: Any, leaf: Callable[[Any], Any], source: str) -> Any:
    """``obj`` with every leaf (not a dict, list or tuple) replaced by ``leaf(plain_array(x))``,
    containers rebuilt with their own type; iterative, each object visited once (shared
    objects stay shared), nesting bounded by MAX_DEPTH, a container inside itself refused."""
    done: dict[int, Any] = {}
    active: set[int] = set()
    todo: list[tuple[Any, int, bool]] = [(obj, 0, False)]
    while todo:
        item, depth, expanded = todo.pop()
        key = id(item)
        if key in done:
            continue
        if not isinstance(item, (dict, list, tuple)):
            done[key] = leaf(plain_array(item, source))
            continue
        values = list(item.values()) if isinstance(item, dict) else item
        if expanded:
            active.discard(key)
            results = [done[id(v)] for v in values]
            done[key] = (type(item)(zip(item.keys(), results)) if isinstance(item, dict)
                         else type(item)(results))  # fmt: skip
            continue
        if key in active:
            raise CheckpointError(f"{source}: the pickled object contains itself")
        if depth >= MAX_DEPTH:
            raise CheckpointError(f"{source}: the pickled object is nested more than "
                                  f"{MAX_DEPTH} deep")  # fmt: skip
        active.add(key)
        todo.append((item, depth, True))
        for value in values:
            if id(value) in active:
                raise CheckpointError(f"{source}: the pickled object contains itself")
            todo.append((value, depth + 1, False))
    return done[id(obj)]
