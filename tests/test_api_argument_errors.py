"""Bad arguments of issue 13: each is a ValueError or TypeError that names the argument
and ends with the value received (never OverflowError, AttributeError or silence)."""

import numpy as np
import pytest

import layouts
from mconv import functional as F
from mconv import nn
from parallel.sharding import shard_range

X = np.zeros((1, 1, 5, 5), np.float32)
W = np.zeros((1, 1, 3, 3), np.float32)


@pytest.mark.parametrize("name", ["stride", "dilation"])
def test_conv_sizes_beyond_int64(name):
    with pytest.raises(ValueError, match=rf"{name} must lie in \(-2\*\*63, 2\*\*63\) in every "
                                         rf"dimension, but got {name}=1180591620717411303424$"):  # fmt: skip
        F.conv(X, W, **{name: 2**70})


def test_conv_padding_beyond_int64():
    with pytest.raises(ValueError, match=r"padding must lie in .* but got padding=\(1, -2\*\*70\)$"
                       .replace("-2\\*\\*70", str(-(2**70)))):  # fmt: skip
        F.conv(X, W, padding=(1, -(2**70)))


def test_conv_transpose_stride_beyond_int64():
    with pytest.raises(ValueError, match=r"stride must lie in \(-2\*\*63, 2\*\*63\)"):
        F.conv_transpose(X, W, stride=(2**64, 1))


@pytest.mark.parametrize("op,dy_size", [(F.conv_backward, 3), (F.conv_transpose_backward, 7)])
def test_has_bias_must_be_a_bool(op, dy_size):
    dy = np.zeros((1, 1, dy_size, dy_size), np.float32)
    with pytest.raises(TypeError, match=r"has_bias must be a bool, but got str: has_bias='no'$"):
        op(dy, X, W, has_bias="no")
    assert op(dy, X, W, has_bias=np.bool_(True))[2].shape == (1,)


def test_save_safetensors_arguments(tmp_path):
    state = {"w": W}
    with pytest.raises(TypeError, match=r"state dict keys must be str, but got int: 1$"):
        layouts.save_safetensors({1: W}, tmp_path / "a.safetensors")
    with pytest.raises(TypeError, match=r"path must be a str or os.PathLike, but got int: path=123$"):
        layouts.save_safetensors(state, 123)
    with pytest.raises(TypeError, match=r"metadata must map str to str \(or be None\), but got "
                                        r"str: metadata='x'$"):  # fmt: skip
        layouts.save_safetensors(state, tmp_path / "a.safetensors", metadata="x")
    with pytest.raises(TypeError, match=r"but got dict: metadata=\{'k': 1\}$"):
        layouts.save_safetensors(state, tmp_path / "a.safetensors", metadata={"k": 1})
    assert not (tmp_path / "a.safetensors").exists()


def test_load_into_strict_must_be_a_bool(tmp_path):
    model = nn.Conv2d(1, 1, 3)
    layouts.save_safetensors(model, tmp_path / "m.safetensors")
    with pytest.raises(TypeError, match=r"strict must be a bool, but got str: strict='yes'$"):
        layouts.load_into(model, tmp_path / "m.safetensors", strict="yes")


def test_shard_range_without_a_communicator():
    with pytest.raises(TypeError, match=r"comm must be a communicator .* unless rank= and size= "
                                        r"are both given, but got comm=None$"):  # fmt: skip
        shard_range(4)
    assert shard_range(4, rank=1, size=2) == range(2, 4)
