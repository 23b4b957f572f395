"""The direct conv kernels in LLVM IR (numpy_direct, compiled by numpy_llvm).

Checked against torch float64 on drawn geometries: ranks 1-3, groups (1: dense), channels
per group (1 = a depthwise conv with a channel multiplier), strides, dilations, padding pairs and
modes, both conv modes, float32 and float16, bias, one and two threads, tasks of one group;
with a spy proving the kernel ran. backward_data's stride phases and grouped transposed
convs are grouped convs too, so they run it as well. Plain float32 sums: within 2e-6 of the
largest sum of absolute products (the drawn tests) or of the result's scale.
"""

import ctypes
import gc
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from reference import assert_close, torch_conv, torch_conv_transpose
from test_fast_algorithms import _bounded, _small_tasks, _spy

from mconv import functional as F, precision
from mconv.backends import (numpy_channels, numpy_direct, numpy_direct_plan, numpy_jit, numpy_llvm,
                            numpy_planes)  # fmt: skip

pytestmark = pytest.mark.skipif(not numpy_llvm.available(), reason="llvmlite is not installed")
TOL = {np.float32: 2e-6, np.float16: 2e-3}
DEFAULT_MIN_WIDTH = numpy_direct.MIN_WIDTH


@pytest.fixture(autouse=True)
def _any_width(monkeypatch):
    """The kernel for rows of any width: the tests' sizes are small."""
    monkeypatch.setattr(numpy_direct, "MIN_WIDTH", 1)


@st.composite
def grouped_cases(draw):
    rank = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.integers(1, 4))  # 1: a dense conv
    # cg = og = 1: depthwise; og >= 16: vectors along the output channels (padded past 16, 32;
    # cg >= 16: dx's stride phases run them too, written into every s-th element of dx)
    cg = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 20]))
    og = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 9, 16, 17, 24, 40]))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(rank))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    most = 3 if mode == "zeros" else 1
    pairs = tuple((draw(st.integers(0, most)), draw(st.integers(0, most))) for _ in range(rank))
    # every axis at least as long as its dilated kernel, and the padding it reflects
    size = tuple(
        draw(st.integers(max(d * (k - 1) + 1, 2), {1: 40, 2: 12, 3: 6}[rank]))
        for k, d in zip(kernel, dilation)
    )
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((draw(st.integers(1, 3)), groups * cg, *size))
    w = rng.standard_normal((groups * og, cg, *kernel))
    b = rng.standard_normal(groups * og)
    conv_mode = draw(st.sampled_from(["cross_correlation", "convolution"]))
    kw = dict(stride=stride, padding=pairs, dilation=dilation, groups=groups,
              padding_mode=mode, conv_mode=conv_mode)  # fmt: skip
    return x, w, b, kw, rng


@settings(max_examples=150, deadline=None)
@given(grouped_cases(), st.sampled_from([np.float32, np.float16]), st.sampled_from([1, 2]),
       st.sampled_from([300, 4 << 20]), st.sampled_from([32, 16]))  # fmt: skip
def test_grouped_kernel_matches_torch(case, dtype, threads, task_bytes, registers):
    """y, dx (its stride phases are convs of the same groups) and dW against torch float64,
    under set_algorithm('exact'): the kernel's sums are plain sums. Both register files'
    blockings (16: AVX2's, 8 lanes a channel vector; LLVM splits wider vectors where the
    host has none); tasks of a slab per output row (task_bytes 300: see _small_tasks), and
    float16 results in pieces."""
    x, w, b, kw, rng = case
    x, w, b = (a.astype(dtype) for a in (x, w, b))
    with (
        _small_tasks(threads, task_bytes),
        _spy(numpy_direct, "forward") as calls,
        _spy(numpy_direct, "filter_grad") as grads,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setattr(numpy_direct, "MIN_WIDTH", 1)  # hypothesis runs no fixture per example
        patch.setitem(precision._algorithm, "name", "exact")  # no Winograd: dense 3x3 too
        patch.setitem(numpy_llvm._state, "registers", registers)
        y = F.conv(x, w, b, **kw)
        dy = rng.standard_normal(y.shape).astype(dtype)
        got = (y, *F.conv_backward(dy, x, w, has_bias=True, **kw))
    # a 1x1 conv at stride 1 over its padded input is one GEMM per group (numpy_pointwise)
    padded = kw["padding_mode"] != "zeros" or not any(sum(kw["padding"], ()))
    pointwise = set(w.shape[2:]) == {1} and set(kw["stride"]) == {1} and padded
    # depthwise: the forward where written in place, never dW (numpy_depthwise's kernels)
    depthwise = w.shape[:2] == (x.shape[1], 1)
    assert pointwise or (calls if dtype == np.float32 or not depthwise else True)
    assert pointwise or (bool(grads) == (not depthwise))
    wide = [a.astype(np.float64) for a in (x, w, b, dy)]
    want = torch_conv(*wide, **kw)
    # a plain sum's error scales with the sum of the absolute products, not with the result
    absolute = torch_conv(*(np.abs(a) for a in wide), **kw)
    for g, r, a in zip(got, want, absolute):
        assert g.dtype == dtype
        _bounded(g, r, a, TOL[dtype])


@pytest.mark.parametrize("stride,padding,output_padding", [(2, 1, 1), (3, 0, 2), (1, 1, 0)])
def test_grouped_transposed_conv_runs_the_kernel(rng, stride, padding, output_padding):
    """A grouped ConvTranspose2d (a decoder's upsampling): its forward is backward_data."""
    x = rng.standard_normal((2, 8, 7, 6)).astype(np.float32)
    w = rng.standard_normal((8, 3, 4, 3)).astype(np.float32)  # (C, O/G, *k), G = 4
    b = rng.standard_normal(12).astype(np.float32)
    kw = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=1, groups=4)
    with _spy(numpy_direct, "forward") as calls:
        y = F.conv_transpose(x, w, b, **kw)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        got = (y, *F.conv_transpose_backward(dy, x, w, has_bias=True, **kw))
    assert calls
    want = torch_conv_transpose(*(a.astype(np.float64) for a in (x, w, b, dy)), **kw)
    for g, r in zip(got, want):
        assert_close(g, r, TOL[np.float32])


def test_resnext_layer_with_bias_writes_in_place(rng):
    """The benchmark's ResNeXt layer shape, batch 2: outputs straight into y, bias in the
    kernel (8 channels per group: two blocks of 4, 28 outputs a row: a partial block)."""
    x = rng.standard_normal((2, 256, 28, 28)).astype(np.float32)
    w = rng.standard_normal((256, 8, 3, 3)).astype(np.float32)
    b = rng.standard_normal(256).astype(np.float32)
    with _spy(numpy_direct, "forward") as calls:
        y = F.conv(x, w, b, padding=1, groups=32)
    assert calls
    want = torch_conv(*(a.astype(np.float64) for a in (x, w, b)), None, stride=1, padding=((1, 1),) * 2,
                      dilation=1, groups=32)  # fmt: skip
    assert_close(y, want, TOL[np.float32])


@pytest.mark.parametrize(
    "dtype,shape,weight,groups",
    [
        (np.float64, (1, 8, 9, 9), (8, 4, 3, 3), 2),  # float64: im2col (1e-10 parity)
        (np.float16, (1, 8, 9, 9), (8, 1, 3, 3), 8),  # depthwise through a buffer: numba's
        (np.float32, (2, 32, 7, 7), (32, 8, 3, 3), 4),  # 8 channels a group, 7 a row: im2col
    ],
)
def test_kernel_leaves_other_convs_alone(monkeypatch, rng, dtype, shape, weight, groups):
    monkeypatch.setattr(numpy_direct, "MIN_WIDTH", DEFAULT_MIN_WIDTH)
    x, w = rng.standard_normal(shape).astype(dtype), rng.standard_normal(weight).astype(dtype)
    with _spy(numpy_direct, "forward") as calls, _spy(numpy_direct, "filter_grad") as grads:
        y = F.conv(x, w, padding=1, groups=groups)
        F.conv_backward(np.ones_like(y), x, w, has_bias=False, padding=1, groups=groups)
    assert not calls and not grads
    want = torch_conv(x.astype(np.float64), w.astype(np.float64), None, None, stride=1,
                      padding=((1, 1),) * 2, dilation=1, groups=groups)  # fmt: skip
    assert_close(y, want, 1e-10 if dtype == np.float64 else TOL[dtype])


def test_without_llvmlite_or_with_the_jit_off_the_numpy_path_runs(monkeypatch, rng):
    x = rng.standard_normal((2, 8, 9, 9)).astype(np.float32)
    w = rng.standard_normal((8, 2, 3, 3)).astype(np.float32)
    want = torch_conv(x.astype(np.float64), w.astype(np.float64), None, None, stride=1,
                      padding=((1, 1),) * 2, dilation=1, groups=4)  # fmt: skip
    for patch in ((numpy_llvm._state, "llvm", False), (numpy_jit._state, "enabled", False)):
        with pytest.MonkeyPatch.context() as m, _spy(numpy_direct, "forward") as calls:
            m.setitem(*patch)
            assert not numpy_llvm.available()
            y = F.conv(x, w, padding=1, groups=4)
        assert not calls
        assert_close(y, want, TOL[np.float32])


def test_kernels_report_compile_time_and_bad_ir_compiles_to_none():
    x = np.ones((1, 8, 9, 9), np.float32)
    F.conv(x, np.ones((8, 2, 3, 3), np.float32), padding=1, groups=4)  # ob 2, pv 2
    assert numpy_jit.compile_seconds()["direct_forward_2x2"] >= 0.0
    broken = numpy_llvm.Kernel("broken", "define void @kernel() { oops }", [])
    assert broken.function() is None
    assert "broken" in numpy_jit.compile_seconds()
    for _ in range(3):  # each engine owns its machine: freeing one leaves the next intact
        fine = numpy_llvm.Kernel("two", "define void @kernel(ptr %p) {\n  store float 2.0, "
                                 "ptr %p\n  ret void\n}", [ctypes.c_void_p])  # fmt: skip
        value = np.zeros(1, np.float32)
        fine.function()(value.ctypes.data)
        assert value[0] == 2.0
        del fine
        gc.collect()


@pytest.mark.parametrize("og,width", [(8, 28), (6, 7), (5, 100), (1, 3), (16, 14), (32, 7)])
def test_blocking_fits_the_registers(og, width):
    from mconv.geometry import ConvGeometry

    g = ConvGeometry(2 * 3, 2 * og, 2, (5, width), (3, 3), (3, width - 2), (1, 1), (1, 1),
                     ((0, 0), (0, 0)))  # fmt: skip
    ob, pv = numpy_direct._blocking(g)
    assert og % ob == 0 and ob <= 16
    assert ob * pv <= (16 if numpy_llvm.vector_registers() >= 32 else 8)
    assert pv <= max(1, math.ceil((width - 2) / numpy_direct.VW))
    if numpy_llvm.vector_registers() >= 32:  # narrow rows: more channels per block
        want = {(8, 28): (4, 4), (16, 14): (8, 2), (32, 7): (16, 1)}
        assert (ob, pv) == want.get((og, width), (ob, pv))


@pytest.mark.parametrize(
    "shape,weight,groups,stride",
    [((2, 16, 9, 30), (16, 4, 3, 3), 4, 1), ((2, 8, 17, 20), (8, 1, 3, 3), 8, 2),
     ((1, 6, 33), (12, 3, 5), 2, 1), ((2, 3, 24, 24), (8, 3, 7, 7), 1, 2),
     ((2, 20, 9, 11), (24, 20, 3, 2), 1, 1), ((2, 20, 17, 13), (32, 20, 3, 3), 1, 2)],
    ids=["grouped", "depthwise-s2", "1d", "stem", "dense", "dense-s2"],
)  # fmt: skip
def test_float16_in_and_out_is_the_float32_sum_rounded_once(rng, shape, weight, groups, stride):
    """float16 operands are widened as the kernel loads them and the float32 sums (plus bias)
    rounded once as it stores them: bit for bit the float32 kernel's result, rounded; dW of
    float16 operands is the float32 kernel's dW bit for bit."""
    x, w = rng.standard_normal(shape).astype(np.float16), rng.standard_normal(weight)
    w, b = w.astype(np.float16), rng.standard_normal(weight[0]).astype(np.float16)
    kw = dict(stride=stride, padding=1, groups=groups)
    wide = [a.astype(np.float32) for a in (x, w, b)]
    with _spy(numpy_direct, "forward") as calls, _spy(numpy_direct, "filter_grad") as grads:
        y16 = F.conv(x, w, b, **kw)
        y32 = F.conv(*wide, **kw)
        dy = rng.standard_normal(y16.shape).astype(np.float16)
        dw16 = F.conv_backward(dy, x, w, has_bias=False, **kw)[1]
        dw32 = F.conv_backward(dy.astype(np.float32), *wide[:2], has_bias=False, **kw)[1]
    depthwise = groups == shape[1]  # dW: numpy_depthwise's
    assert len(calls) >= 2 and len(grads) == (0 if depthwise else 2)
    assert y16.dtype == dw16.dtype == np.float16
    np.testing.assert_array_equal(y16, y32.astype(np.float16))
    np.testing.assert_array_equal(dw16, dw32.astype(np.float16))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_weight_gradient_of_a_strided_dy_goes_through_buffers(monkeypatch, rng, dtype):
    """dy that is not C-ordered per image (a view) is copied into float32 buffers of at most
    CHUNK_BYTES, piece by piece along the first axis; dW is the same sum."""
    monkeypatch.setattr(numpy_direct_plan, "CHUNK_BYTES", 2000)
    x = rng.standard_normal((2, 8, 11, 17)).astype(dtype)
    w = rng.standard_normal((12, 4, 3, 3)).astype(dtype)
    y = F.conv(x, w, padding=1, groups=2)
    dy = rng.standard_normal((*y.shape[:-1], 2 * y.shape[-1])).astype(dtype)[..., ::2]
    with (
        _spy(numpy_direct, "filter_grad") as grads,
        _spy(numpy_direct_plan.Plan, "chunks") as parts,
    ):
        dw = F.conv_backward(dy, x, w, has_bias=False, padding=1, groups=2)[1]
    assert grads and parts  # the buffer path ran
    wide = [a.astype(np.float64) for a in (x, w)]
    want = torch_conv(*wide, None, dy.astype(np.float64), stride=(1, 1),
                      padding=((1, 1),) * 2, dilation=(1, 1), groups=2)[2]  # fmt: skip
    assert_close(dw, want, TOL[dtype])


@pytest.mark.parametrize("og", [16, 17, 24, 32, 40, 64, 96, 256])
@pytest.mark.parametrize("registers", [32, 16])
def test_channel_blocking_fits_the_registers(monkeypatch, og, registers):
    """nv vectors of lanes channels by pix positions: nv * pix accumulators within the
    register file (with the nv weight vectors and a broadcast), the fewest padded channels."""
    from mconv.geometry import ConvGeometry

    monkeypatch.setitem(numpy_llvm._state, "registers", registers)
    g = ConvGeometry(8, og, 1, (9, 9), (3, 3), (7, 7), (1, 1), (1, 1), ((0, 0), (0, 0)))
    nv, pix, lanes = numpy_channels.blocking(g)
    assert lanes == (16 if registers == 32 else 8)
    assert nv * pix + nv + 1 <= registers and nv <= (4 if registers == 32 else 2)
    padded = -(-og // (nv * lanes)) * nv * lanes
    assert padded == min(-(-og // (n * lanes)) * n * lanes for n in range(1, nv + 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("rows,og,ld", [(16, 16, 9), (24, 40, 23), (8, 3, 8), (32, 17, 50)])
def test_pack_kernel_transposes_in_blocks_of_channels(rng, dtype, rows, og, ld):
    """dst (G, nblk, j, ob) from src (G, og, j) with rows ld apart: zeros past og, float16
    widened exactly; the last j % 8 columns one value at a time."""
    groups, j, ob = 2, ld - 1 if ld > 8 else ld, rows
    nblk = -(-og // ob)
    src = rng.standard_normal((groups, og, ld)).astype(dtype)
    dst = np.full((groups, nblk, j, ob), np.nan, np.float32)
    numpy_direct_plan.kernel("pack", (), dtype)(
        src.ctypes.data, dst.ctypes.data, groups, og, nblk, ob, j, ld
    )
    want = np.zeros((groups, nblk * ob, j), np.float32)
    want[:, :og] = src[..., :j]
    want = want.reshape(groups, nblk, ob, j).transpose(0, 1, 3, 2)
    np.testing.assert_array_equal(dst, want)


@pytest.mark.parametrize(
    "shape,weight,kw",
    [((2, 32, 7, 7), (64, 32, 3, 3), dict(padding=((1, 1),) * 2)),  # 7 a row: blocks span rows
     ((2, 16, 15, 16), (48, 16, 3, 3), dict(stride=2, padding=((2, 0), (1, 1)), dilation=(2, 1))),
     ((1, 24, 6, 7, 8), (16, 24, 3, 2, 3), dict(padding=((1, 1),) * 3)),
     ((3, 40, 50), (33, 40, 5), dict(padding=((2, 3),)))],
    ids=["7x7", "strided", "3d", "1d"],
)  # fmt: skip
def test_channel_kernels_run_dense_layers_of_any_width(rng, shape, weight, kw):
    """Dense layers with 16 or more output channels: forward, dx (its phases written in
    place into every s-th element) and dW by the channel-vector kernels, against torch."""
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal(weight).astype(np.float32)
    b = rng.standard_normal(weight[0]).astype(np.float32)
    with (
        _spy(numpy_channels, "forward") as calls,
        _spy(numpy_channels, "filter_grad") as grads,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setitem(precision._algorithm, "name", "exact")
        y = F.conv(x, w, b, **kw)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        got = (y, *F.conv_backward(dy, x, w, has_bias=True, **kw))
    assert len(calls) >= 2 and len(grads) == 1  # forward, dx's phases (16+ channels), dW
    want = torch_conv(*(a.astype(np.float64) for a in (x, w, b, dy)), padding=kw["padding"],
                      stride=kw.get("stride", 1), dilation=kw.get("dilation", 1), groups=1)  # fmt: skip
    for g, r in zip(got, want):
        assert_close(g, r, TOL[np.float32])


def test_slabs_of_a_large_image_match_the_whole(monkeypatch, rng):
    """An image larger than TASK_BYTES is padded slab by slab (the rows its task's outputs
    read); slabs at the borders hold padding rows that a worker's slab before may have
    filled, so they are zeroed first. Two threads, a stride, a dilation and uneven padding."""
    monkeypatch.setitem(precision._algorithm, "name", "exact")
    x = rng.standard_normal((3, 16, 41, 23)).astype(np.float32)
    w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    kw = dict(stride=(2, 1), padding=((3, 1), (1, 2)), dilation=(2, 1))
    # tasks of 24 KB: the 75 KB padded image in slabs of 6 KB, one output row each
    with _small_tasks(2, 24_000), _spy(numpy_planes.Planes, "pad_into") as pads:
        y = F.conv(x, w, **kw)
    assert len(pads) > 3 * 4  # several slabs per image
    want = torch_conv(x.astype(np.float64), w.astype(np.float64), None, None, stride=(2, 1),
                      padding=((3, 1), (1, 2)), dilation=(2, 1), groups=1)  # fmt: skip
    assert_close(y, want, TOL[np.float32])
