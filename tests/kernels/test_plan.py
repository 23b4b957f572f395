"""The pure-Python planning (mconv.kernels.plan), the kernel table, and the
NumPy emulation of cuBLAS that the host tests rely on."""

import re

import numpy as np
import pytest

from mconv import kernels
from mconv.geometry import conv_geometry
from mconv.kernels import host, plan


@pytest.mark.parametrize(
    "total,block,max_blocks,want",
    [(0, 256, 64, (1, 256)), (1, 256, 64, (1, 256)), (257, 256, 64, (2, 256)),
     (10**12, 256, 1 << 16, (1 << 16, 256))],
)  # fmt: skip
def test_launch_config(total, block, max_blocks, want):
    assert plan.launch_config(total, block, max_blocks) == want


def test_reduction_lanes():
    assert plan.reduction_lanes(0, 5) == 1
    assert plan.reduction_lanes(8 * 3136, 128) == 512  # bias of a 56x56 batch of 8
    assert plan.reduction_lanes(10**9, 1) == 1024  # capped
    assert plan.reduction_lanes(100, 1) == 7  # >= 16 terms per lane


def test_batch_chunks_fit_the_workspace():
    assert plan.batch_chunks(5, 100, 250) == [(0, 2), (2, 4), (4, 5)]
    assert plan.batch_chunks(3, 10**12, 1) == [(0, 1), (1, 2), (2, 3)]  # one image at least
    assert plan.batch_chunks(4, 10, 1 << 30) == [(0, 4)]


def test_depthwise_and_pointwise_dispatch():
    def geom(x, w, **kw):
        return conv_geometry(x, w, **kw)[0]

    assert plan.is_depthwise(geom((1, 4, 5, 5), (8, 1, 3, 3), groups=4))
    assert not plan.is_depthwise(geom((1, 4, 5, 5), (4, 2, 3, 3), groups=2))
    assert not plan.is_depthwise(geom((1, 1, 5, 5), (4, 1, 3, 3)))  # groups=1: a plain GEMM
    assert plan.is_pointwise(geom((1, 4, 5, 5), (8, 4, 1, 1)))
    assert not plan.is_pointwise(geom((1, 4, 5, 5), (8, 4, 1, 1), stride=2))
    assert not plan.is_pointwise(geom((1, 4, 5, 5), (8, 4, 1, 1), padding=1))


def test_conv_params_layout():
    g, _ = conv_geometry((2, 4, 7, 6), (6, 2, 3, 2), stride=(2, 1), dilation=(1, 2),
                         padding=((1, 2), (0, 1)), groups=2)  # fmt: skip
    assert plan.conv_params(g, 2) == (2, 2, 4, 6, 2, 6, 4 * 5, 42, 7, 6, 4, 5, 3, 2, 2, 1, 1, 2,
                                      1, 0)  # fmt: skip
    assert plan.pad_params((2, 3, 5, 4), ((1, 2), (0, 3)), "circular") == (2, 6, 3, 5, 4, 1, 0,
                                                                         2, 3)  # fmt: skip


def _operands(rng, call, dtype=np.float64):
    """Flat buffers just large enough for every batch entry of ``call``."""

    def size(offset, stride, ld, cols):
        return offset + stride * (call.batch - 1) + ld * cols

    a = rng.standard_normal(size(call.offset_a, call.stride_a, call.lda,
                                 call.m if call.transa else call.k)).astype(dtype)  # fmt: skip
    b = rng.standard_normal(size(call.offset_b, call.stride_b, call.ldb,
                                 call.k if call.transb else call.n)).astype(dtype)  # fmt: skip
    c = rng.standard_normal(size(call.offset_c, call.stride_c, call.ldc, call.n)).astype(dtype)
    return a, b, c


@pytest.mark.parametrize("transa", [False, True])
@pytest.mark.parametrize("transb", [False, True])
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gemm_reference_is_column_major_cublas(transa, transb, beta):
    """Checked element by element against the BLAS definition (column-major, ld, strides)."""
    call = plan.GemmCall(transa, transb, 3, 4, 5, lda=7, ldb=6, ldc=5, offset_a=2, offset_b=1,
                         offset_c=3, stride_a=40, stride_b=35, stride_c=30, batch=2, beta=beta)  # fmt: skip
    a, b, c = _operands(np.random.default_rng(0), call)
    before = c.copy()
    host.gemm_reference(call, a, b, c)
    for i in range(call.batch):
        for row in range(call.m):
            for col in range(call.n):
                total = 0.0
                for k in range(call.k):
                    ia = (k + row * call.lda) if transa else (row + k * call.lda)
                    ib = (col + k * call.ldb) if transb else (k + col * call.ldb)
                    total += (a[call.offset_a + i * call.stride_a + ia]
                              * b[call.offset_b + i * call.stride_b + ib])  # fmt: skip
                ic = call.offset_c + i * call.stride_c + row + col * call.ldc
                assert c[ic] == pytest.approx(total + beta * before[ic], rel=1e-12)


def test_gemm_reference_refuses_out_of_bounds_operands():
    call = plan.GemmCall(False, False, 3, 4, 5, 3, 5, 3, 0, 0, 0, 0, 0, 0, 1)
    with pytest.raises(IndexError, match="out of bounds"):
        host.gemm_reference(call, np.zeros(14), np.zeros(20), np.zeros(12))


@pytest.mark.parametrize("a_t,b_t", [(False, False), (True, False), (False, True), (True, True)])
def test_row_major_gemm_translates_to_cublas(a_t, b_t):
    """RowGemm.cublas() + swapped operands computes the row-major product."""
    rng = np.random.default_rng(1)
    m, n, k = 3, 4, 5
    a = rng.standard_normal((k, m) if a_t else (m, k))
    b = rng.standard_normal((n, k) if b_t else (k, n))
    c = np.zeros((m, n))
    host.gemm_reference(plan.RowGemm(m, n, k, a_t, b_t).cublas(), b.ravel(), a.ravel(), c.ravel())
    np.testing.assert_allclose(c, (a.T if a_t else a) @ (b.T if b_t else b), rtol=1e-12)


def test_gemm_sizes_beyond_int32_are_refused():
    with pytest.raises(ValueError, match="exceeds cuBLAS's 32-bit sizes"):
        plan.RowGemm(2**31, 4, 5).cublas()


@pytest.mark.parametrize("batch,groups", [(1, 1), (3, 1), (1, 4), (2, 4), (5, 2)])
def test_gemm_plans_cover_every_image_and_group_once(batch, groups):
    g, _ = conv_geometry((batch, 2 * groups, 6, 5), (3 * groups, 2, 3, 2), groups=groups)
    calls = plan.forward_gemms(g, batch)
    assert len(calls) == min(batch, groups)
    covered = set()
    for call in calls:
        for i in range(call.batch):
            covered.add(tuple(o + i * s for o, s in zip(call.offsets, call.strides)))
    assert len(covered) == batch * groups  # distinct (W, cols, y) offsets: each pair once
    (dw,) = plan.backward_filter_gemms(g, batch, beta=1.0)
    assert dw.batch == groups and dw.K == batch * 4 * 4 and dw.beta == 1.0


def test_kernel_table_matches_the_sources():
    """Every table entry is a template of that name with those parameters in the sources."""
    text = re.sub(r"\s+", " ", kernels.source())
    for kernel in kernels.KERNELS:
        header = f"template <{', '.join('typename ' + t for t in kernel.template)}>"
        signature = f"__global__ void {kernel.name}("
        assert f"{header} {signature}" in text, kernel.name
        params = text.split(f"{header} {signature}")[1].split(")")[0]
        declared = [p.replace("__restrict__", "").split() for p in params.split(",")]
        assert [" ".join(p) for p in declared] == [" ".join(p.split()) for p in kernel.params]
    assert len(kernels.name_expressions()) == len(set(kernels.name_expressions())) == 31


def test_host_source_has_one_launcher_per_instantiation():
    text = host.host_source()
    for kernel, types in kernels.instantiations():
        assert f'extern "C" void {kernel.symbol(types)}(unsigned grid, unsigned block' in text
    assert text.startswith('#include "host_shim.h"')
