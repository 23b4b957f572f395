"""fp16 on the GPU: compute_mode='float32' accumulates in fp32 in every step and
rounds once; 'default' still accumulates each GEMM and kernel in fp32.

The reductions are long (~9000 positive terms, sums past 2048 where fp16's
spacing is 2): accumulating in fp16 would be off by hundreds. The reference is
the NumPy backend in float64 on the same fp16 inputs.
"""

import gpu_env
import numpy as np
import pytest

from mconv import functional as F

pytestmark = gpu_env.requires_gpu


def _on_gpu(*arrays):
    import cupy

    return [cupy.asarray(a) for a in arrays]


def _exact(fn, *arrays, **kw):
    return fn(*(a.astype(np.float64) for a in arrays), **kw)


def _check_one_rounding(got, exact, terms):
    """Within half an fp16 spacing of the exact value (+ fp32 accumulation slack);
    almost all equal to round(exact)."""
    import cupy

    assert got.dtype == np.float16
    got = cupy.asnumpy(got).astype(np.float64)
    spacing = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(got - exact) <= 0.5 * spacing + terms * 2.0**-24 * np.abs(exact))
    assert np.mean(got == exact.astype(np.float16)) > 0.99


@pytest.mark.parametrize("groups", [1, 8])
def test_long_forward_reduction_rounds_once(groups):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 1024 * groups, 40)).astype(np.float16)
    w = rng.uniform(0, 1, (8 * groups, 1024, 9)).astype(np.float16)  # 1024 x 9 terms per output
    b = rng.uniform(0, 1, 8 * groups).astype(np.float16)
    exact = _exact(F.conv1d, x, w, b, groups=groups)
    assert exact.max() > 2048
    y = F.conv1d(*_on_gpu(x, w, b), groups=groups, compute_mode="float32")
    _check_one_rounding(y, exact, 1024 * 9)
    y = F.conv1d(*_on_gpu(x, w), groups=groups, compute_mode="default")  # fp32 GEMM, no bias
    _check_one_rounding(y, _exact(F.conv1d, x, w, groups=groups), 1024 * 9)


@pytest.mark.parametrize("groups,cout", [(1, 4), (4, 4), (4, 8)])  # GEMM, depthwise, multiplier 2
def test_long_gradient_reductions_round_once(groups, cout):
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (16, 4, 64, 64)).astype(np.float16)
    w = rng.uniform(0, 1, (cout, 4 // groups, 3, 3)).astype(np.float16)
    dy = rng.uniform(0, 1, (16, cout, 62, 62)).astype(np.float16)
    kw = dict(groups=groups)
    dx, dw, db = F.conv_backward(*_on_gpu(dy, x, w), has_bias=True, compute_mode="float32", **kw)
    ex, ew, eb = _exact(lambda *a, **k: F.conv_backward(*a, has_bias=True, **k), dy, x, w, **kw)
    assert ew.min() > 2048 and eb.min() > 2048
    _check_one_rounding(dw, ew, 16 * 62 * 62)
    _check_one_rounding(db, eb, 16 * 62 * 62)
    _check_one_rounding(dx, ex, 4 * 9 * cout // groups)


def test_reflect_padding_adjoint_accumulates_in_fp32():
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (1, 512, 5)).astype(np.float16)
    w = rng.uniform(0, 1, (512, 512, 3)).astype(np.float16)
    dy = rng.uniform(0, 1, (1, 512, 5)).astype(np.float16)
    kw = dict(padding=1, padding_mode="reflect")
    dx = F.conv_backward(*_on_gpu(dy, x, w), has_bias=False, compute_mode="float32", **kw)[0]
    exact = _exact(lambda *a, **k: F.conv_backward(*a, has_bias=False, **k)[0], dy, x, w, **kw)
    _check_one_rounding(dx, exact, 512 * 3 * 2)


def test_transposed_conv_in_fp16():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (1, 2048, 6)).astype(np.float16)
    w = rng.uniform(0, 1, (2048, 4, 3)).astype(np.float16)
    y = F.conv_transpose1d(*_on_gpu(x, w), stride=2, compute_mode="float32")
    _check_one_rounding(y, _exact(F.conv_transpose1d, x, w, stride=2), 2048 * 3)


def test_default_mode_is_close_in_fp16():
    """'default' stores intermediates in fp16 (a few roundings), nothing worse."""
    import cupy

    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 16, 20, 20)).astype(np.float16)
    w = rng.standard_normal((16, 4, 3, 3)).astype(np.float16)
    dy = rng.standard_normal((4, 16, 20, 20)).astype(np.float16)
    kw = dict(groups=4, padding=1, padding_mode="circular")
    got = F.conv_backward(*_on_gpu(dy, x, w), has_bias=True, compute_mode="default", **kw)
    want = _exact(lambda *a, **k: F.conv_backward(*a, has_bias=True, **k), dy, x, w, **kw)
    for mine, ref in zip(got, want):
        assert mine.dtype == np.float16
        err = np.abs(cupy.asnumpy(mine).astype(np.float64) - ref).max()
        assert err <= 4e-3 * np.abs(ref).max()
