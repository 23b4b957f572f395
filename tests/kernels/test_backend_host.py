"""The GPU backend's algorithm (mconv.kernels.ops: kernels + cuBLAS GEMM calls)
run on the CPU through the host build, end to end through mconv.functional,
against the NumPy backend (float64) as the reference.

``host_backend`` swaps the backend that ``mconv.conv_ops`` picks for NumPy
arrays; everything above it (geometry, padding modes, conv_mode, bias, casts)
is the code that runs on a GPU.
"""

import itertools

import numpy as np
import pytest

from mconv import conv_ops
from mconv import functional as F
from mconv.backends import get_backend
from mconv.kernels import host
from mconv.kernels.ops import KernelBackend

SIZES = {1: (9,), 2: (7, 6), 3: (6, 5, 5)}
KERNELS = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}
# (groups, in, out): plain, grouped, depthwise with multiplier 2, depthwise
GROUPINGS = [(1, 3, 4), (2, 4, 6), (4, 4, 8), (3, 3, 3)]
STRIDE_DILATION = [(1, 1), (2, 1), ((2, 1, 3), (1, 2, 1))]
# (padding, padding_mode, conv_mode)
PADDINGS = [
    (0, "zeros", "cross_correlation"),
    ("pairs", "zeros", "convolution"),
    ("same", "reflect", "cross_correlation"),
    (1, "replicate", "convolution"),
    ("pairs", "circular", "cross_correlation"),
]


@pytest.fixture
def host_backend(monkeypatch, host_lib):
    """Route mconv.conv_ops through KernelBackend(HostExecutor); yields the executor."""
    executor = host.HostExecutor(host_lib)
    backend = KernelBackend(executor)
    monkeypatch.setattr(conv_ops, "get_backend", lambda array: backend)
    executor.backend = backend
    return executor


def _reference(fn, *arrays, **kw):
    """The same call on the NumPy backend in float64 (whatever backend is patched in)."""
    patched, conv_ops.get_backend = conv_ops.get_backend, get_backend
    try:
        return fn(*(None if a is None else a.astype(np.float64) for a in arrays), **kw)
    finally:
        conv_ops.get_backend = patched


def _close(got, want, tol):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want)
    assert got.shape == want.shape
    scale = max(float(np.abs(want).max(initial=0)), 1e-300)
    assert float(np.abs(got - want).max(initial=0)) <= tol * scale


def _case(rng, n, groups, cin, cout, dtype=np.float64):
    x = rng.standard_normal((2, cin, *SIZES[n])).astype(dtype)
    w = rng.standard_normal((cout, cin // groups, *KERNELS[n])).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("stride,dilation", STRIDE_DILATION)
@pytest.mark.parametrize("groups,cin,cout", GROUPINGS)
@pytest.mark.parametrize("padding,padding_mode,conv_mode", PADDINGS)
def test_conv_and_gradients_match_numpy(
    monkeypatch, host_lib, n, stride, dilation, groups, cin, cout, padding, padding_mode, conv_mode
):
    if isinstance(stride, tuple):
        stride, dilation = stride[:n], dilation[:n]
    if padding == "same" and stride != 1:
        stride = 1
    if padding == "pairs":
        padding = ((1, 2), (0, 1), (2, 0))[:n]
    rng = np.random.default_rng(n)
    x, w, b = _case(rng, n, groups, cin, cout)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups,
              padding_mode=padding_mode, conv_mode=conv_mode)  # fmt: skip
    want_y = F.conv(x, w, b, **kw)
    dy = rng.standard_normal(want_y.shape)
    want = (want_y, *F.conv_backward(dy, x, w, has_bias=True, **kw))
    backend = KernelBackend(host.HostExecutor(host_lib))
    monkeypatch.setattr(conv_ops, "get_backend", lambda array: backend)
    got = (F.conv(x, w, b, **kw), *F.conv_backward(dy, x, w, has_bias=True, **kw))
    for mine, ref in zip(got, want):
        _close(mine, ref, 1e-12)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("groups,cin,cout", GROUPINGS)
def test_transposed_conv_and_jvp_match_numpy(monkeypatch, host_lib, n, groups, cin, cout):
    rng = np.random.default_rng(10 + n)
    x, w, b = _case(rng, n, groups, cin, cout)
    kw = dict(stride=2, padding=1, dilation=2, groups=groups)
    tw = rng.standard_normal((cin, cout // groups, *KERNELS[n]))  # transposed: (in, out/G, *k)
    tb, dtw, dtb = (
        rng.standard_normal(cout),
        rng.standard_normal(tw.shape),
        rng.standard_normal(cout),
    )
    dx, dw, db = (rng.standard_normal(a.shape) for a in (x, w, b))
    tkw = dict(stride=2, padding=1, groups=groups, output_padding=1)
    tdy = rng.standard_normal(F.conv_transpose(x, tw, tb, **tkw).shape)
    calls = [
        lambda: F.conv_jvp(x, w, b, dx, dw, db, **kw),
        lambda: F.conv_jvp(x, w, b, None, None, db, **kw),
        lambda: F.conv_transpose(x, tw, tb, **tkw),
        lambda: F.conv_transpose_backward(tdy, x, tw, has_bias=True, **tkw),
        lambda: F.conv_transpose_jvp(x, tw, tb, dx, dtw, dtb, **tkw),
    ]
    want = [call() for call in calls]
    backend = KernelBackend(host.HostExecutor(host_lib))
    monkeypatch.setattr(conv_ops, "get_backend", lambda array: backend)
    for call, ref in zip(calls, want):
        got = call()
        for mine, theirs in zip(got if isinstance(got, tuple) else (got,),
                                ref if isinstance(ref, tuple) else (ref,)):  # fmt: skip
            _close(mine, theirs, 1e-12)


def test_rank4_and_batch_chunks(monkeypatch, host_lib):
    """Rank 4 on the GEMM path, with a workspace so small that every image is its own chunk."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 4, 5, 4, 3))
    w = rng.standard_normal((6, 2, 2, 2, 3, 2))
    kw = dict(stride=(2, 1, 1, 2), padding=((1, 0), (0, 2), (1, 1), (0, 0)), groups=2,
              dilation=(1, 2, 1, 1))  # fmt: skip
    y = F.conv(x, w, **kw)
    dy = rng.standard_normal(y.shape)
    for dtype, mode in ((np.float64, "default"), (np.float16, "default"), (np.float16, "float32")):
        executor = host.HostExecutor(host_lib)
        backend = KernelBackend(executor, workspace=1)
        monkeypatch.setattr(conv_ops, "get_backend", lambda array, b=backend: b)
        xl, wl, dyl = (a.astype(dtype) for a in (x, w, dy))
        got = (F.conv(xl, wl, compute_mode=mode, **kw),
               *F.conv_backward(dyl, xl, wl, has_bias=False, compute_mode=mode, **kw)[:2])  # fmt: skip
        ref = (_reference(F.conv, xl, wl, **kw),
               *_reference(lambda *a, **k: F.conv_backward(*a, has_bias=False, **k)[:2],
                           dyl, xl, wl, **kw))  # fmt: skip
        for mine, theirs in zip(got, ref):
            assert mine.dtype == dtype
            _close(mine, theirs, 1e-12 if dtype == np.float64 else 2e-3)
        assert sum(1 for name, _ in executor.launches if name == "im2col") == 3 + 3
        assert [c.beta for c in executor.gemms[-3:]] == [0.0, 1.0, 1.0]  # dW adds up the chunks


def test_pointwise_conv_skips_im2col(host_backend):
    rng = np.random.default_rng(6)
    x, w = rng.standard_normal((3, 8, 5, 4)), rng.standard_normal((6, 4, 1, 1))
    y = F.conv(x, w, groups=2)
    dx, _, _ = F.conv_backward(rng.standard_normal(y.shape), x, w, has_bias=False, groups=2)
    names = [name for name, _ in host_backend.launches]
    assert "im2col" in names  # dW still gathers per-group columns
    assert names.count("im2col") == 1 and "col2im" not in names
    assert y.shape == (3, 6, 5, 4) and dx.shape == x.shape


@pytest.mark.parametrize("batch,groups,calls", [(1, 1, 1), (5, 1, 1), (2, 4, 2), (6, 2, 2)])
def test_gemm_calls_loop_over_the_shorter_axis(host_backend, batch, groups, calls):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((batch, 2 * groups, 6, 6))
    w = rng.standard_normal((3 * groups, 2, 3, 3))
    F.conv(x, w, groups=groups)
    forward = host_backend.gemms
    assert len(forward) == calls
    assert {call.batch for call in forward} == {max(batch, groups)}


def _fp16_spacing(values):
    return np.spacing(np.abs(values).astype(np.float16)).astype(np.float64)


def _check_one_rounding(got, exact, terms):
    """Within half an fp16 spacing of the exact value (+ fp32 accumulation slack)."""
    assert got.dtype == np.float16
    err = np.abs(got.astype(np.float64) - exact)
    assert np.all(err <= 0.5 * _fp16_spacing(exact) + terms * 2.0**-24 * np.abs(exact))
    assert np.mean(got == exact.astype(np.float16)) > 0.99


def test_fp16_float32_mode_rounds_once(host_backend):
    """Long reductions (sums past 2048, where fp16's spacing is 2) in every primitive."""
    rng = np.random.default_rng(8)
    x = rng.uniform(0, 1, (2, 1024, 40)).astype(np.float16)
    w = rng.uniform(0, 1, (8, 1024, 9)).astype(np.float16)
    b = rng.uniform(0, 1, 8).astype(np.float16)
    y = F.conv1d(x, w, b, compute_mode="float32")
    exact = _reference(F.conv1d, x, w, b)
    assert exact.max() > 2048
    _check_one_rounding(y, exact, 1024 * 9)
    y0 = F.conv1d(x, w, compute_mode="default")  # default: fp32 GEMM, one rounding, no bias
    _check_one_rounding(y0, _reference(F.conv1d, x, w), 1024 * 9)

    x = rng.uniform(0, 1, (8, 4, 40, 40)).astype(np.float16)
    w = rng.uniform(0, 1, (4, 4, 3, 3)).astype(np.float16)
    dy = rng.uniform(0, 1, (8, 4, 38, 38)).astype(np.float16)
    got = F.conv_backward(dy, x, w, has_bias=True, compute_mode="float32")
    want = _reference(lambda *a: F.conv_backward(*a, has_bias=True), dy, x, w)
    for mine, exact, terms in zip(got, want, (4 * 9, 8 * 38 * 38, 8 * 38 * 38)):
        _check_one_rounding(mine, exact, terms)

    x = rng.uniform(0, 1, (1, 256, 5)).astype(np.float16)  # the reflect adjoint is a sum too
    w = rng.uniform(0, 1, (256, 256, 3)).astype(np.float16)
    dy = rng.uniform(0, 1, (1, 256, 5)).astype(np.float16)
    kw = dict(padding=1, padding_mode="reflect")
    dx = F.conv_backward(dy, x, w, has_bias=False, compute_mode="float32", **kw)[0]
    exact = _reference(lambda *a, **k: F.conv_backward(*a, has_bias=False, **k)[0], dy, x, w, **kw)
    _check_one_rounding(dx, exact, 256 * 3 * 2)


def test_fp16_depthwise_and_transposed_float32_mode(host_backend):
    rng = np.random.default_rng(9)
    x = rng.uniform(0, 1, (16, 3, 30, 30)).astype(np.float16)
    w = rng.uniform(0, 1, (6, 1, 3, 3)).astype(np.float16)
    dy = rng.uniform(0, 1, (16, 6, 28, 28)).astype(np.float16)
    _, dw, db = F.conv_backward(dy, x, w, has_bias=True, groups=3, compute_mode="float32")
    _, ew, eb = _reference(lambda *a, **k: F.conv_backward(*a, has_bias=True, **k), dy, x, w,
                           groups=3)  # fmt: skip
    assert ew.min() > 2048
    _check_one_rounding(dw, ew, 16 * 28 * 28)
    _check_one_rounding(db, eb, 16 * 28 * 28)
    xt = rng.uniform(0, 1, (1, 1024, 6)).astype(np.float16)
    wt = rng.uniform(0, 1, (1024, 4, 3)).astype(np.float16)
    yt = F.conv_transpose1d(xt, wt, stride=2, compute_mode="float32")
    _check_one_rounding(yt, _reference(F.conv_transpose1d, xt, wt, stride=2), 1024 * 3)


@pytest.mark.parametrize(
    "dtype,mode", list(itertools.product([np.float16, np.float32], ["default", "float32"]))
)
def test_low_precision_results_keep_the_input_dtype(host_backend, dtype, mode):
    rng = np.random.default_rng(11)
    x, w, b = _case(rng, 2, 2, 4, 6, dtype)
    kw = dict(stride=2, padding=1, groups=2, padding_mode="circular", compute_mode=mode)
    y = F.conv(x, w, b, **kw)
    dy = rng.standard_normal(y.shape).astype(dtype)
    got = (y, *F.conv_backward(dy, x, w, has_bias=True, **kw))
    kw.pop("compute_mode")
    want = (_reference(F.conv, x, w, b, **kw),
            *_reference(lambda *a, **k: F.conv_backward(*a, has_bias=True, **k), dy, x, w, **kw))  # fmt: skip
    for mine, ref in zip(got, want):
        assert mine.dtype == dtype
        _close(mine, ref, 2e-3 if dtype == np.float16 else 1e-5)
