"""The NumPy backend's own machinery: tiles, threads, stride phases, col2im, wide, depthwise, 1x1.

The parity grids elsewhere run small shapes that fit in one tile on one
thread. Here the tile sizes are shrunk so that every call is cut into row
blocks and image chunks, worker threads are forced on, and strides leave
residue classes no tap reaches; results still match PyTorch float64.
Memory is checked with tracemalloc (NumPy reports its buffers to it):
no call may hold the whole im2col matrix.
"""

import contextlib
import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, strategies as st
from reference import assert_close, torch_conv, torch_conv_transpose
from strategies import conv_cases

import mconv
from mconv import functional as F
from mconv import precision
from mconv.geometry import conv_geometry
from mconv.backends import (
    numpy_backend,
    numpy_depthwise,
    numpy_direct_plan,
    numpy_im2col,
    numpy_jit,
    numpy_threads,
    numpy_wide,
)


@pytest.fixture(params=["one-thread", "threads", "col2im", "wide", "no-jit"])
def tiny_tiles(request, monkeypatch):
    """Tiles of a few hundred bytes; two forced worker threads; backward_data through col2im
    instead of the stride phases wherever it applies; every stride-1 call (the phases of
    backward_data included) through the wide path, however many columns it wastes; the
    NumPy-only paths that run without numba."""
    monkeypatch.setattr(numpy_im2col, "COLUMN_BYTES", 600)
    monkeypatch.setattr(numpy_depthwise, "_TASK_BYTES", 600)
    if request.param == "col2im":
        monkeypatch.setattr(numpy_backend, "SCATTER_RATIO", 0)
    if request.param == "wide":
        monkeypatch.setattr(numpy_wide, "WASTE_LIMIT", math.inf)
        monkeypatch.setattr(numpy_wide, "NARROW_GROUP", math.inf)
    if request.param == "no-jit":
        monkeypatch.setitem(numpy_jit._state, "enabled", False)
    threads = 1 if request.param == "one-thread" else 2
    before = mconv.get_num_threads()
    mconv.set_num_threads(threads)
    monkeypatch.setattr(numpy_threads, "MIN_PARALLEL_WORK", 0)
    yield threads
    mconv.set_num_threads(before)


# (x shape, w shape, stride, dilation, padding pairs, groups)
CASES = [
    ((3, 4, 23), (6, 2, 3), (2,), (1,), ((2, 1),), 2),
    ((2, 3, 9, 11), (5, 3, 3, 2), (1, 2), (2, 1), ((1, 2), (0, 1)), 1),
    ((2, 6, 8, 7), (6, 1, 3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), 6),  # depthwise, wide rows
    ((2, 6, 9, 8), (6, 1, 3, 2), (2, 3), (1, 2), ((2, 0), (1, 1)), 6),  # depthwise, strided
    ((2, 4, 5, 6, 7), (4, 2, 2, 3, 2), (2, 1, 2), (1, 2, 1), ((1, 0), (2, 1), (0, 1)), 2),
    ((2, 6, 7, 8), (4, 3, 3, 2), (1, 1), (2, 1), ((1, 2), (0, 1)), 2),  # stride 1: wide
    ((2, 4, 4, 5, 6), (4, 2, 2, 3, 2), (1, 1, 1), (1, 2, 1), ((1, 0), (2, 1), (0, 1)), 2),
    ((3, 4, 30), (6, 2, 4), (1,), (3,), ((4, 2),), 2),  # 1-d stride 1: wide, dW too
    ((5, 8, 6, 6), (4, 8, 1, 1), (1, 1), (1, 1), ((0, 0), (0, 0)), 1),  # pointwise
    ((2, 8, 7, 9), (8, 2, 1, 1), (2, 2), (1, 1), ((0, 0), (0, 0)), 4),  # strided 1x1
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[0]) - 2}d-g{c[5]}-s{c[2]}")
def test_tiled_and_threaded_conv_matches_torch(tiny_tiles, case):
    shape, wshape, stride, dilation, pairs, groups = case
    rng = np.random.default_rng(len(shape))
    x, w = rng.standard_normal(shape), rng.standard_normal(wshape)
    b = rng.standard_normal(wshape[0])
    kw = dict(stride=stride, padding=pairs, dilation=dilation, groups=groups)
    y = F.conv(x, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    ref = torch_conv(x, w, b, dy, **kw)
    assert_close(y, ref[0])
    for got, want in zip(F.conv_backward(dy, x, w, has_bias=True, **kw), ref[1:]):
        assert_close(got, want)


@pytest.mark.parametrize("case", [CASES[i] for i in (1, 2, 5, 7, 8)], ids=lambda c: str(c[1]))
def test_fp16_is_widened_piecewise_and_matches_torch(tiny_tiles, case):
    """fp16 inputs widened tile by tile (and 1x1 column block by block) on every path."""
    shape, wshape, stride, dilation, pairs, groups = case
    rng = np.random.default_rng(1)
    x, w = (rng.standard_normal(s).astype(np.float16) for s in (shape, wshape))
    kw = dict(stride=stride, padding=pairs, dilation=dilation, groups=groups)
    y = F.conv(x, w, **kw)
    dy = rng.standard_normal(y.shape).astype(np.float16)
    ref = torch_conv(*(a.astype(np.float64) for a in (x, w)), None, dy.astype(np.float64), **kw)
    got = (y, *F.conv_backward(dy, x, w, has_bias=False, **kw)[:2])
    for g, want in zip(got, ref):
        assert g.dtype == np.float16
        assert_close(g, want, 1e-3)


# (x shape, w shape, stride, dilation, padding, output_padding, groups): strides beyond the
# kernel leave residues of the output no tap reaches; gcd(stride, dilation) > 1 too.
TRANSPOSED = [
    ((2, 4, 5), (4, 3, 2), (3,), (1,), 0, 2, 1),
    ((2, 4, 5, 4), (4, 2, 3, 3), (2, 2), (2, 2), 1, 1, 2),
    ((1, 3, 3, 4, 3), (3, 2, 2, 1, 2), (3, 2, 2), (1, 1, 3), 0, (1, 1, 2), 1),
    ((2, 6, 6, 5), (6, 1, 4, 4), (2, 2), (1, 1), 1, 0, 6),  # depthwise upsampler
]


@pytest.mark.parametrize("case", TRANSPOSED, ids=lambda c: f"{len(c[0]) - 2}d-s{c[2]}-d{c[3]}")
def test_stride_phases_of_transposed_conv_match_torch(tiny_tiles, case):
    shape, wshape, stride, dilation, padding, output_padding, groups = case
    rng = np.random.default_rng(len(shape))
    x, w = rng.standard_normal(shape), rng.standard_normal(wshape)
    b = rng.standard_normal(wshape[1] * groups)
    kw = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = F.conv_transpose(x, w, b, output_padding=output_padding, **kw)
    dy = rng.standard_normal(y.shape)
    ref = torch_conv_transpose(x, w, b, dy, output_padding=output_padding, **kw)
    assert_close(y, ref[0])
    got = F.conv_transpose_backward(dy, x, w, has_bias=True, output_padding=output_padding, **kw)
    for g, want in zip(got, ref[1:]):
        assert_close(g, want)


def test_threads_do_not_change_the_forward_bits(monkeypatch):
    """Each output tile is one GEMM whatever the thread count; dW sums per worker, in a fixed
    order, so it repeats bit for bit for a given count."""
    monkeypatch.setattr(numpy_im2col, "COLUMN_BYTES", 4096)
    monkeypatch.setattr(numpy_threads, "MIN_PARALLEL_WORK", 0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8, 12, 12)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3)).astype(np.float32)
    dy = rng.standard_normal((4, 8, 12, 12)).astype(np.float32)
    before = mconv.get_num_threads()
    try:
        results = {}
        for threads in (1, 3):
            mconv.set_num_threads(threads)
            runs = [
                (F.conv(x, w, padding=1), *F.conv_backward(dy, x, w, has_bias=False, padding=1)[:2])
                for _ in range(2)
            ]
            for a, b in zip(*runs):
                np.testing.assert_array_equal(a, b)
            results[threads] = runs[0]
    finally:
        mconv.set_num_threads(before)
    np.testing.assert_array_equal(results[1][0], results[3][0])  # forward
    np.testing.assert_array_equal(results[1][1], results[3][1])  # dx: also a tiled forward
    np.testing.assert_allclose(results[1][2], results[3][2], rtol=1e-5, atol=1e-4)


def _peak_bytes(fn) -> int:
    fn()  # JIT kernels compile (or load from numba's cache) on first use: not the call's memory
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "shape,wshape,groups",
    [((8, 64, 56, 56), (64, 64, 3, 3), 1), ((8, 64, 56, 56), (64, 1, 3, 3), 64)],
    ids=["dense", "depthwise"],
)
def test_no_call_holds_the_whole_column_matrix(shape, wshape, groups):
    """Peak allocation of forward, backward_data and backward_filter: at most the result plus a
    few tiles; the full im2col matrix would be K = 9 times the input."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(wshape).astype(np.float32)
    dy = rng.standard_normal(shape[:1] + wshape[:1] + shape[2:]).astype(np.float32)
    kw = dict(padding=1, groups=groups)
    columns = math.prod(wshape[2:]) * x.nbytes
    threads = mconv.get_num_threads()
    budget = numpy_im2col.COLUMN_BYTES if groups == 1 else numpy_depthwise._TASK_BYTES
    scratch = 2 * threads * budget
    assert _peak_bytes(lambda: F.conv(x, w, **kw)) <= x.nbytes + scratch < columns / 2
    assert _peak_bytes(lambda: F.conv_backward(dy, x, w, has_bias=False, **kw)) <= (
        x.nbytes + w.nbytes + scratch
    )


def test_fp16_is_widened_per_tile_not_per_array():
    """fp16 inputs are not copied to fp32 as a whole: the peak is the fp32 result plus tiles."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 64, 56, 56)).astype(np.float16)
    w = rng.standard_normal((64, 64, 3, 3)).astype(np.float16)
    scratch = 4 * mconv.get_num_threads() * numpy_im2col.COLUMN_BYTES
    # fp32 result (2 * x.nbytes) and its fp16 copy (x.nbytes) are the output; no fp32 input
    assert _peak_bytes(lambda: F.conv(x, w, padding=1, compute_mode="float32")) <= (
        3 * x.nbytes + scratch
    )


@pytest.mark.parametrize(
    "wshape,kw",
    [
        ((64, 256, 1, 1), {}),
        ((128, 128, 3, 3), dict(padding=1)),
        ((128, 128, 3, 3), dict(stride=2)),
    ],
    ids=["1x1", "3x3", "3x3-s2"],
)
def test_fp16_results_are_rounded_once_without_a_wide_copy(monkeypatch, wshape, kw):
    """fp16 results (the output with its bias, and dx) are rounded into fp16 tile by tile: the
    same bits as rounding the fp32 result once, and no fp32 copy of a whole result is held.
    (The exact algorithm: Winograd's own bound is in test_fast_algorithms.)"""
    monkeypatch.setattr(numpy_im2col, "COLUMN_BYTES", 128 << 10)
    monkeypatch.setitem(precision._algorithm, "name", "exact")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, wshape[1], 112, 112)).astype(np.float16)
    w = rng.standard_normal(wshape).astype(np.float16)
    b = rng.standard_normal(wshape[0]).astype(np.float16)
    dy = rng.standard_normal(F.conv(x, w, **kw).shape).astype(np.float16)
    wide = [a.astype(np.float32) for a in (dy, x, w, b)]
    for narrow, full in zip(
        (F.conv(x, w, b, **kw), F.conv_backward(dy, x, w, has_bias=False, **kw)[0]),
        (F.conv(*wide[1:], **kw), F.conv_backward(*wide[:3], has_bias=False, **kw)[0]),
    ):
        assert narrow.dtype == np.float16
        np.testing.assert_array_equal(narrow, full.astype(np.float16))
    geom, _ = conv_geometry(x.shape, w.shape, **kw)
    # tiles, the weight in a few layouts (transposed, its columns in fp32), and each worker's
    # slab of padded input (the direct kernels' planes, float32: an image's is over TASK_BYTES
    # here)
    per_worker = 4 * numpy_im2col.COLUMN_BYTES + numpy_direct_plan.SLAB_BYTES
    scratch = mconv.get_num_threads() * per_worker + 4 * w.nbytes
    y_bytes = math.prod(geom.output_shape(4)) * 2
    peak = _peak_bytes(lambda: F.conv(x, w, b, **kw))
    assert peak <= y_bytes + scratch and peak < 2 * y_bytes  # an fp32 y alone: 2 * y_bytes
    peak = _peak_bytes(lambda: numpy_backend.backward_data(dy, w, geom, out_dtype=np.float16))
    assert peak <= x.nbytes + scratch and peak < 2 * x.nbytes  # an fp32 dx alone: 2 * x.nbytes


def test_set_num_threads_checks_its_argument():
    with pytest.raises(ValueError, match=r"threads must be at least 1, but got threads=0"):
        mconv.set_num_threads(0)
    with pytest.raises(TypeError, match=r"threads must be an int, but got threads='2'"):
        mconv.set_num_threads("2")


def test_environment_variable_sets_the_default(monkeypatch):
    monkeypatch.setenv("MCONV_NUM_THREADS", "3")
    assert numpy_threads._default_threads() == 3
    monkeypatch.setenv("MCONV_NUM_THREADS", "many")
    with pytest.raises(
        ValueError, match=r"MCONV_NUM_THREADS must be a positive integer, but got 'many'"
    ):
        numpy_threads._default_threads()


def test_blas_thread_count_is_restored_after_pooled_calls(monkeypatch):
    """The phases of a strided backward_data share one BLAS pin; the count comes back after."""
    if numpy_threads._blas_setter() is None:
        pytest.skip("no OpenBLAS with a thread setter is loaded")
    get, _ = numpy_threads._blas_setter()
    monkeypatch.setattr(numpy_threads, "MIN_PARALLEL_WORK", 0)
    before_threads = mconv.get_num_threads()
    mconv.set_num_threads(2)
    try:
        before = get()
        rng = np.random.default_rng(0)
        x, w = rng.standard_normal((2, 4, 9, 9)), rng.standard_normal((4, 4, 3, 3))
        dy = rng.standard_normal((2, 4, 5, 5))
        dx = F.conv_backward(dy, x, w, has_bias=False, stride=2, padding=1)[0]
        assert get() == before
    finally:
        mconv.set_num_threads(before_threads)
    assert_close(
        dx,
        torch_conv(
            x, w, None, dy, stride=(2, 2), padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1
        )[1],
    )


@pytest.mark.parametrize("sums", [False, True], ids=["shared-queue", "dealt"])
def test_pool_runs_every_task_once(monkeypatch, sums):
    """Disjoint tasks are taken from a shared queue; summing tasks are dealt w, w + n, ..."""
    if numpy_threads._blas_setter() is None:
        pytest.skip("no OpenBLAS with a thread setter: calls run on one thread")
    monkeypatch.setattr(numpy_threads, "MIN_PARALLEL_WORK", 0)
    before = mconv.get_num_threads()
    mconv.set_num_threads(3)
    try:
        done = numpy_threads.run(range(50), lambda t, seen: seen.append(t), list, 1, sums=sums)
    finally:
        mconv.set_num_threads(before)
    assert sorted(t for seen in done for t in seen) == list(range(50))
    if sums:
        assert done == [list(range(w, 50, 3)) for w in range(3)]


@contextlib.contextmanager
def _forced(path: str):
    """Every call through one NumPy path, with tiny tiles on two forced threads."""
    settings = {
        (numpy_im2col, "COLUMN_BYTES"): 600,
        (numpy_depthwise, "_TASK_BYTES"): 600,
        (numpy_threads, "MIN_PARALLEL_WORK"): 0,
    }
    if path == "wide":
        settings[numpy_wide, "WASTE_LIMIT"] = math.inf
        settings[numpy_wide, "NARROW_GROUP"] = math.inf
    if path == "im2col":
        settings[numpy_wide, "WASTE_LIMIT"] = 0.0
    if path == "col2im":
        settings[numpy_backend, "SCATTER_RATIO"] = 0
    saved = {key: getattr(*key) for key in settings}
    threads, jit = mconv.get_num_threads(), numpy_jit._state["enabled"]
    try:
        for (module, name), value in settings.items():
            setattr(module, name, value)
        mconv.set_num_threads(2)
        if path == "no-jit":
            numpy_jit.set_enabled(False)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)
        mconv.set_num_threads(threads)
        numpy_jit._state["enabled"] = jit


@given(conv_cases(max_rank=3), st.sampled_from(["wide", "im2col", "col2im", "no-jit"]))
def test_every_path_matches_torch_on_random_geometries(case, path):
    """y, dx and dW through each path, on random geometries and padding modes, against torch
    float64; and <conv(x, w), dy> == <x, dx(dy)> == <w, dw(dy)>."""
    x, w, _, kw, rng = case
    with _forced(path):
        y = F.conv(x, w, **kw)
        dy = rng.standard_normal(y.shape)
        dx, dw, _ = F.conv_backward(dy, x, w, has_bias=False, **kw)
    for got, want in zip((y, dx, dw), torch_conv(x, w, None, dy, **kw)):
        assert_close(got, want)
    for other in (np.vdot(x, dx), np.vdot(w, dw)):
        assert abs(np.vdot(y, dy) - other) <= 1e-10 * max(1.0, abs(other))
