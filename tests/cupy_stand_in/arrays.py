"""The stand-in's ``cupy.ndarray``: host memory behind CuPy's rules, every operation on the
current stream of the current device."""

from __future__ import annotations

import functools
import types

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

from .device import Buffer, Device, Stream, current_stream, module, poisoned, state


def new_array(value: np.ndarray, stream: Stream | None = None) -> ndarray:
    """A new device array on the current device holding ``value`` once ``stream`` (default:
    the current one) runs; until then its memory is poison."""
    value = np.asarray(value)
    mem = poisoned(None, None, like=value)
    buffer = Buffer(mem, state().device)
    (stream or current_stream()).enqueue(buffer, functools.partial(np.copyto, mem, value))
    return ndarray._wrap(mem, buffer)


def empty(shape, dtype=float, order="C") -> ndarray:
    """New memory on the current device: poison until written."""
    mem = poisoned(shape, dtype) if order == "C" else np.asfortranarray(poisoned(shape, dtype))
    return ndarray._wrap(mem, Buffer(mem, state().device))


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def unsupported(value) -> TypeError:
    """CuPy's error for a host operand."""
    return TypeError(f"Unsupported type {type(value)}")


# -- ndarray -----------------------------------------------------------------------------------
_NOT_IN_CUPY = {"ctypes", "__array_interface__", "tofile", "dump", "dumps", "tobytes", "sort",
                "partition", "put", "resize", "itemset", "setflags", "byteswap", "__array__"}  # fmt: skip


class ndarray(NDArrayOperatorsMixin):  # noqa: N801 - CuPy's name
    """A device array: a view ``_a`` of one ``Buffer``'s memory. Not a numpy.ndarray."""

    __slots__ = ("_a", "_buf")
    __module__ = "cupy._core.core"  # mconv tells CuPy arrays by their type's module

    @classmethod
    def _wrap(cls, a: np.ndarray, buffer: Buffer) -> ndarray:
        self = object.__new__(cls)
        self._a, self._buf = a, buffer
        return self

    def __init__(self, shape, dtype=float):
        raise TypeError("make device arrays with cupy.empty/zeros/asarray")

    # -- plain attributes
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: self._a.flags)

    @property
    def device(self) -> Device:
        return Device(self._buf.device)

    @property
    def data(self):
        """The device pointer of the first element (CuPy's MemoryPointer, reduced)."""
        return types.SimpleNamespace(ptr=self._a.ctypes.data, device_id=self._buf.device)

    @property
    def __cuda_array_interface__(self) -> dict:
        a = self._a
        return dict(shape=a.shape, typestr=a.dtype.str, data=(a.ctypes.data, False), version=3,
                    strides=None if a.flags.c_contiguous else a.strides,
                    stream=current_stream(self._buf.device).ptr or 1)  # fmt: skip

    # -- host transfers
    def get(self, stream=None) -> np.ndarray:
        """Device -> host on the current stream of this array's device, then wait for it."""
        stream = stream or current_stream(self._buf.device)
        stream.catch_up()
        self._buf.check_no_race(stream, "get()")
        stream.synchronize()
        return np.array(self._a)

    def set(self, arr, stream=None) -> None:
        """Host -> device, queued on the current stream (shape and dtype must match)."""
        if not isinstance(arr, np.ndarray) or isinstance(arr, ndarray):
            raise TypeError(f"set() takes a host numpy.ndarray, got {type(arr).__name__}")
        if arr.shape != self.shape or arr.dtype != self.dtype:
            raise ValueError(f"set(): {arr.dtype}{arr.shape} into {self.dtype}{self.shape}")
        if not self._a.flags.c_contiguous:
            raise RuntimeError("set() into a non-contiguous device array")
        stream = stream or current_stream(self._buf.device)
        stream.enqueue(self._buf, functools.partial(np.copyto, self._a, np.array(arr)))
        state().host_copies += 1

    def __array__(self, *args, **kwargs):
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
            "construct a NumPy array explicitly."
        )

    def _scalar(self):
        if self.size != 1:
            raise ValueError("The truth value of an array with more than one element is ambiguous.")
        return self.get().reshape(()).item()

    def __bool__(self):
        return bool(self._scalar())

    def __float__(self):
        return float(self._scalar())

    def __int__(self):
        return int(self._scalar())

    def __complex__(self):
        return complex(self._scalar())

    def __index__(self):
        if self.dtype.kind not in "iu" or self.ndim:
            raise TypeError("only integer scalar arrays can be converted to a scalar index")
        return int(self._scalar())

    def item(self):
        return self._scalar()

    def tolist(self):
        return self.get().tolist()

    def __len__(self):
        if not self.ndim:
            raise TypeError("len() of unsized object")
        return self.shape[0]

    def __iter__(self):
        if not self.ndim:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self.shape[0]))

    def __repr__(self):
        return f"array({self.get()!r}, device={self._buf.device})"

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        raise TypeError("the CuPy stand-in does not pickle device arrays")

    # -- computing on the device
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method not in ("__call__", "reduce", "accumulate"):
            return NotImplemented
        out = kwargs.pop("out", None)
        outs = out if isinstance(out, tuple) else (() if out is None else (out,))
        for o in outs:
            if not isinstance(o, ndarray):
                raise unsupported(o)
        for value in (*inputs, *kwargs.values()):
            if isinstance(value, (np.ndarray, list, tuple)) and not isinstance(value, ndarray):
                raise unsupported(value)

        def compute(*args, **kw):
            if not outs:
                return getattr(ufunc, method)(*args, **kw)
            scratch = tuple(np.array(o._a) for o in outs)  # written, then queued into memory
            getattr(ufunc, method)(*args, out=scratch, **kw)
            for o, value in zip(outs, scratch):
                current_stream().enqueue(o._buf, functools.partial(np.copyto, o._a, value))
            return outs if len(outs) > 1 else outs[0]

        return run(compute, inputs, kwargs, what=ufunc.__name__, arrays=outs, writes=bool(outs))

    def __array_function__(self, func, types_, args, kwargs):
        """NumPy functions on device arrays run CuPy's function of that name (NEP 18)."""
        return getattr(module(), func.__name__)(*args, **kwargs)

    def __getitem__(self, key):
        return run(lambda a, k: a[k], (self, _index(key)), {}, what="indexing")

    def __setitem__(self, key, value):
        if isinstance(value, (list, tuple)) or (
            isinstance(value, np.ndarray) and not isinstance(value, ndarray) and value.ndim
        ):
            raise unsupported(value)

        def assign(a, k, v):
            v = np.array(v)  # the value as it is now, written when the stream runs
            current_stream().enqueue(self._buf, lambda: a.__setitem__(k, v))

        run(assign, (self, _index(key), value), {}, what="item assignment", writes=True)

    def fill(self, value):
        self[...] = value

    def copy(self, order="C"):
        """A copy on the current device (from another device: a peer copy after the source's
        stream has run)."""
        if self._buf.device != state().device:
            current_stream(self._buf.device).synchronize()
            return new_array(np.array(self._a, order=order))
        return run(lambda a: np.array(a, order=order), (self,), {}, what="copy")

    def __getattr__(self, name):
        if name in _NOT_IN_CUPY or name.startswith("__"):
            raise AttributeError(f"cupy.ndarray (stand-in) has no attribute {name!r}")
        attr = getattr(self._a, name)
        if not callable(attr):
            return run(lambda a: getattr(a, name), (self,), {}, what=name)

        def method(*args, **kwargs):
            if name == "view" and any(isinstance(t, type) and issubclass(t, np.ndarray)
                                      for t in (*args, *kwargs.values())):  # fmt: skip
                raise TypeError("a device array has no host view: use .get()")
            return run(lambda a, *r, **kw: getattr(a, name)(*r, **kw), (self, *args), kwargs,
                        what=f"ndarray.{name}")  # fmt: skip

        return method


class _Index:
    """An index as CuPy takes it: device arrays, and host index arrays (copied over)."""

    def __init__(self, key):
        self.key = key


def _index(key) -> _Index:
    return _Index(key)


def _flatten(values):
    for value in values:
        if isinstance(value, _Index):
            yield from _flatten((value.key,))
        elif isinstance(value, (list, tuple)):
            yield from _flatten(value)
        elif isinstance(value, dict):
            yield from _flatten(value.values())
        else:
            yield value


def _to_host(value, host_arrays: bool = False):
    """Device arrays (inside lists/tuples/dicts too) -> their memory; NumPy arrays refused,
    but in an index."""
    if isinstance(value, _Index):
        return _to_host(value.key, host_arrays=True)
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray) and not host_arrays:
        raise unsupported(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_host(v, host_arrays) for v in value)
    if isinstance(value, dict):
        return {k: _to_host(v, host_arrays) for k, v in value.items()}
    return value


def run(compute, args, kwargs, what: str, arrays=(), writes: bool = False):
    """One device operation on the current stream of the current device.

    The stream catches up, then ``compute`` runs on the host memory of the operands
    (NumPy operands refused). Results that are operands or views of them are wrapped as
    such; new arrays become new allocations on the current device, their values queued on
    the stream. Where the operation is a kernel (it ``writes``, or makes a new array), every
    device operand must be on the current device and have no write queued on another
    stream: CuPy returns views and no-op casts without a kernel, and checks nothing then."""
    stream = current_stream()
    operands = [v for v in _flatten((*args, *kwargs.values(), *arrays)) if isinstance(v, ndarray)]
    out = kwargs.get("out")
    writes = writes or isinstance(out, ndarray)
    if writes:
        _check_kernel(operands, stream, what)
    stream.catch_up()
    host_kwargs = _to_host(dict(kwargs))
    if isinstance(out, ndarray):  # written into scratch memory, queued on the stream
        host_kwargs["out"] = scratch = np.array(out._a)
    result = compute(*_to_host(tuple(args)), **host_kwargs)
    if isinstance(out, ndarray):
        stream.enqueue(out._buf, functools.partial(np.copyto, out._a, scratch))
        if result is scratch:
            return out
    owners = {id(a._buf.mem): a._buf for a in operands}
    same = {id(a._a): a for a in operands}  # CuPy returns an operand itself, not a new view
    made: list = []
    wrapped = _wrap_result(result, owners, same, made)
    if made and not writes:
        _check_kernel(operands, stream, what)
    for new in made:  # the kernel's results reach memory when the stream runs
        stream.enqueue(new._buf, functools.partial(np.copyto, new._buf.mem, new._value))
    return wrapped


def _check_kernel(operands, stream, what: str) -> None:
    st = state()
    for a in operands:
        if a._buf.device != st.device:
            raise ValueError(
                f"The device where the array resides ({a._buf.device}) is different from "
                f"the current device ({st.device}). Peer access is unavailable between these "
                "devices."
            )
        a._buf.check_no_race(stream, what)


def _wrap_result(result, owners: dict, same: dict, made: list):
    if isinstance(result, ndarray):
        return result
    if id(result) in same:
        return same[id(result)]
    if isinstance(result, (tuple, list)):
        return type(result)(_wrap_result(r, owners, same, made) for r in result)
    if isinstance(result, np.generic):  # CuPy's reductions return 0-d device arrays
        result = np.asarray(result)
    if isinstance(result, np.ndarray):
        owner = owners.get(id(_root(result)))
        if owner is not None:
            return ndarray._wrap(result, owner)  # a view of an operand's memory
        mem = poisoned(None, None, like=result)
        made.append(_Made(ndarray._wrap(mem, Buffer(mem, state().device)), result))
        return made[-1].array
    return result


class _Made:
    """A new array of an operation, and the value it gets when the stream runs."""

    def __init__(self, array: ndarray, value: np.ndarray):
        self.array, self._buf, self._value = array, array._buf, value
