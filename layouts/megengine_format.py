"""MegEngine ``.pkl`` checkpoints: a pickled dict of numpy arrays (``megengine.save`` of
``module.state_dict()``), possibly inside a checkpoint dict. Read through the
restricted unpickler (numpy arrays and plain containers only); written as a
plain pickle of ndarrays, atomically.

``megengine.save`` is ``pickle.dump``, so a file may also hold ``megengine.Tensor`` /
``Parameter`` objects (``state_dict(keep_var=True)``, a dict of tensors). MegEngine 1.13
pickles one as NEWOBJ of ``megengine.tensor.Tensor`` (or ``.Parameter``) with
``__getnewargs__`` = ``(ndarray, dtype, device name)``, then BUILD with ``__getstate__`` =
``{}`` (``{"qparams": QParams}`` for a quantized tensor, which is refused as any other
global). A stand-in of ours keeps the ndarray; it is swapped in after unpickling.
"""

from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Mapping

import numpy as np

from . import module_records
from .atomic import atomic_write
from .dtypes import is_floating
from .errors import CheckpointError
from .files import map_bytes, open_regular
from .sink import ArrayBytes, Sink
from .safe_pickle import (CONTAINER_GLOBALS, NUMPY_GLOBALS, plain_array, rebuild,
                          restricted_load, short_repr)  # fmt: skip


class _Tensor:
    """Stand-in for ``megengine.Tensor`` / ``Parameter``: keeps the pickled ndarray."""

    def __new__(cls, data: Any = None, dtype: Any = None, device: Any = None):
        self = object.__new__(cls)
        self.data, self.state = data, None
        return self

    def __setstate__(self, state: Any) -> None:
        self.state = state


GLOBALS = {
    ("megengine.tensor", "Tensor"): _Tensor,
    ("megengine.tensor", "Parameter"): _Tensor,
    **CONTAINER_GLOBALS,
    **NUMPY_GLOBALS,
}


def _tensor_data(item: Any, source: str) -> Any:
    """A tensor stand-in -> its ndarray; anything else unchanged."""
    if not isinstance(item, _Tensor):
        return item
    data = plain_array(item.data, source)
    if not isinstance(data, np.ndarray):
        raise CheckpointError(f"{source}: a megengine.Tensor whose pickled data is "
                              f"{type(data).__name__}, not an array")  # fmt: skip
    state = item.state
    if state is not None and not (isinstance(state, dict) and not state):
        what = sorted(map(short_repr, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{source}: a megengine.Tensor with pickled state {what} "
                              "(quantization parameters?) is not supported")  # fmt: skip
    return data


def read_numpy_pickle(path: str) -> Any:
    return read_megengine(path)[0]


def read_megengine(path: str) -> tuple[Any, dict]:
    """(the saved object with tensors as ndarrays, metadata). A whole module
    (``megengine.save(module)``) becomes its ``state_dict()``, names and shapes as MegEngine
    gives them, with each tensor's role (metadata ``_specs``)."""
    source = str(path)
    f, size = open_regular(path)
    with f:
        buffer, _ = map_bytes(f, size, source)
    obj, modules = module_records.load_modules(
        lambda table: restricted_load(buffer, source, table), buffer, GLOBALS)
    meta: dict = {"format": "pickle"}
    flat: set = set()
    if modules:
        obj, meta["_specs"], flat = module_records.replace_modules(
            obj, lambda x: isinstance(x, _Tensor))
        meta["format"] = "megengine-module"

    def leaf(item: Any) -> Any:
        return _tensor_data(item, source)

    obj = rebuild(obj, leaf, source)
    if flat:  # MegEngine's state_dict(): norm layers' (1, C, 1, 1) tensors as (C,)
        for name in flat:  # keyed from obj: "0.weight", or "model.0.weight" in a dict
            holder, key = obj, name
            if name not in obj:
                head, _, key = name.partition(".")
                holder = obj.get(head)
            if isinstance(holder, dict) and isinstance(holder.get(key), np.ndarray):
                holder[key] = holder[key].reshape(-1)
    return obj, meta


class _Tensor4:
    """Pickles as numpy pickles an ndarray of ``dtype`` (protocol 4), its raw bytes being
    an :class:`~layouts.sink.ArrayBytes`."""

    def __init__(self, array: np.ndarray, dtype: np.dtype):
        if dtype.hasobject:
            raise TypeError(f"write_numpy_pickle: cannot write a tensor of dtype {dtype}")
        self.array, self.dtype = array, dtype

    def __reduce__(self):
        function, args, state = np.empty(0, self.dtype).__reduce_ex__(4)
        version, _, dtype, _, _ = state
        return function, args, (version, self.array.shape, dtype, False,
                                ArrayBytes(self.array, self.dtype))  # fmt: skip


class _Pickler(pickle._Pickler):  # the Python pickler: its dispatch table can be extended
    """Protocol-4 pickler, no memo (``fast``: each tensor's bytes are freed once written);
    large :class:`~layouts.sink.ArrayBytes` go to the :class:`~layouts.sink.Sink` as the pickler's
    own large ``bytes`` would (``BINBYTES`` outside any frame), a small one as bytes."""

    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, sink: Sink, progress: Callable[[int], None] | None):
        super().__init__(sink, protocol=4)
        self.fast, self.progress = True, progress

    def save_payload(self, payload: ArrayBytes) -> None:
        n = payload.nbytes
        if n < self.framer._FRAME_SIZE_TARGET:
            self.save_bytes(payload.tobytes())
        else:
            header = pickle.BINBYTES8 + n.to_bytes(8, "little") if n > 0xFFFFFFFF else (
                pickle.BINBYTES + n.to_bytes(4, "little"))  # fmt: skip
            self._write_large_bytes(header, payload)
        if self.progress is not None:
            self.progress(n)

    dispatch[ArrayBytes] = save_payload


def write_numpy_pickle(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                       float_dtype: np.dtype | None = None,
                       progress: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """A MegEngine-style state dict: ``{name: ndarray}`` pickled with protocol 4, as plain
    numpy arrays (``pickle.load`` / ``megengine.load`` read it), the same bytes as
    ``pickle.dump``. Streamed: each tensor is cast and laid out while it is written (read
    from the source file where its bytes are already in a mapped checkpoint), so memory
    holds at most one tensor's bytes, not the whole file."""

    def dtype(array: np.ndarray) -> np.dtype:
        cast = float_dtype is not None and is_floating(array.dtype)
        return np.dtype(float_dtype) if cast else array.dtype

    with atomic_write(path) as f, Sink(f) as sink:
        _Pickler(sink, progress).dump({name: _Tensor4(array, dtype(array))
                                       for name, array in tensors.items()})  # fmt: skip
