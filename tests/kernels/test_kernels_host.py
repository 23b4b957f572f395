"""Every CUDA kernel, built for the host with g++, against NumPy references.

References: the column layout in column_reference.py, the NumPy backend's primitives, mconv.padding
(the NumPy pad and its adjoint), and float64 sums. Small grids make every
grid-stride loop wrap; reversed and reshaped grids must give identical bits.
"""

import math

import numpy as np
import pytest

from mconv.backends import numpy_backend
from mconv.geometry import conv_geometry
from mconv.kernels import CTYPES, host, plan
from mconv.kernels.ops import KernelBackend
from mconv.padding import pad_backward_unchecked, pad_unchecked

import column_reference

# rank -> (in_size, kernel, stride, dilation, (before, after) pairs)
GEOMETRIES = {
    1: ((9,), (3,), (2,), (1,), ((1, 2),)),
    2: ((7, 6), (3, 2), (1, 2), (2, 1), ((2, 0), (1, 1))),
    3: ((5, 4, 5), (2, 3, 2), (2, 1, 2), (1, 2, 1), ((1, 1), (0, 2), (1, 0))),
    4: ((4, 5, 4, 3), (2, 2, 3, 2), (2, 1, 1, 2), (1, 2, 1, 1), ((1, 0), (0, 2), (1, 1), (0, 0))),
}
DTYPES = [np.float16, np.float32, np.float64]
# (T, Acc, Out) as numpy dtypes: fp16 in both compute modes
ACCUMULATE = [
    (np.float16, np.float32, np.float16),
    (np.float16, np.float32, np.float32),
    (np.float32, np.float32, np.float32),
    (np.float64, np.float64, np.float64),
]


def _geom(rank, batch=2, channels=4, groups=2, out_channels=6):
    size, kernel, stride, dilation, pairs = GEOMETRIES[rank]
    geom, _ = conv_geometry(
        (batch, channels, *size),
        (out_channels, channels // groups, *kernel),
        stride=stride,
        padding=pairs,
        dilation=dilation,
        groups=groups,
    )
    return geom


def _types(*dtypes):
    return tuple(CTYPES[np.dtype(d).name] for d in dtypes)


def _assert_rounded_once(got, exact, out_dtype, terms):
    """fp64/fp32 results within accumulation error; an fp16 result within half an fp16
    spacing of the exact value (+ fp32 accumulation slack)."""
    assert got.dtype == out_dtype
    exact = np.asarray(exact, dtype=np.float64)
    err = np.abs(got.astype(np.float64) - exact)
    scale = np.abs(exact).max(initial=1.0)
    if out_dtype == np.float64:
        assert err.max(initial=0) <= 1e-12 * scale
    elif out_dtype == np.float32:
        assert err.max(initial=0) <= terms * 2.0**-23 * scale
    else:
        spacing = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
        assert np.all(err <= 0.5 * spacing + terms * 2.0**-23 * scale)


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_group", [False, True])
def test_im2col_matches_numpy(executor, rank, dtype, per_group):
    geom = _geom(rank)
    x = np.random.default_rng(rank).standard_normal(geom.input_shape(2)).astype(dtype)
    ref = column_reference.im2col(x, geom)  # (G, Cg*K, B*P) = (C*K, B, P)
    ck, p = ref.shape[0] * ref.shape[1], math.prod(geom.out_size)
    cols = np.full(ref.size, np.nan, dtype=dtype)
    strides = (p, 2 * p) if per_group else (ck * p, p)
    executor.launch("im2col", _types(dtype), cols.size, x, cols,
                    executor.params(plan.conv_params(geom, 2)), *strides)  # fmt: skip
    ref = ref.reshape(ck, 2, p)  # (G, Cg*K, B*P) -> (C*K, B, P)
    want = ref if per_group else ref.transpose(1, 0, 2)  # per image: (B, C*K, P)
    np.testing.assert_array_equal(cols.reshape(want.shape), want)  # flat -> its layout


@pytest.mark.parametrize("rank", [1, 2, 3, 4])
@pytest.mark.parametrize("types", ACCUMULATE, ids=lambda t: "-".join(np.dtype(d).name for d in t))
@pytest.mark.parametrize("per_group", [False, True])
def test_col2im_is_the_numpy_adjoint(executor, rank, types, per_group):
    t, _, out = types
    geom = _geom(rank)
    k, p = math.prod(geom.kernel_size), math.prod(geom.out_size)
    ck = geom.in_channels * k
    cols = np.random.default_rng(rank).standard_normal((ck, 2, p)).astype(t)  # (C*K, B, P)
    g = geom.groups
    # (C*K, B, P) -> (G, Cg*K, B*P): the NumPy backend's column layout
    exact = column_reference.col2im(cols.astype(np.float64).reshape(g, ck // g, 2 * p), geom, 2)
    layout = cols if per_group else np.ascontiguousarray(cols.transpose(1, 0, 2))
    strides = (p, 2 * p) if per_group else (ck * p, p)
    dx = np.empty(geom.input_shape(2), dtype=out)
    executor.launch("col2im", _types(*types), dx.size, layout, dx,
                    executor.params(plan.conv_params(geom, 2)), *strides)  # fmt: skip
    _assert_rounded_once(dx, exact, out, k)


PAD_CASES = [
    ((5,), ((2, 3),)),
    ((4, 5), ((3, 1), (0, 4))),
    ((3, 4, 5), ((2, 2), (1, 3), (4, 0))),
]


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("sizes,pairs", PAD_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pad_matches_numpy(kernel_backend, mode, sizes, pairs, dtype):
    if mode == "reflect":  # needs pad < size
        pairs = tuple((min(lo, s - 1), min(hi, s - 1)) for (lo, hi), s in zip(pairs, sizes))
    x = np.random.default_rng(0).standard_normal((2, 3, *sizes)).astype(dtype)
    np.testing.assert_array_equal(kernel_backend.pad(x, pairs, mode), pad_unchecked(x, pairs, mode))


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("sizes,pairs", PAD_CASES + [((1, 3), ((4, 2), (3, 3)))])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pad_backward_matches_numpy(kernel_backend, mode, sizes, pairs, dtype):
    if mode == "reflect":
        pairs = tuple((min(lo, s - 1), min(hi, s - 1)) for (lo, hi), s in zip(pairs, sizes))
    if mode == "circular":
        pairs = tuple((min(lo, s), min(hi, s)) for (lo, hi), s in zip(pairs, sizes))
    padded = tuple(s + lo + hi for s, (lo, hi) in zip(sizes, pairs))
    dy = np.random.default_rng(1).standard_normal((2, 3, *padded)).astype(dtype)
    got = kernel_backend.pad_backward(dy, pairs, mode)
    exact = pad_backward_unchecked(dy.astype(np.float64), pairs, mode)
    terms = math.prod(max(lo, hi) + 1 for lo, hi in pairs)
    tol = {np.float16: 2e-3 * len(pairs), np.float32: 1e-6, np.float64: 1e-14}[dtype]
    assert got.dtype == dtype
    np.testing.assert_allclose(got, exact, rtol=0, atol=tol * terms * np.abs(exact).max())


@pytest.mark.parametrize("types", ACCUMULATE, ids=lambda t: "-".join(np.dtype(d).name for d in t))
def test_pad_backward_axis_accumulates_in_acc(executor, types):
    """A replicate border of 3000 rows lands on one element: fp16 accumulation would stall."""
    t, _, out = types
    n, before, after = 4, 3000, 2
    dy = np.random.default_rng(2).uniform(0, 1, (3, before + n + after, 2)).astype(t)
    dx = np.empty((3, n, 2), dtype=out)
    executor.launch("pad_backward_axis", _types(*types), dx.size, dy, dx, 3, n, 2, before, after,
                    plan.PAD_MODES["replicate"])  # fmt: skip
    exact = pad_backward_unchecked(dy.astype(np.float64), [(before, after), (0, 0)], "replicate")
    _assert_rounded_once(dx, exact, out, before + 1)


# (rank, channels, multiplier): depthwise with and without a channel multiplier
DEPTHWISE = [(1, 3, 1), (2, 3, 2), (3, 2, 1), (2, 4, 3)]


@pytest.mark.parametrize("rank,channels,multiplier", DEPTHWISE)
@pytest.mark.parametrize("types", ACCUMULATE, ids=lambda t: "-".join(np.dtype(d).name for d in t))
def test_depthwise_kernels_match_numpy(host_lib, rank, channels, multiplier, types):
    t, _, out = types
    geom = _geom(rank, channels=channels, groups=channels, out_channels=channels * multiplier)
    mode = "float32" if out == np.float32 and t == np.float16 else "default"
    geom = geom.__class__(**{**geom.__dict__, "compute_mode": mode})
    rng = np.random.default_rng(rank)
    x = rng.standard_normal(geom.input_shape(2)).astype(t)
    w = rng.standard_normal((geom.out_channels, 1, *geom.kernel_size)).astype(t)
    dy = rng.standard_normal(geom.output_shape(2)).astype(t)
    executor = host.HostExecutor(host_lib)
    kb = KernelBackend(executor)
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    k, p = math.prod(geom.kernel_size), math.prod(geom.out_size)
    _assert_rounded_once(kb.forward(x, w, geom), numpy_backend.forward(x64, w64, geom), out, k)
    _assert_rounded_once(
        kb.backward_data(dy, w, geom),
        numpy_backend.backward_data(dy64, w64, geom),
        out,
        k * multiplier,
    )
    _assert_rounded_once(
        kb.backward_filter(dy, x, geom), numpy_backend.backward_filter(dy64, x64, geom), out, 2 * p
    )
    names = [name for name, _ in executor.launches]
    assert names == ["depthwise_forward", "depthwise_backward_data",
                     "depthwise_backward_filter", "reduce_rows"]  # fmt: skip
    assert not executor.gemms


@pytest.mark.parametrize("compute_mode", ["default", "float32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_grad_reduces_in_acc(kernel_backend, compute_mode, dtype):
    """~10000 positive terms per channel: sums past 2048, where fp16's spacing is 2."""
    dy = np.random.default_rng(3).uniform(0, 1, (4, 3, 50, 50)).astype(dtype)
    geom = _geom(2)
    geom = geom.__class__(**{**geom.__dict__, "compute_mode": compute_mode})
    db = kernel_backend.bias_grad(dy, geom)
    exact = dy.astype(np.float64).sum(axis=(0, 2, 3))
    assert exact.min() > 2048
    want = np.float32 if (dtype == np.float16 and compute_mode == "float32") else dtype
    _assert_rounded_once(db, exact, want, 10000)


def _run_all_kernels(executor):
    """Outputs of a forward/backward on the GEMM and the depthwise paths, plus pads."""
    kb, rng, results = KernelBackend(executor), np.random.default_rng(4), []
    for groups, cout in ((2, 6), (4, 8)):
        geom = _geom(2, groups=groups, out_channels=cout)
        x = rng.standard_normal(geom.input_shape(2)).astype(np.float32)
        w = rng.standard_normal((cout, 4 // groups, *geom.kernel_size)).astype(np.float32)
        dy = rng.standard_normal(geom.output_shape(2)).astype(np.float32)
        results += [kb.forward(x, w, geom), kb.backward_data(dy, w, geom),
                    kb.backward_filter(dy, x, geom), kb.bias_grad(dy, geom)]  # fmt: skip
        padded = kb.pad(x, ((2, 1), (1, 2)), "reflect")
        results += [padded, kb.pad_backward(padded, ((2, 1), (1, 2)), "reflect")]
    return results


@pytest.mark.parametrize("block,max_blocks,reverse", [(1, 1, False), (7, 3, True), (64, 2, True)])
def test_every_schedule_gives_the_same_bits(host_lib, block, max_blocks, reverse):
    """No thread reads another's output and each sums in a fixed order: any grid shape
    and any order of threads give bitwise identical results (deterministic, race-free)."""
    base = _run_all_kernels(host.HostExecutor(host_lib))
    other = _run_all_kernels(host.HostExecutor(host_lib, block, max_blocks, reverse))
    for a, b in zip(base, other):
        np.testing.assert_array_equal(a, b)


def test_indices_past_2_to_the_31(host_lib):
    """bias_grad over 2^31 + 2^16 elements (zero pages, never written but for three):
    32-bit indexing would wrap and miss the values stored past 2^31."""
    p = 2**30 + 2**15
    dy = np.zeros((2, 1, p), dtype=np.float32)  # 8 GiB of untouched (shared zero) pages
    dy[1, 0, p - 1], dy[1, 0, 2**30], dy[0, 0, 5] = 3.0, 2.0, 1.0  # flat 2^31+2^16-1, 2^31+2^15
    executor = host.HostExecutor(host_lib, block=256, max_blocks=64)
    partial = np.empty(1024, dtype=np.float32)
    executor.launch("bias_grad", ("float", "float"), 1024, dy, partial, 2, 1, p, 1024)
    db = np.empty(1, dtype=np.float32)
    executor.launch("reduce_rows", ("float", "float"), 1, partial, db, 1, 1024)
    assert db[0] == 6.0
