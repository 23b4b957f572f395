"""nn.MaxPool against torch.nn.MaxPool{1,2,3}d (float64): ranks 1-3, overlapping and
disjoint windows, stride past the kernel, padding, unbatched input, ties (the gradient
goes to the first maximum), NaN, fp16 (exact maxima, gradients summed in fp32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import assert_close

from mconv import nn

OURS = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
THEIRS = {1: torch.nn.MaxPool1d, 2: torch.nn.MaxPool2d, 3: torch.nn.MaxPool3d}

# rank, kernel, stride, padding, input shape
CASES = [
    (1, 3, 1, 1, (2, 3, 9)),  # overlapping windows: inputs win several windows
    (1, 2, None, 0, (3, 7)),  # unbatched; odd length drops the last element
    (2, 2, None, 0, (2, 3, 6, 8)),
    (2, 3, 2, 1, (2, 2, 7, 6)),
    (2, (3, 2), (1, 3), (1, 0), (1, 2, 6, 7)),  # stride past the kernel along one axis
    (3, 2, 1, 1, (1, 2, 4, 3, 5)),
    (3, (1, 3, 2), (2, 1, 2), (0, 1, 1), (2, 5, 6, 4)),  # unbatched 3-d
]


def _both(rank, kernel, stride, padding, x, dy=None, rng=None):
    ours = OURS[rank](kernel, stride=stride, padding=padding)
    y = ours(x)
    dy = rng.standard_normal(y.shape) if dy is None else dy
    dx = ours.backward(dy.astype(x.dtype))
    tx = torch.tensor(x.astype(np.float64), requires_grad=True)
    ty = THEIRS[rank](kernel, stride=stride, padding=padding)(tx)
    ty.backward(torch.tensor(dy.astype(np.float64)))
    return (y, dx), (ty.detach().numpy(), tx.grad.numpy())


@pytest.mark.parametrize("rank,kernel,stride,padding,shape", CASES)
def test_max_pool_matches_torch(rng, rank, kernel, stride, padding, shape):
    x = rng.standard_normal(shape)
    (y, dx), (ry, rdx) = _both(rank, kernel, stride, padding, x, rng=rng)
    assert_close(y, ry, 0.0)
    assert_close(dx, rdx)


@pytest.mark.parametrize("rank,kernel,stride,padding,shape", CASES[::2])
def test_ties_send_the_gradient_to_the_first_maximum(rng, rank, kernel, stride, padding, shape):
    x = rng.integers(0, 3, shape).astype(np.float64)  # many equal maxima per window
    (y, dx), (ry, rdx) = _both(rank, kernel, stride, padding, x, rng=rng)
    assert_close(y, ry, 0.0)
    assert_close(dx, rdx)


def test_nan_wins_the_window():
    x = np.array([[1.0, np.nan, 3.0, 2.0, -1.0, 5.0]])
    (y, dx), (ry, _) = _both(1, 2, None, 0, x, dy=np.ones((1, 3)))
    np.testing.assert_array_equal(y, ry)  # [nan, 3, 5]
    assert np.isnan(y[0, 0]) and dx[0, 1] == 1.0 and dx[0, 0] == 0.0


def test_fp16_maxima_are_exact_and_gradients_round_once(rng):
    x = rng.standard_normal((2, 3, 9, 9)).astype(np.float16)
    dy = rng.standard_normal((2, 3, 8, 8)).astype(np.float16)
    (y, dx), (ry, rdx) = _both(2, 2, 1, 0, x, dy=dy)  # each input wins up to 4 windows
    assert y.dtype == dx.dtype == np.float16
    np.testing.assert_array_equal(y, ry.astype(np.float16))
    np.testing.assert_array_equal(dx, rdx.astype(np.float16))  # the fp64 sum of fp16 terms


def test_backward_before_forward_and_bad_input():
    pool = nn.MaxPool2d(2)
    with pytest.raises(RuntimeError, match=r"MaxPool2d.backward\(\) called before forward"):
        pool.backward(np.ones((1, 1, 1, 1)))
    with pytest.raises(TypeError, match="input"):
        pool([[1.0, 2.0]])


@pytest.mark.parametrize(
    "ours,theirs,shape",
    [
        (
            nn.AvgPool1d(3, stride=2, padding=1),
            torch.nn.AvgPool1d(3, stride=2, padding=1),
            (2, 3, 8),
        ),
        (
            nn.AvgPool3d(2, padding=(0, 1, 1)),
            torch.nn.AvgPool3d(2, padding=(0, 1, 1)),
            (1, 2, 4, 3, 5),
        ),
    ],
)
def test_avg_pool_1d_3d_match_torch(rng, ours, theirs, shape):
    x = rng.standard_normal(shape)
    y = ours(x)
    dy = rng.standard_normal(y.shape)
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx)
    ty.backward(torch.tensor(dy))
    assert_close(y, ty.detach().numpy())
    assert_close(ours.backward(dy), tx.grad.numpy())
