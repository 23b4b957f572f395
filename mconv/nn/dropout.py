"""Dropout: zero elements (``Dropout``) or whole channels (``Dropout2d``) with probability
``p`` in training and scale the rest by 1/(1-p); the identity in eval. Masks are drawn on
the host from the generator ``mconv.nn.init.manual_seed`` seeds, then moved to the input's
device.

>>> import numpy as np
>>> from mconv import nn
>>> drop = nn.Dropout(0.5).eval()
>>> drop(np.ones(3))
array([1., 1., 1.])
"""

from __future__ import annotations

from .. import _args
from . import init
from .module import Module, cached, to_device


_IDENTITY = object()  # what forward did in eval mode


class _Dropout(Module):
    def __init__(self, p: float = 0.5, inplace: bool = False):
        super().__init__()
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise TypeError(f"p must be a number, but got {type(p).__name__}: p={p!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got p={p!r}")
        self.p, self.inplace = float(p), _args.check_bool(inplace, "inplace")
        self._cache = None

    def _mask_shape(self, x) -> tuple[int, ...]:
        return x.shape

    def forward(self, x):
        _args.check_array(x, "input", type(self).__name__)
        if not self.training or self.p == 0.0:
            self._cache = _IDENTITY
            return x
        keep = init.keep_mask(self._mask_shape(x), self.p)  # host: the seeded draw
        scale = 0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p)
        mask = to_device(keep * scale, _args.device_of(x)).astype(x.dtype)
        self._cache = mask
        return x * mask

    def backward(self, grad_output):
        mask = cached(self)
        return grad_output if mask is _IDENTITY else grad_output * mask

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


class Dropout(_Dropout):
    """Each element dropped with probability ``p``."""


class Dropout2d(_Dropout):
    """Whole channels dropped: one draw per (sample, channel) of a (B, C, H, W) input (per
    channel of an unbatched (C, H, W) one)."""

    def _mask_shape(self, x) -> tuple[int, ...]:
        if x.ndim not in (3, 4):
            raise ValueError(
                f"Dropout2d: expected a 3-D or 4-D input, but got input of size "
                f"{_args.shape_str(x.shape)}"
            )
        lead = 2 if x.ndim == 4 else 1
        return x.shape[:lead] + (1,) * (x.ndim - lead)

