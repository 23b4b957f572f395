"""Backends implement three primitives on canonical arguments.

A backend is a module with ``name``, ``compute_dtype(dtype, compute_mode)``
and the primitives ``forward``, ``backward_data`` and ``backward_filter``
(see ``numpy_backend`` for their contract). The backend is chosen from the
array: arrays stay on the device they came from.
"""

from __future__ import annotations

import numpy as np

from . import numpy_backend


def get_backend(array):
    """The backend that owns ``array``'s device."""
    if isinstance(array, np.ndarray):
        return numpy_backend
    raise NotImplementedError(
        f"no mconv backend for arrays of type {type(array).__module__}.{type(array).__name__} yet; "
        "the CuPy backend is not part of this release, use NumPy arrays"
    )
