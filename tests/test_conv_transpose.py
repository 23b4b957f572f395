"""Transposed convolution: forward and gradients against PyTorch float64 and a scatter loop."""

import itertools

import numpy as np
import pytest
import torch

from mconv import functional as F, nn

from reference import assert_close, loop_conv_transpose, torch_conv_transpose

SIZES = {1: (5,), 2: (4, 3), 3: (3, 3, 2)}
KERNELS = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}
GEOMETRIES = [  # (stride, dilation, padding, output_padding): output_padding < stride or < dilation
    (s, d, p, op)
    for s, d, p, op in itertools.product((1, 2, 3), (1, 2), (0, 1), (0, 1))
    if op < s or op < d
]


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("stride,dilation,padding,output_padding", GEOMETRIES)
@pytest.mark.parametrize("groups,cin,cout", [(1, 3, 2), (2, 4, 6), (4, 4, 8)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("conv_mode", ["cross_correlation", "convolution"])
def test_conv_transpose_matches_torch(
    rng, n, stride, dilation, padding, output_padding, groups, cin, cout, bias, conv_mode
):
    x = rng.standard_normal((2, cin, *SIZES[n]))
    w = rng.standard_normal((cin, cout // groups, *KERNELS[n]))
    b = rng.standard_normal(cout) if bias else None
    kw = dict(
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        groups=groups,
        dilation=dilation,
        conv_mode=conv_mode,
    )
    y = F.conv_transpose(x, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    ref = torch_conv_transpose(x, w, b, dy, **kw)
    got = (y, *F.conv_transpose_backward(dy, x, w, has_bias=bias, **kw))
    for mine, theirs in zip(got, ref):
        if theirs is None:
            assert mine is None
        else:
            assert_close(mine, theirs)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_unbatched_and_ranked_aliases(rng, n):
    x = rng.standard_normal((3, *SIZES[n]))
    w = rng.standard_normal((3, 2, *KERNELS[n]))
    y = getattr(F, f"conv_transpose{n}d")(x, w, stride=2, padding=1, output_padding=1)
    ref = torch_conv_transpose(
        x[None], w, None, None, stride=2, padding=1, output_padding=1, dilation=1, groups=1
    )
    assert_close(y[None], ref)
    dy = rng.standard_normal(y.shape)
    dx, dw, _ = F.conv_transpose_backward(
        dy, x, w, has_bias=False, stride=2, padding=1, output_padding=1
    )
    _, rdx, rdw, _ = torch_conv_transpose(
        x[None], w, None, dy[None], stride=2, padding=1, output_padding=1, dilation=1, groups=1
    )
    assert_close(dx[None], rdx)
    assert_close(dw, rdw)


@pytest.mark.parametrize(
    "pairs,stride,dilation,groups,output_padding",
    [
        (((1, 0), (0, 2)), (2, 1), (1, 2), 1, (1, 0)),
        (((2, 1), (1, 1)), (3, 2), (1, 1), 2, (2, 1)),
        (((0, 0), (0, 0)), (1, 1), (2, 3), 2, (1, 2)),  # output_padding < dilation, >= stride
    ],
)
def test_asymmetric_padding_against_scatter_loop(
    rng, pairs, stride, dilation, groups, output_padding
):
    x = rng.standard_normal((2, 2 * groups, 4, 3))
    w = rng.standard_normal((2 * groups, 3, 2, 3))
    b = rng.standard_normal(3 * groups)
    y = F.conv_transpose(
        x,
        w,
        b,
        stride=stride,
        padding=pairs,
        dilation=dilation,
        groups=groups,
        output_padding=output_padding,
    )
    assert_close(y, loop_conv_transpose(x, w, b, stride, pairs, dilation, groups, output_padding))


def test_rank4_against_scatter_loop(rng):
    x = rng.standard_normal((1, 2, 3, 2, 3, 2))
    w = rng.standard_normal((2, 2, 2, 2, 1, 2))
    pairs, stride, dilation = ((1, 0), (0, 0), (0, 1), (1, 1)), (2, 1, 1, 2), (1, 2, 1, 1)
    y = F.conv_transpose(
        x, w, None, stride=stride, padding=pairs, dilation=dilation, output_padding=(1, 0, 0, 1)
    )
    assert_close(y, loop_conv_transpose(x, w, None, stride, pairs, dilation, 1, (1, 0, 0, 1)))


@pytest.mark.parametrize("output_size", [(11, 11), (12, 12), (11, 12), (1, 16, 12, 12)])
def test_output_size_picks_output_padding_like_torch(rng, output_size):
    x = rng.standard_normal((1, 16, 6, 6))
    layer = nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1, dtype="float64")
    ref = torch.nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1)
    ref.load_state_dict(
        {"weight": torch.tensor(layer.weight.data), "bias": torch.tensor(layer.bias.data)}
    )
    expected = ref(torch.tensor(x), output_size=list(output_size)).detach().numpy()
    assert_close(layer(x, output_size=output_size), expected)
    assert_close(
        F.conv_transpose(
            x, layer.weight.data, layer.bias.data, stride=2, padding=1, output_size=output_size
        ),
        expected,
    )


def test_pytorch_docstring_upsample_example(rng):
    """Seed 004: downsample 12x12 -> 6x6, then upsample back with output_size=input.size()."""
    x = rng.standard_normal((1, 16, 12, 12)).astype(np.float32)
    downsample = nn.Conv2d(16, 16, 3, stride=2, padding=1)
    upsample = nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1)
    h = downsample(x)
    assert h.shape == (1, 16, 6, 6)
    assert upsample(h, output_size=x.shape).shape == (1, 16, 12, 12)
