"""Weight-layout adapters between frameworks and safe checkpoint readers/writers.

>>> import numpy as np, layouts
>>> layouts.to_torch(np.zeros((3, 3, 4, 8)), "tensorflow", kind="conv").shape   # HWIO -> OIHW
(8, 4, 3, 3)
"""

from .adapters import FRAMEWORKS, KINDS, bias_from_torch, bias_to_torch, from_torch, to_torch
from .checkpoint import Checkpoint, load_checkpoint
from .errors import CheckpointError, UnsafePickleError

__all__ = [
    "FRAMEWORKS", "KINDS", "to_torch", "from_torch", "bias_to_torch", "bias_from_torch",
    "Checkpoint", "load_checkpoint", "load_into", "save_safetensors",
    "CheckpointError", "UnsafePickleError",
]  # fmt: skip


def __getattr__(name: str):
    """``load_into`` and ``save_safetensors`` need mconv's layers: imported on first use."""
    if name in ("load_into", "save_safetensors"):
        from . import transfer  # noqa: PLC0415

        return getattr(transfer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
