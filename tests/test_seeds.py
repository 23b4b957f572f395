"""The seed documents' worked examples, verbatim (../shared/seeds)."""

import numpy as np
import pytest

from mconv import nn


def _tripy_input(count, shape):
    return np.arange(count, dtype=np.float32).reshape(shape)


def _set(conv, weight, bias=None):
    conv.weight.data[...] = weight
    if bias is not None:
        conv.bias.data[...] = bias


def test_tripy_conv_basic():
    inp = _tripy_input(16, (1, 1, 4, 4))
    conv = nn.Conv(in_channels=1, out_channels=1, kernel_dims=(2, 2), dtype="float32")
    assert conv.weight.shape == (1, 1, 2, 2) and conv.bias.shape == (1,)
    _set(conv, [[[[0.0, 1.0], [2.0, 3.0]]]], [0.0])
    assert list(conv.state_dict()) == ["weight", "bias"]
    out = conv(inp)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(
        out, [[[[24.0, 30.0, 36.0], [48.0, 54.0, 60.0], [72.0, 78.0, 84.0]]]]
    )


def test_tripy_conv_padding_and_stride():
    inp = _tripy_input(16, (1, 1, 4, 4))
    conv = nn.Conv(
        1, 1, (3, 3), padding=((1, 1), (1, 1)), stride=(3, 1), bias=False, dtype="float32"
    )
    assert conv.bias is None and list(conv.state_dict()) == ["weight"]
    _set(conv, np.arange(9.0).reshape(1, 1, 3, 3))
    np.testing.assert_array_equal(
        conv(inp), [[[[73.0, 121.0, 154.0, 103.0], [139.0, 187.0, 202.0, 113.0]]]]
    )


def test_tripy_depthwise_conv():
    inp = _tripy_input(18, (1, 2, 3, 3))
    conv = nn.Conv(2, 2, (3, 3), groups=2, bias=False, dtype="float32")
    assert conv.weight.shape == (2, 1, 3, 3)
    _set(conv, np.arange(18.0).reshape(2, 1, 3, 3))
    np.testing.assert_array_equal(conv(inp), [[[[204.0]], [[1581.0]]]])


def test_tripy_dilated_conv():
    inp = _tripy_input(9, (1, 1, 3, 3))
    conv = nn.Conv(1, 1, (2, 2), dilation=(2, 2), bias=False, dtype="float32")
    _set(conv, [[[[0.0, 1.0], [2.0, 3.0]]]])
    np.testing.assert_array_equal(conv(inp), [[[[38.0]]]])


def test_tripy_named_children_and_state_dict_keys():
    class StackedLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear1 = nn.Linear(2, 2)
            self.linear2 = nn.Linear(2, 2)

    stacked = StackedLinear()
    assert [(name, type(m).__name__) for name, m in stacked.named_children()] == [
        ("linear1", "Linear"),
        ("linear2", "Linear"),
    ]
    assert list(stacked.state_dict()) == [
        "linear1.weight",
        "linear1.bias",
        "linear2.weight",
        "linear2.bias",
    ]


def test_tripy_load_state_dict_example():
    class MyModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.param = nn.Parameter(np.ones((2,), dtype=np.float32))

    module = MyModule()
    state_dict = module.state_dict()
    np.testing.assert_array_equal(module.param.data, [1.0, 1.0])
    state_dict["param"] = np.zeros((2,), dtype=np.float32)
    missing, unexpected = module.load_state_dict(state_dict)
    assert (missing, unexpected) == ([], [])
    np.testing.assert_array_equal(module.param.data, [0.0, 0.0])


def test_megengine_conv2d_shape_example():
    m = nn.Conv2d(in_channels=3, out_channels=1, kernel_size=3)
    inp = np.arange(0, 96).astype("float32").reshape(2, 3, 4, 4)
    assert m(inp).shape == (2, 1, 2, 2)


def test_oneflow_conv2d_shape_example(rng):
    arr = rng.standard_normal((20, 16, 50, 100)).astype(np.float32)
    m = nn.Conv2d(16, 33, (3, 5), stride=(2, 1), padding=(4, 2), dilation=(3, 1))
    assert m(arr).shape == (20, 33, 26, 100)


@pytest.mark.parametrize(
    "layer,shape,expected",
    [
        (lambda: nn.Conv1d(16, 33, 3, stride=2), (20, 16, 50), (20, 33, 24)),
        (lambda: nn.Conv2d(16, 33, 3, stride=2), (20, 16, 50, 100), (20, 33, 24, 49)),
        (
            lambda: nn.Conv2d(16, 33, (3, 5), stride=(2, 1), padding=(4, 2)),
            (20, 16, 50, 100),
            (20, 33, 28, 100),
        ),
        (
            lambda: nn.Conv3d(16, 33, (3, 5, 2), stride=(2, 1, 1), padding=(4, 2, 0)),
            (2, 16, 10, 50, 20),
            (2, 33, 8, 50, 19),
        ),
        (
            lambda: nn.ConvTranspose2d(16, 33, (3, 5), stride=(2, 1), padding=(4, 2)),
            (20, 16, 50, 100),
            (20, 33, 93, 100),
        ),
        (
            lambda: nn.ConvTranspose3d(16, 33, (3, 5, 2), stride=(2, 1, 1), padding=(0, 4, 2)),
            (2, 16, 10, 50, 20),
            (2, 33, 21, 46, 17),
        ),
    ],
)
def test_pytorch_docstring_shape_examples(layer, shape, expected):
    x = np.zeros(shape, dtype=np.float32)
    assert layer()(x).shape == expected


def test_torchlean_conv_transpose_output_formula():
    """Seed 003: out = (in - 1) * stride - 2 * padding + kernel (output_padding 0)."""
    for size, stride, padding, kernel in [(5, 2, 1, 3), (4, 3, 0, 2), (7, 1, 2, 5)]:
        layer = nn.ConvTranspose1d(2, 3, kernel, stride=stride, padding=padding)
        y = layer(np.zeros((2, size), dtype=np.float32))  # single sample, channels first
        assert y.shape == (3, (size - 1) * stride - 2 * padding + kernel)
