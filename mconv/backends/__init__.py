"""Backends: the three convolution primitives (and padding, bias gradients) per device.

The contract is written once, in ``mconv.backends.base.Backend``: both
``numpy_backend`` (NumPy arrays) and ``cupy_backend`` (CuPy arrays; imported only
when one is seen, so mconv works without CuPy) implement it. The backend is chosen
from the array, and arrays stay on the device they came from.
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
