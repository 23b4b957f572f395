"""Forward, backward and JVP rules of conv and transposed conv on three primitives.

Derivation. For a fixed zero-padding, cross-correlation geometry the
convolution is bilinear in (x, w):

    y[b, o, q] = sum_{c in group(o), i} w[o, c, i] * xpad[b, c, q*stride + i*dilation]

Write it as y = A_w x = B_x w. Its adjoints are again convolutions:

    forward(x, w)          = A_w x                      y  (B, O, *Q)
    backward_data(dy, w)   = A_w^T dy                    dx (B, C, *S)
    backward_filter(dy, x) = B_x^T dy   (dy im2col(x)^T) dW (O, C/G, *k)

so for L(y): dL/dx = backward_data(dL/dy, w) and dL/dw = backward_filter(dL/dy, x).

A transposed convolution is y_t = A_w^T x_t (weight (I_t, O_t/G, *k) is the
conv weight with out_channels = I_t). Then <dy_t, A_w^T x_t> = <A_w dy_t, x_t>
gives

    conv_transpose forward   y_t  = backward_data(x_t, w)
    its input gradient       dx_t = forward(dy_t, w)
    its weight gradient      dW   = backward_filter(x_t, dy_t)   (roles swapped)

Lowering, before the primitives:
  * padding_mode reflect/replicate/circular: x -> P x (an explicit gather,
    ``padding.pad_unchecked``) and a conv with zero padding. Its adjoint P^T
    (``pad_backward_unchecked``) scatters the border back: dx = P^T A_w^T dy.
  * conv_mode='convolution': y = A_{F w} x with F the spatial flip, so the
    input gradient uses F w too and dW = F B_x^T dy (F is its own inverse).
  * bias: y += b[o] (added by ``forward`` itself), so db = sum of dy over batch
    and spatial axes.
  * JVP by bilinearity: d(conv(x, w) + b) = conv(dx, w) + conv(x, dw) + db.

Dtypes: inputs are cast once to the backend's compute dtype (the NumPy
backend keeps fp16 and widens it tile by tile inside); a backend may return
wider results than its inputs (its accumulator: fp32 from fp16 under
compute_mode='float32'); the bias is added in the result's dtype (by the
backend's forward, in its accumulator), and each result is cast back to the
caller's dtype once. Where nothing is computed on a result after the
primitive (no padding-mode adjoint, no JVP sum, no bias added outside the
primitive), the primitive is told that dtype (``out_dtype``) and may round
into it tile by tile: the same single rounding, without a wide copy.
"""

from __future__ import annotations

from .backends import get_backend
from .geometry import ConvGeometry


def _flip(w, geom: ConvGeometry):
    """The spatial flip F for conv_mode='convolution' (identity otherwise)."""
    if geom.conv_mode != "convolution":
        return w
    return w[(slice(None), slice(None), *(slice(None, None, -1),) * geom.ndim)]


def _lower_input(x, geom: ConvGeometry, backend):
    """Apply a non-zero padding mode explicitly: (P x, zero-padding geometry)."""
    if geom.padding_mode == "zeros":
        return x, geom
    return backend.pad(x, geom.padding, geom.padding_mode), geom.explicitly_padded()


def _add_bias(y, b, geom: ConvGeometry):
    """y + b[channel], in y's (accumulator) dtype."""
    if b is None:
        return y
    y += b.astype(y.dtype, copy=False).reshape((1, -1) + (1,) * geom.ndim)
    return y


class _Casts:
    """Casts arrays to the compute dtype on the way in and back on the way out."""

    def __init__(self, like, geom: ConvGeometry):
        self.backend = get_backend(like)
        self.dtype = like.dtype
        self.compute = self.backend.compute_dtype(like.dtype, geom.compute_mode)

    def __call__(self, a):
        return None if a is None else a.astype(self.compute, copy=False)

    def back(self, a):
        return None if a is None else a.astype(self.dtype, copy=False)


def _conv(x, w, b, geom: ConvGeometry, backend, final=None):
    """y = A_{Fw} P x + b in the compute dtype, the bias added by the backend in its
    accumulator; ``final``: the dtype y is cast to when nothing else is computed on it (the
    backend may round into it straight away)."""
    x, lowered = _lower_input(x, geom, backend)
    return backend.forward(x, _flip(w, geom), lowered, out_dtype=final, bias=b)


def conv_forward(x, w, b, geom: ConvGeometry):
    """Batched conv forward; arrays in their own dtype, geometry validated."""
    cast = _Casts(x, geom)
    return cast.back(_conv(cast(x), cast(w), cast(b), geom, cast.backend, final=cast.dtype))


def conv_backward(dy, x, w, geom: ConvGeometry, has_bias: bool):
    """(dx, dw, db) of a batched conv; db is None when there is no bias."""
    cast = _Casts(x, geom)
    dy, x, w = cast(dy), cast(x), cast(w)
    x, lowered = _lower_input(x, geom, cast.backend)
    if geom.padding_mode == "zeros":
        dx = cast.backend.backward_data(dy, _flip(w, geom), lowered, out_dtype=cast.dtype)
    else:  # P^T adds into the accumulator first
        dx = cast.backend.backward_data(dy, _flip(w, geom), lowered)
        dx = cast.backend.pad_backward(dx, geom.padding, geom.padding_mode)
    dw = _flip(cast.backend.backward_filter(dy, x, lowered), geom)
    db = cast.backend.bias_grad(dy, geom) if has_bias else None
    return cast.back(dx), cast.back(dw), cast.back(db)


def _jvp(primal, x, w, dx, dw, db, geom: ConvGeometry):
    """d primal(x, w) + db along (dx, dw, db), by bilinearity; any tangent may be None."""
    cast = _Casts(x, geom)
    x, w, dx, dw, db = (cast(a) for a in (x, w, dx, dw, db))
    terms = [
        primal(a, b, None, geom, cast.backend)
        for a, b in ((dx, w), (x, dw))
        if a is not None and b is not None
    ]
    if not terms:  # only the bias moves (or nothing)
        terms = [primal(x, w * 0, None, geom, cast.backend)]
    dy = terms[0]
    for term in terms[1:]:
        dy += term
    return cast.back(_add_bias(dy, db, geom))


def conv_jvp(x, w, dx, dw, db, geom: ConvGeometry):
    """Tangent of a batched conv at (x, w) along (dx, dw, db)."""
    return _jvp(_conv, x, w, dx, dw, db, geom)


def _conv_transpose(x, w, b, geom: ConvGeometry, backend, final=None):
    """y_t = A_{Fw}^T x_t + b in the compute dtype; ``final`` as in ``_conv``."""
    out_dtype = final if b is None else None
    return _add_bias(backend.backward_data(x, _flip(w, geom), geom, out_dtype=out_dtype), b, geom)


def conv_transpose_forward(x, w, b, geom: ConvGeometry):
    """Batched transposed conv forward: y_t = A_{Fw}^T x_t + b."""
    cast = _Casts(x, geom)
    y = _conv_transpose(cast(x), cast(w), cast(b), geom, cast.backend, final=cast.dtype)
    return cast.back(y)


def conv_transpose_backward(dy, x, w, geom: ConvGeometry, has_bias: bool):
    """(dx, dw, db) of a batched transposed conv."""
    cast = _Casts(x, geom)
    dy, x, w = cast(dy), cast(x), cast(w)
    dx = cast.backend.forward(dy, _flip(w, geom), geom, out_dtype=cast.dtype)
    dw = _flip(cast.backend.backward_filter(x, dy, geom), geom)
    db = cast.backend.bias_grad(dy, geom) if has_bias else None
    return cast.back(dx), cast.back(dw), cast.back(db)


def conv_transpose_jvp(x, w, dx, dw, db, geom: ConvGeometry):
    """Tangent of a batched transposed conv at (x, w) along (dx, dw, db)."""
    return _jvp(_conv_transpose, x, w, dx, dw, db, geom)
