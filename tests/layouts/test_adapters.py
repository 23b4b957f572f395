"""Layout adapters: each framework's documented index mapping, written out element by
element here (independently of layouts.adapters), round trips, and bad input."""

import itertools

import numpy as np
import pytest
from hypothesis import given, strategies as st

import layouts
from layouts import bias_from_torch, bias_to_torch, from_torch, to_torch


def _torch_weight(rng, n, out_ch, in_per_group, k=(3, 2, 2)):
    return rng.standard_normal((out_ch, in_per_group, *k[:n]))


def _kernel_positions(shape):
    return itertools.product(*(range(s) for s in shape))


@pytest.mark.parametrize("n", [1, 2, 3])
def test_keras_and_flax_conv_are_hwio(rng, n):
    w = _torch_weight(rng, n, 6, 2)
    for framework in ("tensorflow", "jax"):
        foreign = from_torch(w, framework, "conv")
        assert foreign.shape == (*w.shape[2:], 2, 6)
        for k in _kernel_positions(w.shape[2:]):
            np.testing.assert_array_equal(foreign[k], w[(slice(None), slice(None), *k)].T)
        np.testing.assert_array_equal(to_torch(foreign, framework, "conv"), w)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_keras_depthwise_channel_order(rng, n):
    channels, multiplier = 3, 2
    w = _torch_weight(rng, n, channels * multiplier, 1)
    keras = from_torch(w, "tensorflow", "depthwise", groups=channels)
    assert keras.shape == (*w.shape[2:], channels, multiplier)
    for c, m in itertools.product(range(channels), range(multiplier)):
        np.testing.assert_array_equal(keras[..., c, m], w[c * multiplier + m, 0])
    np.testing.assert_array_equal(to_torch(keras, "tensorflow", "depthwise"), w)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_keras_transposed_is_k_out_in(rng, n):
    w = _torch_weight(rng, n, 4, 5)  # torch transposed: (in=4, out=5, *k)
    keras = from_torch(w, "tensorflow", "conv_transpose")
    assert keras.shape == (*w.shape[2:], 5, 4)
    for i, o in itertools.product(range(4), range(5)):
        np.testing.assert_array_equal(keras[..., o, i], w[i, o])
    np.testing.assert_array_equal(to_torch(keras, "tensorflow", "conv_transpose"), w)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_flax_transposed_kernel_is_flipped(rng, n):
    w = _torch_weight(rng, n, 4, 5)
    flax = from_torch(w, "jax", "conv_transpose")
    kernel = w.shape[2:]
    for k in _kernel_positions(kernel):
        flipped = tuple(s - 1 - i for s, i in zip(kernel, k))
        np.testing.assert_array_equal(flax[flipped], w[(slice(None), slice(None), *k)])
    np.testing.assert_array_equal(to_torch(flax, "jax", "conv_transpose"), w)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_megengine_grouped_conv_and_transposed(rng, n, groups):
    conv = _torch_weight(rng, n, 2 * groups, 3)  # (O, I/G, *k)
    mge = from_torch(conv, "megengine", "conv", groups=groups)
    if groups == 1:
        assert mge.shape == conv.shape
    else:
        assert mge.shape == (groups, 2, 3, *conv.shape[2:])
        for g, o in itertools.product(range(groups), range(2)):
            np.testing.assert_array_equal(mge[g, o], conv[g * 2 + o])
    np.testing.assert_array_equal(to_torch(mge, "megengine", "conv", ndim=n), conv)
    np.testing.assert_array_equal(to_torch(mge, "megengine", "conv", groups=groups), conv)
    transposed = _torch_weight(rng, n, 3 * groups, 2)  # (I, O/G, *k)
    mge_t = from_torch(transposed, "megengine", "conv_transpose", groups=groups)
    if groups > 1:
        assert mge_t.shape == (groups, 3, 2, *transposed.shape[2:])
        np.testing.assert_array_equal(mge_t[1, 2], transposed[3 + 2])
    np.testing.assert_array_equal(
        to_torch(mge_t, "megengine", "conv_transpose", ndim=n), transposed
    )


def test_megengine_default_reading_is_2d():
    """DESIGN.md's example: a 5-d MegEngine weight is a grouped 2-d conv unless told otherwise."""
    assert to_torch(np.zeros((4, 2, 3, 5, 5)), "megengine").shape == (8, 3, 5, 5)
    assert to_torch(np.zeros((4, 2, 3, 5, 5)), "megengine", ndim=3).shape == (4, 2, 3, 5, 5)


def test_oneflow_channels_last(rng):
    w = _torch_weight(rng, 2, 4, 3)
    cl = from_torch(w, "oneflow", "conv", channels_last=True)
    assert cl.shape == (4, 3, 2, 3)
    np.testing.assert_array_equal(cl[:, 1, 0, :], w[:, :, 1, 0])
    np.testing.assert_array_equal(to_torch(cl, "oneflow", "conv", channels_last=True), w)


@pytest.mark.parametrize("framework", ["torch", "tripy", "onnx", "oneflow"])
def test_torch_like_layouts_are_identity(rng, framework):
    w = _torch_weight(rng, 2, 4, 2)
    for kind in layouts.KINDS:
        np.testing.assert_array_equal(to_torch(w, framework, kind, groups=2), w)
        np.testing.assert_array_equal(from_torch(w, framework, kind, groups=2), w)


def test_biases(rng):
    b = rng.standard_normal(5)
    for n in (1, 2, 3):
        mge = bias_from_torch(b, "megengine", ndim=n)
        assert mge.shape == (1, 5, *(1,) * n)
        np.testing.assert_array_equal(bias_to_torch(mge, "megengine"), b)
    for framework in ("torch", "oneflow", "tensorflow", "onnx", "jax", "tripy"):
        np.testing.assert_array_equal(bias_to_torch(bias_from_torch(b, framework, 2), framework), b)


@st.composite
def adapter_cases(draw):
    framework = draw(st.sampled_from(layouts.FRAMEWORKS))
    kind = draw(st.sampled_from(layouts.KINDS))
    n = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    if framework in ("tensorflow", "jax") and kind == "conv_transpose":
        groups = 1
    if kind == "depthwise":
        shape = (groups * draw(st.integers(1, 3)), 1)
    else:
        shape = (groups * draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(n))
    values = np.arange(np.prod(shape + kernel), dtype=np.float64).reshape(shape + kernel)
    return values, framework, kind, groups, n


@given(adapter_cases())
def test_every_adapter_round_trips(case):
    w, framework, kind, groups, n = case
    foreign = from_torch(w, framework, kind, groups=groups)
    np.testing.assert_array_equal(to_torch(foreign, framework, kind, groups, ndim=n), w)


@pytest.mark.parametrize("call,exception,pattern", [
    (lambda: to_torch(np.zeros((2, 2, 3)), "keras"), ValueError, r"framework must be one of .* framework='keras'"),
    (lambda: to_torch(np.zeros((2, 2, 3)), "torch", "deconv"), ValueError, r"kind='deconv'"),
    (lambda: to_torch([[1]], "torch"), TypeError, r"w must be a numpy.ndarray, but got list"),
    (lambda: to_torch(np.zeros((2, 2)), "torch"), ValueError, r"at least 3 dimensions, but got w of size \[2, 2\]"),
    (lambda: from_torch(np.zeros((4, 2, 3, 3)), "megengine", "conv"), ValueError,
     r"groups is required, but got groups=None"),
    (lambda: from_torch(np.zeros((5, 2, 3, 3)), "megengine", "conv", groups=2), ValueError,
     r"not divisible by groups=2"),
    (lambda: to_torch(np.zeros((4, 2, 3, 5, 5)), "megengine", groups=3), ValueError,
     r"group axis holds 4 groups, but got groups=3"),
    (lambda: to_torch(np.zeros((4, 2, 3, 3)), "megengine", ndim=3), ValueError,
     r"for ndim=3 has 5 or 6 dimensions, but got w of size \[4, 2, 3, 3\]"),
    (lambda: from_torch(np.zeros((6, 2, 3)), "tensorflow", "depthwise", groups=3), ValueError,
     r"\(C\*M, 1, \*k\) with C=groups=3, but got w of size \[6, 2, 3\]"),
    (lambda: from_torch(np.zeros((4, 2, 3)), "jax", "conv_transpose", groups=2), ValueError,
     r"transposed convs have no groups, but got groups=2"),
    (lambda: to_torch(np.zeros((4, 2, 3)), "torch", channels_last=True), ValueError,
     r"channels_last applies to oneflow only"),
    (lambda: to_torch(np.zeros((4, 2, 3)), "torch", groups=0), ValueError, r"groups must be >= 1, but got groups=0"),
    (lambda: bias_to_torch(np.zeros((2, 4, 1, 1)), "megengine"), ValueError, r"\(1, O, 1, ...\), but got b of size"),
    (lambda: bias_from_torch(np.zeros(4), "megengine"), ValueError, r"ndim >= 1, but got ndim=None"),
    (lambda: bias_to_torch(np.zeros((4, 1)), "torch"), ValueError, r"1-dimensional, but got b of size \[4, 1\]"),
])  # fmt: skip
def test_adapter_errors(call, exception, pattern):
    with pytest.raises(exception, match=pattern):
        call()
