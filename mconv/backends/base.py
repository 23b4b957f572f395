"""The backend contract, written once: what a backend's primitives receive and return.

A backend is a module (``numpy_backend``, ``cupy_backend``) that satisfies ``Backend``.
Its primitives see a zero-padding cross-correlation geometry with non-negative padding
(``mconv.conv_ops`` lowers padding modes, crops and ``conv_mode`` around them) and the
caller's arrays in the caller's dtype (float16/32/64, never upcast on the way in).

Dtypes (``mconv.precision``): every sum runs in ``accumulator(dtype)``. A primitive returns
its result in the accumulator (NumPy) or in ``stored(dtype, compute_mode)`` (CuPy), unless
``out_dtype`` is given: then the result may be written in it directly, each tile rounded
once on its way out (NumPy), or returned as before (CuPy; the caller's cast is then the one
rounding). ``bias`` (shape (O,) of the result's channels) is added by the primitive in its
accumulator before that rounding, through ``precision.store``.

Shapes (B batch, G groups, C/O the conv's input/output channels):

    forward(x (B, C, *S), w (O, C/G, *k))          -> y  (B, O, *Q)   = A_w x + bias
    backward_data(dy (B, O, *Q), w (O, C/G, *k))   -> dx (B, C, *S)   = A_w^T dy + bias
    backward_filter(dy (B, O, *Q), x (B, C, *S))   -> dw (O, C/G, *k) = B_x^T dy
    bias_grad(dy (B, O, *Q))                       -> db (O,), summed in the accumulator
    pad(x, pairs, mode) / pad_backward(dy, pairs, mode): reflect/replicate/circular padding
        of the last len(pairs) axes and its adjoint (``mconv.padding``'s contract)
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from ..geometry import ConvGeometry


@runtime_checkable
class Backend(Protocol):
    """What ``mconv.conv_ops`` calls; see the module docstring for shapes and dtypes."""

    name: str

    def forward(self, x, w, geom: ConvGeometry, out_dtype=None, bias=None): ...

    def backward_data(self, dy, w, geom: ConvGeometry, out_dtype=None, bias=None): ...

    def backward_filter(self, dy, x, geom: ConvGeometry): ...

    def bias_grad(self, dy, geom: ConvGeometry): ...

    def pad(self, x, pairs, mode: str): ...

    def pad_backward(self, dy, pairs, mode: str): ...
