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
from typing import Any, Mapping

import numpy as np

from .atomic import atomic_write
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
    source = str(path)
    f, size = open_regular(path)
    with f:
        buffer, _ = map_bytes(f, size, source)
    obj = restricted_load(buffer, source, GLOBALS)
    return rebuild(obj, lambda item: _tensor_data(item, source), source)


def write_numpy_pickle(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """A MegEngine-style state dict: ``{name: ndarray}`` pickled with protocol 4."""
    with atomic_write(path) as f:
        pickle.dump(dict(tensors), f, protocol=4)  # numpy pickles each array in C order
