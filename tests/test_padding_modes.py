"""Padding modes and conv_mode against PyTorch float64 (explicit torch pad, then conv)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

from mconv import functional as F

from reference import TORCH_PAD_MODE, assert_close, torch_conv

MODES = ["zeros", "reflect", "replicate", "circular"]
SIZES = {1: (7,), 2: (6, 5), 3: (5, 4, 4)}
KERNELS = {1: (3,), 2: (3, 2), 3: (2, 3, 3)}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pads", [[(2, 1)], [(1, 1), (0, 3)], [(3, 0), (1, 2), (2, 2)]])
def test_pad_and_its_adjoint_match_torch(rng, mode, pads):
    x = rng.standard_normal((2, 3, 4, 5, 4)[: 2 + len(pads)])
    tx = torch.tensor(x, requires_grad=True)
    flat = [v for pair in reversed(pads) for v in pair]
    ty = TF.pad(tx, flat, mode=TORCH_PAD_MODE[mode])
    y = F.pad(x, pads, mode)
    assert_close(y, ty.detach().numpy(), 0)
    dy = rng.standard_normal(y.shape)
    ty.backward(torch.tensor(dy))
    assert_close(F.pad_backward(dy, pads, mode), tx.grad.numpy())


def test_pad_docstring_numbers():
    assert F.pad(np.arange(3.0), [(2, 1)], "reflect").tolist() == [2, 1, 0, 1, 2, 1]
    assert F.pad(np.arange(3.0), [(2, 1)], "replicate").tolist() == [0, 0, 0, 1, 2, 2]
    assert F.pad(np.arange(3.0), [(3, 3)], "circular").tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert F.pad(np.arange(3.0), [1], "zeros").tolist() == [0, 0, 1, 2, 0]


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("conv_mode", ["cross_correlation", "convolution"])
@pytest.mark.parametrize(
    "padding,stride,dilation",
    [(1, 1, 1), ("pairs", 2, 1), ("pairs", 1, 2), ("same", 1, 1), ("same", 1, 2), ("edge", 1, 1)],
)
@pytest.mark.parametrize("groups,cout", [(1, 3), (2, 6), (4, 8)])  # 4: depthwise, multiplier 2
@pytest.mark.parametrize("batched", [True, False])
def test_padding_modes_and_conv_mode(
    rng, n, mode, conv_mode, padding, stride, dilation, groups, cout, batched
):
    if padding == "pairs":
        padding = ((2, 1), (0, 2), (1, 0))[:n]
    elif padding == "edge":  # the limit: reflect pad = size - 1, circular pad = size
        limit = min(SIZES[n]) - (1 if mode == "reflect" else 0)
        padding = ((limit, limit),) * n
    pairs = padding if not isinstance(padding, int) else ((padding, padding),) * n
    x = rng.standard_normal((2, 4, *SIZES[n]))
    w = rng.standard_normal((cout, 4 // groups, *KERNELS[n]))
    b = rng.standard_normal(cout)
    kw = dict(
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
        conv_mode=conv_mode,
    )
    xin = x if batched else x[0]
    y = F.conv(xin, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    dx, dw, db = F.conv_backward(dy, xin, w, has_bias=True, **kw)
    ref = torch_conv(
        xin if batched else x[:1],
        w,
        b,
        dy if batched else dy[None],
        stride=stride,
        padding=pairs,
        dilation=dilation,
        groups=groups,
        padding_mode=mode,
        conv_mode=conv_mode,
    )
    for got, want in zip((y, dx, dw, db), ref):
        assert_close(got[None] if got.ndim == want.ndim - 1 else got, want)


def test_replicate_padding_wider_than_the_axis_has_an_adjoint(rng):
    """replicate has no size limit, forward or backward (pad 5 on an axis of 2)."""
    x = rng.standard_normal((1, 2))
    tx = torch.tensor(x, requires_grad=True)
    ty = TF.pad(tx[None], [5, 5], mode="replicate")[0]
    dy = rng.standard_normal(ty.shape)
    ty.backward(torch.tensor(dy))
    assert_close(F.pad(x, [(5, 5)], "replicate"), ty.detach().numpy(), 0)
    assert_close(F.pad_backward(dy, [(5, 5)], "replicate"), tx.grad.numpy())
