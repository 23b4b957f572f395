"""Backends implement three primitives on canonical arguments.

A backend is a module with

- ``name``;
- ``compute_dtype(dtype, compute_mode)``: the dtype inputs are cast to before
  the primitives (NumPy: the input dtype itself; it widens fp16 per tile);
- the primitives ``forward(x, w, geom)``, ``backward_data(dy, w, geom)`` and
  ``backward_filter(dy, x, geom)`` on a zero-padding cross-correlation
  geometry (see ``numpy_backend`` for shapes);
- ``pad(x, pairs, mode)`` / ``pad_backward(dy, pairs, mode)`` for the
  reflect/replicate/circular modes and their adjoint, and
  ``bias_grad(dy, geom)``.

A backend may return wider results than its inputs (its accumulator, e.g.
fp32 from fp16 under ``compute_mode='float32'``); ``mconv.conv_ops`` adds the
bias in that dtype and casts every result to the caller's dtype exactly once.
``forward`` and ``backward_data`` also take ``out_dtype=None``: the dtype the
result will be cast to with nothing computed on it first. A backend may
write the result in it directly (NumPy rounds each tile once on its way
out) or ignore it (CuPy); the cast after is then a no-op or the one rounding.
``forward`` adds ``bias=None`` (shape (O,)) itself, in the result's dtype
before any rounding into ``out_dtype`` (NumPy: per tile, in its accumulator).
The backend is chosen from the array: arrays stay on the device they came from.
``numpy_backend`` serves NumPy arrays, ``cupy_backend`` CuPy arrays (imported
only when one is seen, so mconv works without CuPy).
"""

from __future__ import annotations

import numpy as np

from .. import _args
from . import numpy_backend


def get_backend(array):
    """The backend that owns ``array``'s device."""
    if _args.is_cupy(array):
        from . import cupy_backend  # noqa: PLC0415 - CuPy is optional

        return cupy_backend
    if isinstance(array, np.ndarray):
        return numpy_backend
    raise NotImplementedError(
        f"no mconv backend for arrays of type {type(array).__module__}.{type(array).__name__}; "
        "use NumPy or CuPy arrays"
    )
