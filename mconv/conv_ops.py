"""Forward, backward and JVP of conv and transposed conv, from three primitives.

Derivation. For a fixed zero-padding, cross-correlation geometry the
convolution is bilinear in (x, w):

    y[b, o, q] = sum_{c in group(o), i} w[o, c, i] * xpad[b, c, q*stride + i*dilation]

Write it as y = A_w x = B_x w. Its adjoints are again convolutions:

    forward(x, w)          = A_w x                      y  (B, O, *Q)
    backward_data(dy, w)   = A_w^T dy                    dx (B, C, *S)
    backward_filter(dy, x) = B_x^T dy   (dy im2col(x)^T) dW (O, C/G, *k)

so for L(y): dL/dx = A_w^T dL/dy and dL/dw = B_x^T dL/dy. A transposed
convolution is y_t = A_w^T x_t (its weight (I_t, O_t/G, *k) is the conv weight
with out_channels = I_t); <dy_t, A_w^T x_t> = <A_w dy_t, x_t> gives its
gradients. One role table serves both (u lives in the conv's input space, v
in its output space):

                  output        input gradient     weight gradient
    conv          A x           A^T dy             B_u^T v,  (u, v) = (x, dy)
    transposed    A^T x         A dy               B_u^T v,  (u, v) = (dy, x)

Lowering, around the primitives (A = A0 P, so A^T = P^T A0^T):
  * negative padding: P crops the conv input (a view), P^T embeds into zeros;
  * padding_mode reflect/replicate/circular: P is an explicit gather
    (``backend.pad``), P^T scatters the border back (``backend.pad_backward``);
  * conv_mode='convolution': A uses F w, F the spatial flip; dW = F B_u^T v
    (F is its own inverse).
Bias: y += b[channel], added by the primitive that writes y (in its
accumulator, before the one rounding: ``mconv.precision.store``); after P^T it
is added here. db = sum of dy over batch and spatial axes. JVP by
bilinearity: d(op(x, w) + b) = op(dx, w) + op(x, dw) + db, db riding on the
first term's primitive.

Dtypes (``mconv.precision``): primitives get the caller's arrays and return
their accumulator or, asked with ``out_dtype`` where nothing follows, the
caller's dtype directly; each result is cast to the caller's dtype once.
"""

from __future__ import annotations

from ._args import array_module
from .backends import get_backend
from .call import ConvCall
from .precision import add_bias


def _flip(w, geom):
    """The spatial flip F for conv_mode='convolution' (identity otherwise)."""
    if geom.conv_mode != "convolution":
        return w
    return w[(slice(None), slice(None), *(slice(None, None, -1),) * geom.ndim)]


class _Lowered:
    """P and P^T on the conv input space, and the zero-padding geometry between them."""

    def __init__(self, geom, backend):
        self.full, self.backend = geom, backend
        self.crops = any(a or b for a, b in geom.crops)
        self.padded = geom.padding_mode != "zeros"
        self.geom = geom.cropped() if self.crops else geom
        if self.padded:
            self.geom = geom.explicitly_padded()
        self.identity = not (self.crops or self.padded)

    def _window(self):
        return (Ellipsis, *(slice(a, s - b) for s, (a, b) in zip(self.full.in_size, self.full.crops)))

    def pre(self, x):
        """P x: the input the primitives see."""
        if self.crops:
            return x[self._window()]
        if self.padded:
            return self.backend.pad(x, self.full.padding, self.full.padding_mode)
        return x

    def post(self, dx):
        """P^T dx: back to the full conv input."""
        if self.crops:
            full = array_module(dx).zeros(dx.shape[:2] + tuple(self.full.in_size), dx.dtype)
            full[self._window()] = dx
            return full
        if self.padded:
            return self.backend.pad_backward(dx, self.full.padding, self.full.padding_mode)
        return dx


def _apply(call: ConvCall, x, w, b, out_dtype, backend):
    """A_{Fw} P x + b, in ``out_dtype`` or the backend's accumulator."""
    low = _Lowered(call.geom, backend)
    return backend.forward(low.pre(x), _flip(w, call.geom), low.geom, out_dtype=out_dtype, bias=b)


def _apply_adjoint(call: ConvCall, v, w, b, out_dtype, backend):
    """P^T A_{Fw}^T v + b, in ``out_dtype`` or the backend's accumulator."""
    low = _Lowered(call.geom, backend)
    if low.identity:
        return backend.backward_data(v, _flip(w, call.geom), low.geom, out_dtype, bias=b)
    return add_bias(low.post(backend.backward_data(v, _flip(w, call.geom), low.geom)), b)


#: transposed? -> (the op, its adjoint), each a map on (x or dy, w, bias)
_ROLES = {False: (_apply, _apply_adjoint), True: (_apply_adjoint, _apply)}


def forward(call: ConvCall, x, w, b, dtype=None):
    """The op's output for batched ``x`` (None bias: none), in ``dtype`` (default x's)."""
    op, _ = _ROLES[call.transposed]
    dtype = x.dtype if dtype is None else dtype
    return op(call, x, w, b, dtype, get_backend(x)).astype(dtype, copy=False)


def backward(call: ConvCall, dy, x, w):
    """``(dx, dw, db)`` for the output gradient ``dy`` (batched); db is None without a bias."""
    backend, dtype = get_backend(x), x.dtype
    _, adjoint = _ROLES[call.transposed]
    dx = adjoint(call, dy, w, None, dtype, backend)
    u, v = (dy, x) if call.transposed else (x, dy)
    low = _Lowered(call.geom, backend)
    dw = _flip(backend.backward_filter(v, low.pre(u), low.geom), call.geom)
    db = backend.bias_grad(dy, call.geom) if call.has_bias else None
    return tuple(None if a is None else a.astype(dtype, copy=False) for a in (dx, dw, db))


def jvp(call: ConvCall, x, w, dx, dw, db):
    """The tangent of the op (with a bias or not) at (x, w) along (dx, dw, db); any tangent
    may be None (zero)."""
    backend = get_backend(x)
    op, _ = _ROLES[call.transposed]
    pairs = [(a, b) for a, b in ((dx, w), (x, dw)) if a is not None and b is not None]
    if not pairs:  # only the bias moves (or nothing): a zero term of the right shape
        pairs = [(x, w * 0)]
    dy = op(call, *pairs[0], db, None, backend)
    for a, b in pairs[1:]:
        dy += op(call, a, b, None, None, backend)
    return dy.astype(x.dtype, copy=False)
