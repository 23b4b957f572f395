"""CuPy backend vs NumPy backend on a real GPU: the full parity grid.

Run with ``python -m pytest -m gpu tests/gpu`` on a machine with CuPy and an
NVIDIA GPU; elsewhere every test here is skipped. The reference is the NumPy
backend in float64 on the same (rounded) inputs.
"""

import itertools

import gpu_env
import numpy as np
import pytest

from mconv import functional as F
from mconv.backends import cupy_backend
from mconv.geometry import conv_geometry

pytestmark = gpu_env.requires_gpu

SIZES = {1: (9,), 2: (7, 6), 3: (6, 5, 5)}
KERNELS = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}
# (groups, in, out): plain, grouped, depthwise with multiplier 2, depthwise
GROUPINGS = [(1, 3, 4), (2, 4, 6), (4, 4, 8), (3, 3, 3)]
STRIDE_DILATION = [(1, 1), (2, 1), (1, 2), (2, 2), ((2, 1, 3), (1, 2, 1))]
# (padding, padding_mode, conv_mode)
PADDINGS = [
    (0, "zeros", "cross_correlation"),
    (2, "zeros", "convolution"),
    ("pairs", "zeros", "cross_correlation"),
    ("same", "zeros", "convolution"),
    ("valid", "zeros", "cross_correlation"),
    (1, "reflect", "cross_correlation"),
    ("pairs", "replicate", "convolution"),
    ("same", "circular", "cross_correlation"),
]
GEOMETRIES = [
    (stride, dilation, *padding)
    for (stride, dilation), padding in itertools.product(STRIDE_DILATION, PADDINGS)
    if not (padding[0] == "same" and stride != 1)  # 'same' needs stride 1
]
# dtype, compute_mode, tolerance relative to the largest reference value
PRECISIONS = [
    (np.float64, "default", 1e-10),
    (np.float32, "default", 1e-5),
    (np.float16, "default", 3e-3),
    (np.float16, "float32", 2e-3),
]


def cupy():
    import cupy as cp

    return cp


def _close(got, want, tol):
    cp = cupy()
    assert isinstance(got, cp.ndarray), type(got)
    got = cp.asnumpy(got).astype(np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = max(float(np.abs(want).max(initial=0)), 1e-300)
    err = float(np.abs(got - want).max(initial=0))
    assert err <= tol * scale, f"max abs error {err:.3e} > {tol:.0e} * {scale:.3e}"


def _pairs(padding, n):
    return ((1, 2), (0, 1), (2, 0))[:n] if padding == "pairs" else padding


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("stride,dilation,padding,padding_mode,conv_mode", GEOMETRIES)
@pytest.mark.parametrize("groups,cin,cout", GROUPINGS)
@pytest.mark.parametrize("dtype,mode,tol", PRECISIONS)
def test_conv_and_gradients(n, stride, dilation, groups, cin, cout, padding, padding_mode,
                            conv_mode, dtype, mode, tol):  # fmt: skip
    if isinstance(stride, tuple):
        stride, dilation = stride[:n], dilation[:n]
    cp, rng = cupy(), np.random.default_rng(n)
    x = rng.standard_normal((2, cin, *SIZES[n])).astype(dtype)
    w = rng.standard_normal((cout, cin // groups, *KERNELS[n])).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    kw = dict(stride=stride, padding=_pairs(padding, n), dilation=dilation, groups=groups,
              padding_mode=padding_mode, conv_mode=conv_mode)  # fmt: skip
    x64, w64, b64 = (a.astype(np.float64) for a in (x, w, b))
    want_y = F.conv(x64, w64, b64, **kw)
    dy = rng.standard_normal(want_y.shape).astype(dtype)
    want = (want_y, *F.conv_backward(dy.astype(np.float64), x64, w64, has_bias=True, **kw))
    xd, wd, bd, dyd = (cp.asarray(a) for a in (x, w, b, dy))
    y = F.conv(xd, wd, bd, compute_mode=mode, **kw)
    got = (y, *F.conv_backward(dyd, xd, wd, has_bias=True, compute_mode=mode, **kw))
    for mine, ref in zip(got, want):
        assert mine.dtype == dtype
        _close(mine, ref, tol)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("groups,cin,cout", GROUPINGS)
@pytest.mark.parametrize("dtype,mode,tol", PRECISIONS)
def test_transposed_conv_and_jvp(n, groups, cin, cout, dtype, mode, tol):
    cp, rng = cupy(), np.random.default_rng(10 + n)
    x = rng.standard_normal((2, cin, *SIZES[n])).astype(dtype)
    w = rng.standard_normal((cout, cin // groups, *KERNELS[n])).astype(dtype)
    b, db = (rng.standard_normal(cout).astype(dtype) for _ in range(2))
    dx, dw = rng.standard_normal(x.shape).astype(dtype), rng.standard_normal(w.shape).astype(dtype)
    tw = rng.standard_normal((cin, cout // groups, *KERNELS[n])).astype(dtype)  # (in, out/G, *k)
    kw = dict(stride=2, padding=1, dilation=2, groups=groups)
    tkw = dict(stride=2, padding=1, groups=groups, output_padding=1)
    ty = F.conv_transpose(x.astype(np.float64), tw.astype(np.float64), None, **tkw)
    tdy = rng.standard_normal(ty.shape).astype(dtype)
    calls = [
        lambda a, m: F.conv_jvp(*a[:6], compute_mode=m, **kw),
        lambda a, m: F.conv_transpose(a[0], a[6], a[2], compute_mode=m, **tkw),
        lambda a, m: F.conv_transpose_backward(
            a[7], a[0], a[6], has_bias=True, compute_mode=m, **tkw
        ),  # fmt: skip
    ]
    arrays = [x, w, b, dx, dw, db, tw, tdy]
    for call in calls:
        want = call([a.astype(np.float64) for a in arrays], "default")
        got = call([cp.asarray(a) for a in arrays], mode)
        for mine, ref in zip(got if isinstance(got, tuple) else (got,),
                             want if isinstance(want, tuple) else (want,)):  # fmt: skip
            assert mine.dtype == dtype
            _close(mine, ref, tol)


@pytest.mark.parametrize("workspace_mb", [None, "0"])
def test_rank4_and_batch_chunks(monkeypatch, workspace_mb):
    if workspace_mb is not None:
        monkeypatch.setenv("MCONV_WORKSPACE_MB", workspace_mb)  # one image per chunk
    cp, rng = cupy(), np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 4, 5, 4, 3))
    w = rng.standard_normal((6, 2, 2, 2, 3, 2))
    kw = dict(stride=(2, 1, 1, 2), padding=((1, 0), (0, 2), (1, 1), (0, 0)), groups=2,
              dilation=(1, 2, 1, 1))  # fmt: skip
    y = F.conv(x, w, **kw)
    dy = rng.standard_normal(y.shape)
    want = (y, *F.conv_backward(dy, x, w, has_bias=True, **kw))
    got = (F.conv(cp.asarray(x), cp.asarray(w), **kw),
           *F.conv_backward(cp.asarray(dy), cp.asarray(x), cp.asarray(w), has_bias=True, **kw))  # fmt: skip
    for mine, ref in zip(got, want):
        _close(mine, ref, 1e-10)


def test_results_are_deterministic():
    """Gathers and fixed-order reductions: two runs give the same bits."""
    cp, rng = cupy(), np.random.default_rng(6)
    for groups, cout in ((1, 8), (8, 16)):
        x = cp.asarray(rng.standard_normal((4, 8, 33, 31)).astype(np.float32))
        w = cp.asarray(rng.standard_normal((cout, 8 // groups, 3, 3)).astype(np.float32))
        kw = dict(stride=2, padding=1, groups=groups, padding_mode="reflect")
        dy = cp.asarray(rng.standard_normal(F.conv(x, w, **kw).shape).astype(np.float32))
        runs = [F.conv_backward(dy, x, w, has_bias=True, **kw) for _ in range(2)]
        for a, b in zip(*runs):
            assert bool((a == b).all())


def test_views_and_empty_batches():
    cp, rng = cupy(), np.random.default_rng(7)
    big = rng.standard_normal((2, 4, 14, 12))
    w = rng.standard_normal((6, 2, 3, 3))
    view = cp.asarray(big)[:, :, ::2, ::2]  # non-contiguous on the device
    want = F.conv(np.ascontiguousarray(big[:, :, ::2, ::2]), w, groups=2, padding=1)
    _close(F.conv(view, cp.asarray(w), groups=2, padding=1), want, 1e-10)
    empty = cp.zeros((0, 4, 5, 5))
    y = F.conv(empty, cp.asarray(w), groups=2, padding=1)
    dx, dw, db = F.conv_backward(cp.zeros(y.shape), empty, cp.asarray(w), has_bias=True,
                                 groups=2, padding=1)  # fmt: skip
    assert y.shape == (0, 6, 5, 5) and dx.shape == empty.shape
    assert not bool(dw.any()) and not bool(db.any())


@pytest.mark.slow
def test_buffers_past_2_to_the_31():
    """Columns of 2.4e9 elements (a 3x3 conv of 64 x 2048 x 2048 fp16), and a bias
    reduction over 2^31 + 2^16 elements: 64-bit indexing in im2col, col2im and reductions."""
    cp = cupy()
    free, _ = cp.cuda.Device().mem_info
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    rng = np.random.default_rng(8)
    x = cp.asarray(rng.standard_normal((1, 64, 2048, 2048), dtype=np.float32).astype(np.float16))
    w = cp.asarray(rng.standard_normal((4, 64, 3, 3)).astype(np.float16))
    y = F.conv(x, w, padding=1, compute_mode="float32")
    corner = cp.asnumpy(x[:, :, -9:, -9:]).astype(np.float64)  # the last rows of the columns
    want = F.conv(corner, cp.asnumpy(w).astype(np.float64), padding=((0, 1), (0, 1)))  # 8 x 8
    _close(y[:, :, -8:, -8:], want, 2e-3)
    dx = F.conv_backward(y, x, w, has_bias=False, padding=1, compute_mode="float32")[0]
    want_dx = F.conv_backward(cp.asnumpy(y[:, :, -8:, -8:]).astype(np.float64), corner[:, :, 1:, 1:],
                              cp.asnumpy(w).astype(np.float64), has_bias=False,
                              padding=1)[0]  # fmt: skip
    _close(dx[:, :, -7:, -7:], want_dx[:, :, 1:, 1:], 2e-3)  # rows fed only by the last outputs
    p = 2**30 + 2**15
    dy = cp.zeros((2, 1, p), dtype=np.float32)
    dy[1, 0, -1], dy[0, 0, 3] = 3.0, 1.0  # flat index 2^31 + 2^16 - 1
    geom, _ = conv_geometry((2, 1, p), (1, 1, 1))
    assert float(cupy_backend.bias_grad(dy, geom)[0]) == 4.0


def test_second_gpu_when_present():
    if gpu_env.device_count() < 2:
        pytest.skip("needs two GPUs")
    cp, rng = cupy(), np.random.default_rng(9)
    x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 3, 3))
    with cp.cuda.Device(1):
        xd, wd = cp.asarray(x), cp.asarray(w)
    with cp.cuda.Device(0):  # the current device differs from the arrays' device
        y = F.conv(xd, wd, padding=1)
    assert y.device.id == 1
    _close(y, F.conv(x, w, padding=1), 1e-10)
