"""fp16 with compute_mode='float32': every step accumulates in fp32, one final rounding.

The reductions are long (~9000 positive terms, sums past 2048 where fp16's
spacing is 2), so accumulating in fp16 would be off by hundreds; the result
must instead be the exact float64 value rounded once to fp16, up to the
fp32 accumulation error (at most n * 2^-24 of the sum, far below half an
fp16 spacing in practice).
"""

import numpy as np
import pytest

from mconv import functional as F

from reference import torch_conv, torch_conv_transpose


def _fp16_spacing(values):
    return np.spacing(np.abs(values).astype(np.float16)).astype(np.float64)


def _check_one_rounding(got, exact, terms):
    """|got - exact| <= half an fp16 spacing (+ fp32 accumulation slack); most equal round(exact)."""
    assert got.dtype == np.float16
    err = np.abs(got.astype(np.float64) - exact)
    slack = terms * 2.0**-24 * np.abs(exact)
    assert np.all(err <= 0.5 * _fp16_spacing(exact) + slack)
    assert np.mean(got == exact.astype(np.float16)) > 0.99


@pytest.mark.parametrize("compute_mode", ["float32", "default"])
def test_long_forward_reduction_rounds_once(compute_mode):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (2, 1024, 40)).astype(np.float16)
    w = rng.uniform(0, 1, (8, 1024, 9)).astype(np.float16)
    b = rng.uniform(0, 1, 8).astype(np.float16)
    y = F.conv1d(x, w, b, compute_mode=compute_mode)
    exact = torch_conv(
        *(a.astype(np.float64) for a in (x, w, b)),
        None,
        stride=1,
        padding=((0, 0),),
        dilation=1,
        groups=1,
    )
    assert exact.max() > 2048  # fp16 spacing is 2 there: fp16 accumulation would stagnate
    _check_one_rounding(y, exact, 1024 * 9)


def test_long_gradient_reductions_round_once():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 1, (16, 4, 64, 64)).astype(np.float16)
    w = rng.uniform(0, 1, (4, 4, 3, 3)).astype(np.float16)
    dy = rng.uniform(0, 1, (16, 4, 62, 62)).astype(np.float16)
    dx, dw, db = F.conv_backward(dy, x, w, has_bias=True, compute_mode="float32")
    _, ex, ew, eb = torch_conv(
        x.astype(np.float64),
        w.astype(np.float64),
        np.zeros(4),
        dy.astype(np.float64),
        stride=1,
        padding=((0, 0),) * 2,
        dilation=1,
        groups=1,
    )
    assert ew.min() > 2048 and eb.min() > 2048
    _check_one_rounding(dw, ew, 16 * 62 * 62)
    _check_one_rounding(db, eb, 16 * 62 * 62)
    _check_one_rounding(dx, ex, 4 * 9)


def test_reflect_padding_adjoint_accumulates_in_fp32():
    """The scatter-add of the reflected border is a reduction too."""
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 1, (1, 512, 5)).astype(np.float16)
    w = rng.uniform(0, 1, (512, 512, 3)).astype(np.float16)
    dy = rng.uniform(0, 1, (1, 512, 5)).astype(np.float16)
    kw = dict(padding=1, padding_mode="reflect", compute_mode="float32")
    dx, _, _ = F.conv_backward(dy, x, w, has_bias=False, **kw)
    _, exact, _, _ = torch_conv(
        x.astype(np.float64),
        w.astype(np.float64),
        None,
        dy.astype(np.float64),
        stride=1,
        padding=((1, 1),),
        dilation=1,
        groups=1,
        padding_mode="reflect",
    )
    _check_one_rounding(dx, exact, 512 * 3 * 2)


def test_transposed_conv_in_fp16():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (1, 2048, 6)).astype(np.float16)
    w = rng.uniform(0, 1, (2048, 4, 3)).astype(np.float16)
    y = F.conv_transpose1d(x, w, stride=2, compute_mode="float32")
    exact = torch_conv_transpose(
        x.astype(np.float64),
        w.astype(np.float64),
        None,
        None,
        stride=2,
        padding=0,
        output_padding=0,
        dilation=1,
        groups=1,
    )
    _check_one_rounding(y, exact, 2048 * 3)
