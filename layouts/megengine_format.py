"""MegEngine ``.pkl`` checkpoints: a pickled dict of numpy arrays (``megengine.save`` of
``module.state_dict()``), possibly inside a checkpoint dict. Read through the
restricted unpickler (numpy arrays and plain containers only); written as a
plain pickle of ndarrays, atomically."""

from __future__ import annotations

import os
import pickle
from typing import Any, Mapping

import numpy as np

from .atomic import atomic_write
from .safe_pickle import CONTAINER_GLOBALS, NUMPY_GLOBALS, restricted_load

GLOBALS = {**CONTAINER_GLOBALS, **NUMPY_GLOBALS}


def read_numpy_pickle(path: str) -> Any:
    with open(path, "rb") as f:
        return restricted_load(f, str(path), GLOBALS)


def write_numpy_pickle(tensors: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """A MegEngine-style state dict: ``{name: ndarray}`` pickled with protocol 4."""
    with atomic_write(path) as f:
        pickle.dump(dict(tensors), f, protocol=4)  # numpy pickles each array in C order
