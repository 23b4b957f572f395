"""Forward and all three gradients against PyTorch float64, to 1e-10 relative."""

import inspect
import itertools

import numpy as np
import pytest

from mconv import functional as F

from reference import assert_close, loop_conv, loop_conv_grads, torch_conv

SIZES = {1: (9,), 2: (7, 6), 3: (6, 5, 5)}
KERNELS = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}
# (groups, in_channels, out_channels): plain, grouped, depthwise with multiplier K=2
GROUPINGS = [(1, 3, 4), (2, 4, 6), (4, 4, 8)]
PADDINGS = [0, 2, "pairs", "same", "valid"]
STRIDE_DILATION_PADDING = [
    (stride, dilation, padding)
    for (stride, dilation), padding in itertools.product(
        [(1, 1), (2, 1), (1, 2), (2, 2), ((2, 1, 3), (1, 2, 1))], PADDINGS
    )
    if not (padding == "same" and stride != 1)  # 'same' needs stride 1: see test_errors
]


def _pairs(padding, n):
    """The padding argument to pass, and the same padding as explicit pairs or a string."""
    if padding == "pairs":
        pairs = ((1, 2), (0, 1), (2, 0))[:n]
        return pairs, pairs
    if isinstance(padding, str):
        return padding, padding
    return padding, ((padding, padding),) * n


def _case(rng, n, groups, cin, cout, bias):
    x = rng.standard_normal((2, cin, *SIZES[n]))
    w = rng.standard_normal((cout, cin // groups, *KERNELS[n]))
    b = rng.standard_normal(cout) if bias else None
    return x, w, b


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("stride,dilation,padding", STRIDE_DILATION_PADDING)
@pytest.mark.parametrize("groups,cin,cout", GROUPINGS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_conv_matches_torch(rng, n, stride, dilation, groups, cin, cout, padding, bias, batched):
    if isinstance(stride, tuple):
        stride, dilation = stride[:n], dilation[:n]
    x, w, b = _case(rng, n, groups, cin, cout, bias)
    arg, pairs = _pairs(padding, n)
    kw = dict(stride=stride, padding=arg, dilation=dilation, groups=groups)
    y = F.conv(x if batched else x[0], w, b, **kw)
    dy = rng.standard_normal((2, *y.shape[-n - 1 :]))
    ref_y, ref_dx, ref_dw, ref_db = torch_conv(
        x, w, b, dy, stride=stride, padding=pairs, dilation=dilation, groups=groups
    )
    if not batched:
        ref_y, ref_dx, dy = ref_y[:1], ref_dx[:1], dy[:1]
        ref_dw, ref_db = torch_conv(
            x[:1], w, b, dy, stride=stride, padding=pairs, dilation=dilation, groups=groups
        )[2:]
    dx, dw, db = F.conv_backward(
        dy if batched else dy[0], x if batched else x[0], w, has_bias=bias, **kw
    )
    assert_close(y if batched else y[None], ref_y)
    assert_close(dx if batched else dx[None], ref_dx)
    assert_close(dw, ref_dw)
    if bias:
        assert_close(db, ref_db)
    else:
        assert db is None


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ranked_aliases_match_generic(rng, n):
    x, w, b = _case(rng, n, 1, 3, 4, True)
    ranked = getattr(F, f"conv{n}d")(x, w, b, stride=2, padding=1)
    assert_close(
        ranked, torch_conv(x, w, b, None, stride=2, padding=((1, 1),) * n, dilation=1, groups=1)
    )


@pytest.mark.parametrize(
    "stride,dilation,groups,pairs",
    [
        (1, 1, 1, ((0, 0),) * 4),
        ((2, 1, 1, 2), (1, 2, 1, 1), 2, ((1, 0), (0, 2), (1, 1), (0, 0))),
        (1, (1, 1, 2, 1), 3, ((1, 1),) * 4),
    ],
)
@pytest.mark.parametrize("bias", [True, False])
def test_rank4_against_loop_reference(rng, stride, dilation, groups, pairs, bias):
    n = 4
    cin = 2 * groups
    x = rng.standard_normal((2, cin, 4, 5, 4, 3))
    w = rng.standard_normal((2 * groups, cin // groups, 2, 2, 3, 2))
    b = rng.standard_normal(2 * groups) if bias else None
    stride_t = stride if isinstance(stride, tuple) else (stride,) * n
    dil_t = dilation if isinstance(dilation, tuple) else (dilation,) * n
    y = F.conv(x, w, b, stride=stride, padding=pairs, dilation=dilation, groups=groups)
    assert_close(y, loop_conv(x, w, b, stride_t, pairs, dil_t, groups))
    dy = rng.standard_normal(y.shape)
    dx, dw, db = F.conv_backward(
        dy, x, w, has_bias=bias, stride=stride, padding=pairs, dilation=dilation, groups=groups
    )
    ref_dx, ref_dw = loop_conv_grads(x, w, dy, stride_t, pairs, dil_t, groups)
    assert_close(dx, ref_dx)
    assert_close(dw, ref_dw)
    if bias:
        assert_close(db, dy.sum(axis=(0, 2, 3, 4, 5)))


def test_empty_batch(rng):
    x = np.zeros((0, 2, 5, 5))
    w = rng.standard_normal((3, 2, 3, 3))
    y = F.conv2d(x, w, padding=1)
    assert y.shape == (0, 3, 5, 5)
    dx, dw, db = F.conv_backward(np.zeros((0, 3, 5, 5)), x, w, has_bias=True, padding=1)
    assert dx.shape == (0, 2, 5, 5) and not dw.any() and not db.any()


def test_true_convolution_matches_numpy_convolve(rng):
    x, k = rng.standard_normal(20), rng.standard_normal(5)
    for mode, padding in (("valid", 0), ("full", 4)):
        y = F.conv1d(x[None, None], k[None, None], padding=padding, conv_mode="convolution")
        assert_close(y[0, 0], np.convolve(x, k, mode))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_low_precision_dtypes(rng, dtype, n):
    x, w, b = _case(rng, n, 2, 4, 6, True)
    xl, wl, bl = (a.astype(dtype) for a in (x, w, b))
    y = F.conv(xl, wl, bl, stride=2, padding=1, groups=2)
    assert y.dtype == dtype
    dy = rng.standard_normal(y.shape).astype(dtype)
    ref = torch_conv(
        *(a.astype(np.float64) for a in (xl, wl, bl, dy)),
        stride=2,
        padding=((1, 1),) * n,
        dilation=1,
        groups=2,
    )
    tol = 1e-6 if dtype == np.float32 else 1e-3
    for got, want in zip(
        (y, *F.conv_backward(dy, xl, wl, has_bias=True, stride=2, padding=1, groups=2)), ref
    ):
        assert got.dtype == dtype
        assert_close(got, want, tol)


def test_ranked_aliases_take_pytorch_positional_arguments(rng):
    x, w, b = _case(rng, 2, 2, 4, 6, True)
    # torch.nn.functional.conv2d(input, weight, bias, stride, padding, dilation, groups)
    y = F.conv2d(x, w, b, 2, 1, 1, 2)
    ref = torch_conv(x, w, b, None, stride=2, padding=((1, 1),) * 2, dilation=1, groups=2)
    assert_close(y, ref)
    assert F.conv2d.__name__ == "conv2d" and "padding_mode" in str(inspect.signature(F.conv2d))


def test_inputs_are_never_written_and_views_work(rng):
    x, w, b = _case(rng, 2, 2, 4, 6, True)
    big = rng.standard_normal((2, 4, 14, 12))
    view = big[:, :, ::2, ::2]  # non-contiguous, same values as a fresh copy
    for a in (x, w, b, big):
        a.flags.writeable = False
    kw = dict(stride=2, padding=1, groups=2, padding_mode="reflect", conv_mode="convolution")
    y = F.conv(view, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    dy.flags.writeable = False
    got = (y, *F.conv_backward(dy, view, w, has_bias=True, **kw))
    ref = torch_conv(
        np.ascontiguousarray(view),
        w,
        b,
        dy,
        stride=2,
        padding=((1, 1),) * 2,
        dilation=1,
        groups=2,
        padding_mode="reflect",
        conv_mode="convolution",
    )
    for mine, theirs in zip(got, ref):
        assert_close(mine, theirs)
    F.conv_jvp(view, w, b, view, w, b, **kw)
    F.conv_transpose(y, w, None, stride=2, groups=2)
    F.conv_transpose_backward(
        view, y, w, has_bias=True, stride=2, padding=1, groups=2, output_size=(7, 6)
    )
