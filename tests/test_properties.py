"""Property tests: adjointness, JVP bilinearity, finite-difference gradients."""

import numpy as np
from hypothesis import given
from strategies import conv_cases

from mconv import functional as F


def _dot(a, b):
    return float(np.vdot(a, b))


def _close(a, b, tol=1e-10):
    assert abs(a - b) <= tol * max(1.0, abs(a), abs(b)), (a, b)


@given(conv_cases(max_rank=4, modes=("zeros",), crops=True))
def test_conv_transpose_is_the_adjoint_of_conv(case):
    """<conv(x, w), y> == <x, conv_transpose(y, w)> with the same geometry."""
    x, w, _, kw, rng = case
    kw.pop("padding_mode")
    y = rng.standard_normal(F.conv(x, w, **kw).shape)
    xt = F.conv_transpose(y, w, output_size=x.shape[2:], **kw)
    _close(_dot(F.conv(x, w, **kw), y), _dot(x, xt))


@given(conv_cases(crops=True))
def test_backward_is_the_adjoint_in_x_and_w(case):
    """<conv(x, w), dy> == <x, dx(dy)> == <w, dw(dy)> for every padding mode (conv is bilinear)."""
    x, w, _, kw, rng = case
    y = F.conv(x, w, **kw)
    dy = rng.standard_normal(y.shape)
    dx, dw, _ = F.conv_backward(dy, x, w, has_bias=False, **kw)
    _close(_dot(y, dy), _dot(x, dx))
    _close(_dot(y, dy), _dot(w, dw))


@given(conv_cases(max_rank=4, crops=True))
def test_jvp_is_bilinear(case):
    """conv(x+dx, w+dw, b+db) = conv(x, w, b) + jvp + conv(dx, dw): exact for a bilinear map."""
    x, w, b, kw, rng = case
    dx, dw, db = (
        rng.standard_normal(x.shape),
        rng.standard_normal(w.shape),
        rng.standard_normal(b.shape),
    )
    jvp = F.conv_jvp(x, w, b, dx, dw, db, **kw)
    expected = F.conv(x + dx, w + dw, b + db, **kw) - F.conv(x, w, b, **kw) - F.conv(dx, dw, **kw)
    np.testing.assert_allclose(jvp, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())
    # linear in the tangent
    np.testing.assert_allclose(
        F.conv_jvp(x, w, b, 2.5 * dx, None, None, **kw),
        2.5 * F.conv(dx, w, **kw),
        rtol=1e-12,
        atol=1e-12,
    )


@given(conv_cases(max_rank=3, modes=("zeros",), crops=True))
def test_conv_transpose_jvp_is_bilinear(case):
    x, w, b, kw, rng = case
    kw.pop("padding_mode")
    y = F.conv(x, w, **kw)  # a valid input for the transposed conv with this weight
    bt = rng.standard_normal(w.shape[1] * kw["groups"])
    dy, dw, db = (
        rng.standard_normal(y.shape),
        rng.standard_normal(w.shape),
        rng.standard_normal(bt.shape),
    )
    t = dict(kw, output_size=x.shape[2:])
    jvp = F.conv_transpose_jvp(y, w, bt, dy, dw, db, **t)
    expected = (
        F.conv_transpose(y + dy, w + dw, bt + db, **t)
        - F.conv_transpose(y, w, bt, **t)
        - F.conv_transpose(dy, dw, **t)
    )
    np.testing.assert_allclose(jvp, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


@given(conv_cases())
def test_gradients_match_finite_differences(case):
    """Directional derivative of L = ||conv(x, w, b)||^2 / 2 by finite differences.

    Along a line, L(t) = L(x + t vx, w + t vw, b + t vb) is a polynomial of degree 4 in t
    (conv is bilinear), and the five-point stencil is exact for degree <= 4: only rounding is left.
    """
    x, w, b, kw, rng = case
    vx, vw, vb = (
        rng.standard_normal(x.shape),
        rng.standard_normal(w.shape),
        rng.standard_normal(b.shape),
    )

    def loss(t):
        return 0.5 * float(np.sum(F.conv(x + t * vx, w + t * vw, b + t * vb, **kw) ** 2))

    h = 0.1
    numeric = (loss(-2 * h) - 8 * loss(-h) + 8 * loss(h) - loss(2 * h)) / (12 * h)
    dx, dw, db = F.conv_backward(F.conv(x, w, b, **kw), x, w, has_bias=True, **kw)
    analytic = _dot(dx, vx) + _dot(dw, vw) + _dot(db, vb)
    assert abs(numeric - analytic) <= 1e-8 * max(1.0, abs(analytic), loss(2 * h))
