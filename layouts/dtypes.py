"""dtypes NumPy lacks (bfloat16, float8) come from ml_dtypes when it is installed;
without it bfloat16 widens exactly to float32, with a warning."""

from __future__ import annotations

import warnings

import numpy as np

from .errors import CheckpointError


def ml_dtype(name: str, source: str) -> np.dtype | None:
    """``ml_dtypes.<name>``; None for bfloat16 without ml_dtypes (read raw bits instead)."""
    try:
        import ml_dtypes  # noqa: PLC0415 - optional dependency
    except ImportError:
        if name == "bfloat16":
            return None
        raise CheckpointError(f"{source}: {name} tensors need the ml_dtypes package") from None
    return np.dtype(getattr(ml_dtypes, name))


def widen_bfloat16(bits: np.ndarray, source: str) -> np.ndarray:
    """Raw bfloat16 bit patterns (uint16) -> float32, exactly."""
    warnings.warn(
        f"{source}: bfloat16 tensors load as float32 (install ml_dtypes to keep bfloat16)",
        stacklevel=3,
    )
    return (bits.astype(np.uint32) << 16).view(np.float32)


def is_floating(dtype: np.dtype) -> bool:
    """NumPy floats and the ml_dtypes ones (bfloat16, float8_*)."""
    return np.issubdtype(dtype, np.floating) or dtype.name.startswith(("bfloat16", "float8"))
