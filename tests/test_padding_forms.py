"""Padding forms the peer frameworks use: 'same'/'same_lower' at any stride (TensorFlow,
JAX 'SAME', ONNX SAME_UPPER/SAME_LOWER) on conv and transposed conv, negative padding (a
crop, as ``lax.conv_general_dilated`` allows), and the 1x1 transposed case whose output
is one larger than its input.

Oracles: ONNX's reference evaluator for SAME_* (its Conv ignores dilation there, so
dilated 'same' is checked against TensorFlow's formula and torch), torch float64 on
explicitly cropped or padded tensors for negative padding, torch for the rest.
"""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator
from reference import assert_close, torch_conv, torch_conv_transpose

from mconv import functional as F
from mconv import nn

SIZES = {1: (9,), 2: (7, 8), 3: (5, 6, 4)}


def onnx_run(op: str, x, w, b, **attributes):
    """One ONNX node (Conv or ConvTranspose) run by onnx.reference on float64 arrays."""
    inputs = ["x", "w"] + (["b"] if b is not None else [])
    node = helper.make_node(op, inputs, ["y"], **attributes)
    values = [helper.make_tensor_value_info(n, TensorProto.DOUBLE, None) for n in inputs]
    graph = helper.make_graph(
        [node], "g", values, [helper.make_tensor_value_info("y", TensorProto.DOUBLE, None)]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    feeds = dict(zip(inputs, (x, w, b)))
    return ReferenceEvaluator(model).run(None, feeds)[0]


def tf_same(size, kernel, stride, dilation, lower=False):
    """TensorFlow's SAME padding of one axis (the odd element after; before when lower)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    small = total // 2
    return (total - small, small) if lower else (small, total - small)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
@pytest.mark.parametrize("mode", ["same", "same_lower"])
def test_same_conv_matches_onnx(n, stride, kernel, mode):
    rng = np.random.default_rng(n * 100 + stride * 10 + kernel)
    x = rng.standard_normal((2, 4, *SIZES[n]))
    w = rng.standard_normal((6, 2, *(kernel,) * n))
    b = rng.standard_normal(6)
    auto_pad = "SAME_UPPER" if mode == "same" else "SAME_LOWER"
    want = onnx_run("Conv", x, w, b, auto_pad=auto_pad, strides=[stride] * n, group=2)
    got = F.conv(x, w, b, stride=stride, padding=mode, groups=2)
    assert got.shape == want.shape == (2, 6, *(-(-s // stride) for s in SIZES[n]))
    assert_close(got, want)


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("stride,dilation", [(2, 2), (3, 2), (1, 3)])
@pytest.mark.parametrize("mode", ["same", "same_lower"])
def test_dilated_same_conv_and_its_gradients_match_tensorflows_padding(n, stride, dilation, mode):
    rng = np.random.default_rng(7 + stride + dilation)
    x, w = rng.standard_normal((2, 3, *SIZES[n])), rng.standard_normal((4, 3, *(3,) * n))
    pairs = [tf_same(s, 3, stride, dilation, lower=mode == "same_lower") for s in SIZES[n]]
    y = F.conv(x, w, stride=stride, dilation=dilation, padding=mode)
    dy = rng.standard_normal(y.shape)
    want = torch_conv(x, w, None, dy, stride=stride, padding=pairs, dilation=dilation, groups=1)
    got = (y, *F.conv_backward(dy, x, w, has_bias=False, stride=stride, dilation=dilation,
                               padding=mode)[:2])  # fmt: skip
    for mine, theirs in zip(got, want[:3]):
        assert_close(mine, theirs)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel,dilation", [(1, 1), (2, 1), (3, 1), (4, 1), (3, 2)])
@pytest.mark.parametrize("mode", ["same", "same_lower"])
def test_same_transposed_conv_matches_onnx(n, stride, kernel, dilation, mode):
    """group=1: onnx.reference's grouped ConvTranspose fails on its own reshape."""
    rng = np.random.default_rng(n * 100 + stride * 10 + kernel + dilation)
    x = rng.standard_normal((2, 4, *SIZES[n]))
    w = rng.standard_normal((4, 3, *(kernel,) * n))
    b = rng.standard_normal(3)
    auto_pad = "SAME_UPPER" if mode == "same" else "SAME_LOWER"
    want = onnx_run("ConvTranspose", x, w, b, auto_pad=auto_pad, strides=[stride] * n,
                    dilations=[dilation] * n)  # fmt: skip
    got = F.conv_transpose(x, w, b, stride=stride, padding=mode, dilation=dilation)
    assert got.shape == want.shape == (2, 3, *(s * stride for s in SIZES[n]))
    assert_close(got, want)
    grouped = F.conv_transpose(x, w[:, :1], None, stride=stride, padding=mode, groups=2,
                               dilation=dilation)  # fmt: skip
    halves = [F.conv_transpose(x[:, g * 2 : g * 2 + 2], w[g * 2 : g * 2 + 2, :1], None,
                               stride=stride, padding=mode, dilation=dilation) for g in (0, 1)]  # fmt: skip
    assert_close(grouped, np.concatenate(halves, axis=1))


@pytest.mark.parametrize("transposed", [False, True])
def test_layers_with_same_padding_follow_the_input_size(transposed):
    cls = nn.ConvTranspose2d if transposed else nn.Conv2d
    layer = cls(2, 3, 3, stride=2, padding="same", dtype="float64")
    assert "padding=same" in repr(layer)
    for size in [(5, 6), (8, 8), (1, 3)]:
        x = np.ones((1, 2, *size))
        y = layer(x)
        expected = tuple(s * 2 for s in size) if transposed else tuple(-(-s // 2) for s in size)
        assert y.shape == (1, 3, *expected)
        assert layer.backward(np.ones_like(y)).shape == x.shape
        want = (F.conv_transpose if transposed else F.conv)(
            x, layer.weight.data, layer.bias.data, stride=2, padding="same"
        )
        assert_close(y, want)


def _pairs(n, k):
    """Crops at either end or both, mixed with padding; the first axis varies with k."""
    first = [(-1, 0), (0, -2), (-1, 2), (2, -3)][k]
    return tuple(itertools.islice(itertools.cycle([first, (1, -1), (-2, 1)]), n))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("stride,dilation,groups", [(1, 1, 1), (2, 1, 2), (1, 2, 1), (2, 2, 4)])
def test_negative_padding_crops_the_conv_input(n, k, stride, dilation, groups):
    rng = np.random.default_rng(n + 10 * k)
    pairs = _pairs(n, k)
    x = rng.standard_normal((2, 4, *(s + 2 for s in SIZES[n])))
    w = rng.standard_normal((8, 4 // groups, *(2,) * n))
    b = rng.standard_normal(8)
    kw = dict(stride=stride, padding=pairs, dilation=dilation, groups=groups)
    y = F.conv(x, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    want = torch_conv(x, w, b, dy, **kw)  # torch pads by the pairs: negative ones crop
    got = (y, *F.conv_backward(dy, x, w, has_bias=True, **kw))
    for mine, theirs in zip(got, want):
        assert_close(mine, theirs)
    layer = nn.Conv(4, 8, (2,) * n, padding=pairs, stride=(stride,) * n, groups=groups,
                    dilation=(dilation,) * n, dtype="float64")  # fmt: skip
    layer.weight.data, layer.bias.data = w, b
    assert_close(layer(x), want[0])


def _torch_transpose_with_pairs(x, w, b, dy, pairs, **kw):
    """Transposed conv with (before, after) pairs, any sign: the full output (padding 0),
    then cropped by positive amounts and padded with zeros by negative ones; bias after."""
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    n = w.ndim - 2
    full = getattr(TF, f"conv_transpose{n}d")(tx, tw, None, padding=0, **kw)
    flat = [-v for pair in reversed(pairs) for v in pair]
    y = TF.pad(full, flat) + tb.reshape(1, -1, *(1,) * n)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("k", range(4))
@pytest.mark.parametrize("stride,dilation,groups", [(1, 1, 1), (2, 1, 2), (2, 3, 1)])
def test_negative_padding_of_a_transposed_conv_adds_zero_borders(n, k, stride, dilation, groups):
    rng = np.random.default_rng(n + 10 * k + stride)
    pairs = _pairs(n, k)
    x = rng.standard_normal((2, 4, *SIZES[n]))
    w = rng.standard_normal((4, 6 // groups, *(3,) * n))
    b = rng.standard_normal(6)
    kw = dict(stride=stride, dilation=dilation, groups=groups)
    y = F.conv_transpose(x, w, b, padding=pairs, **kw)
    dy = rng.standard_normal(y.shape)
    want = _torch_transpose_with_pairs(x, w, b, dy, pairs, **kw)
    got = (y, *F.conv_transpose_backward(dy, x, w, has_bias=True, padding=pairs, **kw))
    for mine, theirs in zip(got, want):
        assert_close(mine, theirs)
    tangents = [rng.standard_normal(a.shape) for a in (x, w, b)]
    jvp = F.conv_transpose_jvp(x, w, b, *tangents, padding=pairs, **kw)
    by_linearity = F.conv_transpose(tangents[0], w, None, padding=pairs, **kw) + F.conv_transpose(
        x, tangents[1], tangents[2], padding=pairs, **kw
    )
    assert_close(jvp, by_linearity)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("output_padding,dilation", [(1, 2), (2, 3)])
def test_a_1x1_transposed_conv_one_larger_than_its_input(n, output_padding, dilation):
    """Kernel 1 and stride 1 take the 1x1 fast path, but output_padding (allowed through the
    dilation) makes the output larger than the input."""
    rng = np.random.default_rng(n)
    x, w, b = rng.standard_normal((2, 3, *SIZES[n])), rng.standard_normal((3, 2, *(1,) * n)), None
    kw = dict(stride=1, padding=0, output_padding=output_padding, dilation=dilation, groups=1)
    y = F.conv_transpose(x, w, b, **kw)
    dy = rng.standard_normal(y.shape)
    want = torch_conv_transpose(x, w, b, dy, **kw)
    got = (y, *F.conv_transpose_backward(dy, x, w, has_bias=False, **kw)[:2])
    for mine, theirs in zip(got, want[:3]):
        assert_close(mine, theirs)
    repro = F.conv_transpose_backward(np.ones((1, 1, 4)), np.arange(3.0).reshape(1, 1, 3),
                                      np.ones((1, 1, 1)), has_bias=False, dilation=2,
                                      output_padding=1)  # fmt: skip
    np.testing.assert_array_equal(repro[0], [[[1.0, 1.0, 1.0]]])
    np.testing.assert_array_equal(repro[1], [[[3.0]]])
