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


class _Lazy:
    """Pickles as the ndarray ``make()`` returns, made only when the pickler reaches it."""

    def __init__(self, make):
        self.make = make

    def __reduce__(self):
        return self.make().__reduce__()


def write_numpy_pickle(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                       float_dtype: np.dtype | None = None,
                       progress: Callable[[int], None] | None = None) -> None:  # fmt: skip
    """A MegEngine-style state dict: ``{name: ndarray}`` pickled with protocol 4, as plain
    numpy arrays (``pickle.load`` / ``megengine.load`` read it). Streamed: each tensor is
    cast, made contiguous and written in turn, and nothing is memoised (the pickler's
    ``fast`` mode), so memory holds one tensor's bytes at a time, not the whole file."""

    def make(array: np.ndarray):
        def build() -> np.ndarray:
            if float_dtype is not None and is_floating(array.dtype):
                out = array.astype(float_dtype)
            else:
                out = np.ascontiguousarray(array)
            if progress is not None:
                progress(out.nbytes)
            return out

        return _Lazy(build)

    with atomic_write(path) as f:
        pickler = pickle.Pickler(f, protocol=4)
        pickler.fast = True  # no memo: each tensor's bytes are freed once written
        pickler.dump({name: make(array) for name, array in tensors.items()})
