"""The JIT paths of the NumPy backend (numba): direct depthwise kernels and Winograd F(4x4, 3x3)
(forward, input and weight gradients).

Each is checked against torch float64 on drawn geometries (padding forms and modes, both
conv modes, sizes that leave partial tiles, row blocks and multi-image tasks, one and two
threads), with a spy proving the path ran. Depthwise sums are plain sums (float64 parity to
1e-10); Winograd rounds differently, so its bound is relative to the largest |x| * |w| (the
sum of absolute products an output is made of).
"""

import contextlib
import math
import os
import subprocess
import sys
import tracemalloc
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from reference import assert_close, torch_conv

import mconv
from mconv import functional as F
from mconv.backends import (numpy_depthwise, numpy_direct, numpy_direct_plan, numpy_jit,
                            numpy_threads, numpy_winograd)  # fmt: skip

pytestmark = pytest.mark.skipif(not numpy_jit.enabled(), reason="numba is not installed")

# measured: up to 2e-6 of max |x| * |w| (docs/benchmarks.md); float32 plain sums: 1.5e-7
WINOGRAD_BOUND = 2e-5


@contextlib.contextmanager
def _spy(module, name):
    """Count the calls of ``module.name`` while the block runs."""
    calls, original = [], getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    setattr(module, name, spy)
    try:
        yield calls
    finally:
        setattr(module, name, original)


@contextlib.contextmanager
def _small_tasks(threads: int, task_bytes: int):
    """Tasks of ``task_bytes`` (the direct kernels': slabs of a quarter of that, results in
    pieces of that), ``threads`` forced workers, and Winograd for any layer size."""
    settings = {
        (numpy_winograd, "_TASK_BYTES"): task_bytes,
        (numpy_depthwise, "_TASK_BYTES"): task_bytes,
        (numpy_direct_plan, "TASK_BYTES"): task_bytes,
        (numpy_direct_plan, "SLAB_BYTES"): task_bytes // 4,
        (numpy_direct_plan, "CHUNK_BYTES"): task_bytes,
        (numpy_winograd, "MIN_CHANNELS"): 1,
        (numpy_winograd, "MIN_TILES"): 1,
        (numpy_winograd, "MAX_U_BYTES_PER_TILE"): math.inf,
        (numpy_threads, "MIN_PARALLEL_WORK"): 0,
    }
    before = mconv.get_num_threads()
    with contextlib.ExitStack() as stack:
        for (module, name), value in settings.items():
            stack.enter_context(mock.patch.object(module, name, value))
        mconv.set_num_threads(threads)
        try:
            yield
        finally:
            mconv.set_num_threads(before)


@st.composite
def winograd_cases(draw):
    """A dense conv Winograd takes: 2-d 3x3, or 3-d k x 3 x 3 with any depth stride; any
    padding pairs and mode, sizes from 1 to 13 (3-d: depth up to 6)."""
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    most = 5 if mode == "zeros" else 2  # zero padding may exceed a tile
    rank = draw(st.sampled_from([2, 3]))
    kernel = ((draw(st.integers(1, 3)),) if rank == 3 else ()) + (3, 3)
    pairs = tuple((draw(st.integers(0, most)), draw(st.integers(0, most))) for _ in kernel)
    size = []
    for k, p in zip(kernel, pairs):
        least = max(1, k - sum(p)) if mode == "zeros" else max(k, *p) + 1  # reflect: pad < size
        size.append(draw(st.integers(least, 6 if len(size) < rank - 2 else 13)))
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 9)), *size)
    out_channels = draw(st.integers(1, 9))
    stride = ((draw(st.integers(1, 2)),) if rank == 3 else ()) + (1, 1)
    kw = dict(stride=stride, padding=pairs, dilation=1, groups=1, padding_mode=mode,
              conv_mode=draw(st.sampled_from(["cross_correlation", "convolution"])))  # fmt: skip
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1.0, 1e-3, 1e3]))
    x = rng.standard_normal(shape) * scale + draw(st.sampled_from([0.0, 5.0]))
    w = rng.standard_normal((out_channels, shape[1], *kernel))
    return x, w, rng.standard_normal(out_channels), kw, rng


def _bounded(got, want, absolute, bound):
    """|got - want| <= bound * max(|x| * |w|) (plus the result's own rounding): a transform
    mixes a whole tile, so an output's error follows its neighbours' scale, not its own."""
    info = np.finfo(got.dtype)
    rounding = info.eps * np.abs(want) + info.smallest_subnormal  # float16 results may be tiny
    excess = np.abs(got.astype(np.float64) - want) - (bound * absolute.max() + rounding)
    assert excess.max(initial=0.0) <= 1e-300, f"error over the bound by {excess.max():.3g}"


@settings(max_examples=150, deadline=None)
@given(winograd_cases(), st.sampled_from([np.float32, np.float16]), st.sampled_from([1, 2]),
       st.sampled_from([600, 4 << 20]))  # fmt: skip
def test_winograd_matches_torch_within_its_bound(case, dtype, threads, task_bytes):
    """y, dx (backward_data's phases are k x 3 x 3 convs of stride 1 on the last axes too) and
    dW (the adjoint transforms: where the direct kernels cannot run, an llvmlite older than
    LLVM 15; they are switched off here) against torch float64 of the same (rounded) inputs;
    db stays a plain sum."""
    x, w, b, kw, rng = case
    if dtype == np.float16:  # within float16's range, gradients included
        x = x / max(1.0, np.abs(x).max() / 8)
    x, w, b = (a.astype(dtype) for a in (x, w, b))
    with (
        _small_tasks(threads, task_bytes),
        _spy(numpy_winograd, "correlate") as calls,
        _spy(numpy_winograd, "filter_grad") as grads,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setattr(numpy_direct, "applies_to_filter_grad", lambda *args: False)
        y = F.conv(x, w, b, **kw)
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx, dw, db = F.conv_backward(dy, x, w, has_bias=True, **kw)
    assert calls and len(grads) == 1  # the forward (and dx's phases, unless col2im is cheaper)
    assert y.dtype == dtype and dx.dtype == dtype
    wide = [a.astype(np.float64) for a in (x, w, b, dy)]
    want = torch_conv(*wide, **kw)
    absolute = torch_conv(*(np.abs(a) for a in wide), **kw)
    _bounded(y, want[0], absolute[0], WINOGRAD_BOUND)
    _bounded(dx, want[1], absolute[1], WINOGRAD_BOUND)
    _bounded(dw, want[2], absolute[2], WINOGRAD_BOUND)
    _bounded(db, want[3], absolute[3], 1e-6)  # a plain float32 sum


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_exact_algorithm_and_float64_never_take_winograd(rng, dtype):
    x = rng.standard_normal((8, 16, 16, 16)).astype(dtype)  # 128 tiles: >= MIN_TILES
    w = rng.standard_normal((16, 16, 3, 3)).astype(dtype)
    before = mconv.get_algorithm()
    try:
        mconv.set_algorithm("exact")
        with _spy(numpy_winograd, "correlate") as calls:
            y = F.conv(x, w, padding=1)
            F.conv_backward(y, x, w, has_bias=False, padding=1)
        assert not calls
        mconv.set_algorithm("fast")
        with _spy(numpy_winograd, "correlate") as calls:
            F.conv(x, w, padding=1)
        assert bool(calls) == (dtype == np.float32)
    finally:
        mconv.set_algorithm(before)
    ref = torch_conv(x.astype(np.float64), w.astype(np.float64), None, None, stride=1,
                     padding=((1, 1), (1, 1)), dilation=1, groups=1)  # fmt: skip
    assert_close(y, ref, 1e-10 if dtype == np.float64 else 1e-6)


def test_winograd_handles_large_layers_within_its_bound(rng):
    """The real sizes (the benchmark's ResNet layer, 4 MiB tasks, two threads): 64 channels,
    56x56, 14 tiles a row."""
    x = rng.standard_normal((2, 64, 56, 56)).astype(np.float32)
    w = (rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32)
    with _spy(numpy_winograd, "correlate") as calls:
        y = F.conv(x, w, padding=1)
    assert calls
    kw = dict(stride=1, padding=((1, 1), (1, 1)), dilation=1, groups=1)
    want = torch_conv(x.astype(np.float64), w.astype(np.float64), None, None, **kw)
    absolute = torch_conv(
        np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), None, None, **kw
    )
    _bounded(y, want, absolute, WINOGRAD_BOUND)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # worker threads
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("where", ["x", "w"])
def test_non_finite_operands_take_the_plain_sum(rng, dtype, where):
    """A Winograd transform mixes a whole tile (an inf would make NaN of outputs that do not
    depend on it), so inf and NaN operands take the plain sum: inf and NaN land exactly where
    torch puts them, forward and gradients."""
    x = rng.standard_normal((8, 16, 16, 16)).astype(dtype)
    w = rng.standard_normal((16, 16, 3, 3)).astype(dtype)
    dy = rng.standard_normal((8, 16, 16, 16)).astype(dtype)
    if where == "x":
        x[0, 0, 5, 5], x[1, 3, 0, 0] = np.inf, np.nan
    else:
        w[2, 1, 0, 0] = -np.inf
    with (
        _spy(numpy_winograd, "correlate") as calls,
        _spy(numpy_winograd, "filter_grad") as grads,
        np.errstate(invalid="ignore"),  # inf * 0 in the plain sums, as in torch
    ):
        got = (F.conv(x, w, padding=1), *F.conv_backward(dy, x, w, has_bias=False, padding=1)[:2])
    kw = dict(stride=1, padding=((1, 1), (1, 1)), dilation=1, groups=1)
    with np.errstate(invalid="ignore"):
        want = torch_conv(
            *(a.astype(np.float64) for a in (x, w)), None, dy.astype(np.float64), **kw
        )
    # an infinite weight: y only (mconv's backward_data multiplies it with the zero padding
    # of dy, NaN at the border where torch leaves the products out)
    for g, r in zip(got if where == "x" else got[:1], want):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(r))
        np.testing.assert_array_equal(np.isposinf(g), np.isposinf(r))
        np.testing.assert_array_equal(np.isneginf(g), np.isneginf(r))
    # calls whose operands are all finite still take it: dx's phase (dy, w) when x is the
    # infinite one (dW takes the direct kernel before Winograd's, whatever its operands)
    assert len(calls) == (where == "x") and not grads


def test_winograd_holds_no_whole_float32_copy(monkeypatch):
    """float16 in and out: rows are widened per task and each tile row rounded once into the
    result, so the peak is the float16 result, the transformed weight U (36/9 of the weight,
    in float32) and a few task buffers (V, M, Y, each about _TASK_BYTES)."""
    monkeypatch.setattr(numpy_winograd, "_TASK_BYTES", 256 << 10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64, 112, 112)).astype(np.float16)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float16)
    call = lambda: F.conv(x, w, padding=1)  # noqa: E731
    with _spy(numpy_winograd, "correlate") as calls:
        call()
    assert calls
    tracemalloc.start()
    try:
        call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    u_bytes = 36 * 64 * 64 * 4
    tasks = 4 * mconv.get_num_threads() * (256 << 10)
    assert peak <= x.nbytes + u_bytes + tasks < 2 * x.nbytes  # a float32 y alone: 2 * x.nbytes


@pytest.mark.parametrize("shape", [(8, 512, 7, 7), (8, 256, 14, 14), (1, 128, 28, 28)])
def test_winograd_leaves_layers_with_few_tiles_to_im2col(rng, shape):
    """32, 128 and 49 tiles: too few for U's size (streaming U costs more than it saves)."""
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((shape[1], shape[1], 3, 3)).astype(np.float32)
    with _spy(numpy_winograd, "correlate") as calls:
        F.conv(x, w, padding=1)
    assert not calls


def test_set_algorithm_checks_its_argument(monkeypatch):
    with pytest.raises(
        ValueError, match=r"algorithm must be 'fast' or 'exact', but got algorithm='winograd'"
    ):
        mconv.set_algorithm("winograd")
    with pytest.raises(TypeError, match=r"algorithm must be a str, but got algorithm=1"):
        mconv.set_algorithm(1)
    from mconv import precision

    monkeypatch.setitem(precision._algorithm, "name", None)
    monkeypatch.setenv("MCONV_ALGORITHM", "fastest")
    with pytest.raises(
        ValueError, match=r"MCONV_ALGORITHM must be 'fast' or 'exact', but got 'fastest'"
    ):
        mconv.get_algorithm()
    monkeypatch.setenv("MCONV_ALGORITHM", "exact")
    assert mconv.get_algorithm() == "exact"


@pytest.mark.parametrize(
    "shape,kernel,stride,dilation,pairs",
    [
        ((3, 5, 17), (4,), (1,), (2,), ((3, 1),)),
        ((2, 7, 9, 11), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
        ((2, 4, 8, 6), (2, 3), (1, 1), (2, 1), ((0, 2), (2, 0))),
        ((2, 3, 5, 6, 7), (3, 2, 3), (1, 1, 1), (1, 2, 1), ((1, 1), (0, 1), (2, 2))),
        ((3, 5, 23), (5,), (3,), (1,), ((2, 1),)),
        ((2, 6, 12, 11), (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1))),  # MobileNet's downsampling
        ((2, 4, 9, 10), (3, 2), (2, 3), (2, 1), ((0, 2), (1, 0))),
        ((2, 3, 7, 8, 9), (3, 3, 2), (2, 1, 3), (1, 2, 1), ((1, 1), (0, 2), (2, 1))),
    ],
    ids=["1d", "2d", "2d-dilated", "3d", "1d-s3", "2d-s2", "2d-s23-dilated", "3d-strided"],
)
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("threads,task_bytes", [(1, 4 << 20), (2, 600)])
def test_direct_depthwise_matches_torch(
    rng, shape, kernel, stride, dilation, pairs, dtype, threads, task_bytes
):
    """Depthwise convs (and their backward_data, depthwise convs too) run the JIT taps, a
    stride through phase planes; dW its dot products. Plain sums: float64 to 1e-10."""
    channels = shape[1]
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((channels, 1, *kernel)).astype(dtype)
    b = rng.standard_normal(channels).astype(dtype)
    kw = dict(stride=stride, padding=pairs, dilation=dilation, groups=channels)
    with (
        _small_tasks(threads, task_bytes),
        _spy(numpy_depthwise, "_taps_forward") as fwd,
        _spy(numpy_depthwise, "_taps_filter_grad") as grad,
        mock.patch.object(numpy_direct, "applies", lambda *args: False),  # numba's taps only
    ):
        y = F.conv(x, w, b, **kw)
        dy = rng.standard_normal(y.shape).astype(dtype)
        got = (y, *F.conv_backward(dy, x, w, has_bias=True, **kw))
    assert fwd and grad
    want = torch_conv(*(a.astype(np.float64) for a in (x, w, b, dy)), **kw)
    tol = {np.float64: 1e-10, np.float32: 1e-6, np.float16: 2e-3}[dtype]
    for g, r in zip(got, want):
        assert g.dtype == dtype
        assert_close(g, r, tol)


COMPILE_JOB = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from reference import loop_conv
from mconv import functional as F
from mconv.backends import numpy_jit
rng = np.random.default_rng(int(sys.argv[2]))
x, w = rng.standard_normal((2, 6, 9, 8)), rng.standard_normal((6, 1, 3, 2))
y = F.conv(x, w, padding=1, groups=6)
want = loop_conv(x, w, None, (1, 1), ((1, 1), (1, 1)), (1, 1), 6)
assert np.abs(y - want).max() <= 1e-10 * np.abs(want).max(), "wrong result"
assert "_taps_forward" in numpy_jit.compile_seconds()
"""


def test_processes_compiling_at_once_share_the_cache(tmp_path):
    """Three processes (as MPI ranks do) compile into one empty numba cache at the same time:
    compiles are serialised by a file lock, so each either writes the cache or loads it."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "cache"))
    tests = os.path.dirname(os.path.abspath(__file__))
    jobs = [
        subprocess.Popen(
            [sys.executable, "-c", COMPILE_JOB, tests, str(i)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(3)
    ]
    for job in jobs:
        _, err = job.communicate(timeout=300)
        assert job.returncode == 0, err
    assert any((tmp_path / "cache").rglob("*.nbi"))  # the index numba wrote


def test_jit_switch_and_compile_report(monkeypatch, rng):
    x = rng.standard_normal((1, 4, 9, 9))
    w = rng.standard_normal((4, 1, 3, 3))
    y = F.conv(x, w, padding=1, groups=4)
    assert numpy_jit.compile_seconds()["_taps_forward"] >= 0.0
    numpy_jit.set_enabled(False)
    try:
        assert not numpy_jit.enabled()
        with _spy(numpy_depthwise, "_taps_forward") as calls:
            assert_close(F.conv(x, w, padding=1, groups=4), y)
        assert not calls
    finally:
        numpy_jit.set_enabled(True)
    with pytest.raises(TypeError, match=r"on must be a bool, but got on=1"):
        numpy_jit.set_enabled(1)
    monkeypatch.setitem(numpy_jit._state, "enabled", None)
    monkeypatch.setenv("MCONV_JIT", "maybe")
    with pytest.raises(ValueError, match=r"MCONV_JIT must be 0 or 1, but got MCONV_JIT='maybe'"):
        numpy_jit.enabled()
    monkeypatch.setenv("MCONV_JIT", "0")
    assert not numpy_jit.enabled()
    monkeypatch.setitem(numpy_jit._state, "enabled", None)
    monkeypatch.setenv("MCONV_JIT", "1")
    monkeypatch.setitem(numpy_jit._state, "numba", False)  # as without numba installed
    assert not numpy_jit.enabled()
