"""Bad input: each case checks the exception type and that the message names the argument
and what was received."""

import re

import numpy as np
import pytest
import torch

from mconv import functional as F, losses, nn, optim

X = np.zeros((1, 2, 5, 5))
W = np.zeros((4, 2, 3, 3))
XT = np.zeros((1, 16, 6, 6))
WT = np.zeros((16, 16, 3, 3))
DY = np.zeros((1, 4, 3, 3))

CASES = [
    # (id, call, exception, message pattern)
    (
        "input-list",
        lambda: F.conv2d(X.tolist(), W),
        TypeError,
        r"input must be an ndarray .* got list",
    ),
    ("input-int", lambda: F.conv2d(X.astype(np.int64), W), TypeError, r"input\.dtype=int64"),
    (
        "dtype-mix",
        lambda: F.conv2d(X, W.astype(np.float32)),
        TypeError,
        r"input, weight must have the same dtype, but got input\.dtype=float64, weight\.dtype=float32",
    ),
    (
        "input-rank",
        lambda: F.conv2d(np.zeros((2, 3)), W),
        ValueError,
        r"Expected 3D \(unbatched\) or 4D \(batched\) input to conv2d, but got input of size: \[2, 3\]",
    ),
    (
        "weight-rank",
        lambda: F.conv2d(X, np.zeros((4, 2, 3))),
        ValueError,
        r"conv2d expects a 4-D weight .* got weight of size \[4, 2, 3\]",
    ),
    (
        "weight-rank-generic",
        lambda: F.conv(X, np.zeros((4, 2))),
        ValueError,
        r"weight must have at least 3 dimensions .* got weight of size \[4, 2\]",
    ),
    (
        "weight-empty",
        lambda: F.conv(X, np.zeros((4, 2, 0, 3))),
        ValueError,
        r"weight must not have empty dimensions, but got weight of size \[4, 2, 0, 3\]",
    ),
    (
        "channels",
        lambda: F.conv2d(X, np.zeros((4, 3, 3, 3))),
        ValueError,
        r"expected input\[1, 2, 5, 5\] to have 3 channels, but got 2 channels instead",
    ),
    (
        "groups-divide",
        lambda: F.conv2d(X, np.zeros((3, 1, 3, 3)), groups=2),
        ValueError,
        r"Given groups=2, expected weight to be divisible by 2 at dimension 0, but got weight of size \[3, 1, 3, 3\]",
    ),
    (
        "groups-zero",
        lambda: F.conv2d(X, W, groups=0),
        ValueError,
        r"groups must be >= 1, but got groups=0",
    ),
    (
        "groups-float",
        lambda: F.conv2d(X, W, groups=1.0),
        TypeError,
        r"groups must be an int, .* groups=1\.0",
    ),
    (
        "stride-zero",
        lambda: F.conv2d(X, W, stride=0),
        ValueError,
        r"stride must be positive .* stride=0",
    ),
    (
        "stride-len",
        lambda: F.conv2d(X, W, stride=(1, 2, 3)),
        ValueError,
        r"stride must be an int or a sequence of 2 ints .* stride=\(1, 2, 3\)",
    ),
    (
        "stride-type",
        lambda: F.conv2d(X, W, stride="2"),
        TypeError,
        r"stride must be an int .* stride='2'",
    ),
    ("dilation-zero", lambda: F.conv2d(X, W, dilation=(1, 0)), ValueError, r"dilation=\(1, 0\)"),
    (
        "padding-negative-with-a-mode",
        lambda: F.conv2d(X, W, padding=-1, padding_mode="reflect"),
        ValueError,
        r"negative padding \(a crop\) needs padding_mode='zeros', but got padding_mode='reflect'",
    ),
    (
        "crop-leaves-nothing",
        lambda: F.conv2d(X, W, padding=((-3, -2), 1)),
        ValueError,
        r"must leave some of the conv input, but got padding \(-3, -2\) for spatial dimension 0 "
        r"of size 5",
    ),
    (
        "crop-below-the-kernel",
        lambda: F.conv2d(X, W, padding=((-2, -1), 0)),
        ValueError,
        r"Calculated padded input size per channel: \(2 x 5\)",
    ),
    (
        "padding-string",
        lambda: F.conv2d(X, W, padding="full"),
        ValueError,
        r"padding must be one of \('same', 'same_lower', 'valid'\), but got padding='full'",
    ),
    (
        "padding-pair",
        lambda: F.conv2d(X, W, padding=((1, 2, 3), 0)),
        TypeError,
        r"\(before, after\) pairs .* got \(1, 2, 3\)",
    ),
    (
        "padding-count",
        lambda: F.conv2d(X, W, padding=((1, 1),)),
        ValueError,
        r"padding must have one entry per spatial dimension \(2\), but got 1",
    ),
    (
        "pad-negative",
        lambda: F.pad(X, ((0, 0), (-1, 0)), "zeros"),
        ValueError,
        r"negative padding is not supported, but got pads=",
    ),
    (
        "padding-mode",
        lambda: F.conv2d(X, W, padding_mode="mirror"),
        ValueError,
        r"padding_mode must be one of .* got padding_mode='mirror'",
    ),
    ("conv-mode", lambda: F.conv2d(X, W, conv_mode="conv"), ValueError, r"conv_mode='conv'"),
    (
        "compute-mode",
        lambda: F.conv2d(X, W, compute_mode="fp32"),
        ValueError,
        r"compute_mode='fp32'",
    ),
    (
        "reflect-limit",
        lambda: F.conv2d(X, W, padding=5, padding_mode="reflect"),
        ValueError,
        r"padding_mode='reflect' needs padding < input size .* got padding \(5, 5\)",
    ),
    (
        "circular-limit",
        lambda: F.conv2d(X, W, padding=6, padding_mode="circular"),
        ValueError,
        r"padding_mode='circular' needs padding <= input size .* got padding \(6, 6\)",
    ),
    (
        "kernel-too-big",
        lambda: F.conv2d(np.zeros((1, 2, 2, 2)), W),
        ValueError,
        r"Calculated padded input size per channel: \(2 x 2\)\. Kernel size: \(3 x 3\)\. Kernel size can't be greater than actual input size",
    ),
    (
        "bias-shape",
        lambda: F.conv2d(X, W, np.zeros(5)),
        ValueError,
        r"expected bias to be 1-dimensional with 4 elements, but got bias of size \[5\] instead",
    ),
    (
        "output-padding",
        lambda: F.conv_transpose2d(XT, WT, stride=2, output_padding=2),
        ValueError,
        r"output padding must be smaller than either stride or dilation, but got output_padding=\(2, 2\)",
    ),
    (
        "output-size-range",
        lambda: F.conv_transpose2d(XT, WT, stride=2, padding=1, output_size=(13, 13)),
        ValueError,
        r"requested an output size of \[13, 13\], but valid sizes range from \[11, 11\] to \[12, 12\] \(for an input of \[6, 6\]\)",
    ),
    (
        "output-size-len",
        lambda: F.conv_transpose2d(XT, WT, output_size=(16, 12, 12)),
        ValueError,
        r"output_size must have 2 or 4 elements \(got 3\)",
    ),
    (
        "output-size-type",
        lambda: F.conv_transpose2d(XT, WT, output_size=12),
        TypeError,
        r"output_size=12",
    ),
    (
        "transpose-mode",
        lambda: F.conv_transpose2d(XT, WT, padding_mode="reflect"),
        ValueError,
        r'Only "zeros" padding mode is supported for ConvTranspose2d, but got padding_mode=\'reflect\'',
    ),
    (
        "transpose-same-and-output-size",
        lambda: F.conv_transpose2d(XT, WT, padding="same", output_size=(12, 12)),
        ValueError,
        r"output_size cannot be combined with padding='same' .* got output_size=\(12, 12\)",
    ),
    (
        "has-bias-not-a-bool",
        lambda: F.conv_backward(DY, X, W, has_bias="no"),
        TypeError,
        r"has_bias must be a bool, but got str: has_bias='no'",
    ),
    (
        "transpose-channels",
        lambda: F.conv_transpose2d(X, WT),
        ValueError,
        r"Given transposed=1, weight of size \[16, 16, 3, 3\], expected input\[1, 2, 5, 5\] to have 16 channels, but got 2 channels instead",
    ),
    (
        "transpose-too-small",
        lambda: F.conv_transpose1d(np.zeros((1, 1, 1)), np.zeros((1, 1, 1)), padding=1),
        ValueError,
        r"Calculated output size per channel: \(-1\)\. Output size is too small",
    ),
    (
        "grad-shape",
        lambda: F.conv_backward(np.zeros((1, 4, 2, 2)), X, W, has_bias=False),
        ValueError,
        r"expected grad_output of size \[1, 4, 3, 3\], but got grad_output of size \[1, 4, 2, 2\]",
    ),
    (
        "grad-dtype",
        lambda: F.conv_backward(DY.astype(np.float32), X, W, has_bias=False),
        TypeError,
        r"grad_output must have dtype float64, but got grad_output\.dtype=float32",
    ),
    (
        "jvp-shape",
        lambda: F.conv_jvp(X, W, None, np.zeros((1, 2, 5, 4)), None, None),
        ValueError,
        r"expected dx of size \[1, 2, 5, 5\], but got dx of size \[1, 2, 5, 4\]",
    ),
    (
        "pad-reflect",
        lambda: F.pad(np.zeros((2, 3)), [(3, 0)], "reflect"),
        ValueError,
        r"mode='reflect' needs every pad < the size of its axis, but got pads=\[\(3, 0\)\]",
    ),
    (
        "pad-too-many",
        lambda: F.pad(np.zeros(3), [1, 1], "zeros"),
        ValueError,
        r"pads has 2 entries but input has only 1 axes",
    ),
    (
        "pad-type",
        lambda: F.pad(np.zeros(3), 1, "zeros"),
        TypeError,
        r"pads must be a non-empty sequence .* pads=1",
    ),
    # layers
    (
        "layer-in-groups",
        lambda: nn.Conv2d(3, 4, 3, groups=2),
        ValueError,
        r"in_channels must be divisible by groups, but got in_channels=3, groups=2",
    ),
    (
        "layer-out-groups",
        lambda: nn.Conv2d(4, 3, 3, groups=2),
        ValueError,
        r"out_channels must be divisible by groups, but got out_channels=3, groups=2",
    ),
    (
        "layer-kernel",
        lambda: nn.Conv2d(1, 1, 0),
        ValueError,
        r"kernel_size must be positive .* kernel_size=0",
    ),
    (
        "layer-channels",
        lambda: nn.Conv2d(0, 1, 3),
        ValueError,
        r"in_channels must be >= 1, but got in_channels=0",
    ),
    ("layer-dtype", lambda: nn.Conv2d(1, 1, 3, dtype="int32"), ValueError, r"dtype='int32'"),
    (
        "layer-device",
        lambda: nn.Conv2d(1, 1, 3, device="tpu:0"),
        ValueError,
        r"device must be 'cpu', 'cuda' or 'cuda:<index>', but got device='tpu:0'",
    ),
    (
        "layer-bias",
        lambda: nn.Conv2d(1, 1, 3, bias="yes"),
        TypeError,
        r"bias must be a bool, but got bias='yes'",
    ),
    (
        "layer-transpose-mode",
        lambda: nn.ConvTranspose2d(1, 1, 3, padding_mode="circular"),
        ValueError,
        r'Only "zeros" padding mode is supported for ConvTranspose2d',
    ),
    (
        "tripy-kernel",
        lambda: nn.Conv(1, 1, 3),
        TypeError,
        r"kernel_dims must be a non-empty sequence of ints, but got kernel_dims=3",
    ),
    ("layer-input-dtype", lambda: nn.Conv2d(2, 4, 3)(X), TypeError, r"weight\.dtype=float32"),
    (
        "layer-backward-first",
        lambda: nn.Conv2d(2, 4, 3).backward(DY),
        RuntimeError,
        r"Conv2d\.backward\(\) called before forward\(\)",
    ),
    (
        "linear-input",
        lambda: nn.Linear(3, 2)(np.zeros((4, 2), np.float32)),
        ValueError,
        r"expected input with last dimension 3, but got input of size \[4, 2\]",
    ),
    (
        "cross-entropy-target",
        lambda: losses.cross_entropy(np.zeros((2, 3)), np.array([0, 3])),
        ValueError,
        r"target values must lie in \[0, 3\), but got values in \[0, 3\]",
    ),
    ("sgd-lr", lambda: optim.SGD([nn.Parameter(np.zeros(1))], lr=-1.0), ValueError, r"lr=-1\.0"),
    (
        "adam-betas",
        lambda: optim.Adam([nn.Parameter(np.zeros(1))], betas=(0.9, 1.0)),
        ValueError,
        r"beta2=1\.0",
    ),
]


@pytest.mark.parametrize(
    "call,exception,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_refused_with_a_clear_message(call, exception, pattern):
    with pytest.raises(exception, match=pattern):
        call()


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (
            lambda: F.conv2d(X, np.zeros((4, 3, 3, 3))),
            lambda: torch.nn.functional.conv2d(torch.zeros(1, 2, 5, 5), torch.zeros(4, 3, 3, 3)),
        ),
        (
            lambda: F.conv2d(np.zeros((1, 2, 2, 2)), W),
            lambda: torch.nn.functional.conv2d(torch.zeros(1, 2, 2, 2), torch.zeros(4, 2, 3, 3)),
        ),
        (
            lambda: nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1)(
                XT.astype(np.float32), output_size=(13, 13)
            ),
            lambda: torch.nn.ConvTranspose2d(16, 16, 3, stride=2, padding=1)(
                torch.zeros(1, 16, 6, 6), output_size=[13, 13]
            ),
        ),
    ],
)
def test_messages_use_pytorch_wording(ours, theirs):
    with pytest.raises(Exception) as reference:
        theirs()
    # torch prints its own Size type after "(for an input of"; the wording before it must match
    wording = str(reference.value).strip().splitlines()[0].split(" (for an input of")[0]
    with pytest.raises(ValueError, match=re.escape(wording)):
        ours()


def test_unknown_keyword_is_refused():
    with pytest.raises(
        TypeError, match=r"conv_backward\(\) got an unexpected keyword argument 'strides'"
    ):
        F.conv_backward(DY, X, W, has_bias=False, strides=2)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'output_padding'"):
        F.conv_jvp(X, W, None, None, None, None, output_padding=1)


class _FakeCupyArray:
    """Looks like a CuPy array on GPU 0 to mconv's device checks (module name 'cupy...')."""

    __module__ = "cupy._core.core"

    def __init__(self, like):
        self.shape, self.dtype, self.ndim = like.shape, like.dtype, like.ndim
        self.device = type("Device", (), {"id": 0})()


def test_arrays_on_different_devices_are_refused():
    with pytest.raises(
        ValueError,
        match=r"input, weight must be on one device, but got input on cpu, weight on cuda:0",
    ):
        F.conv2d(X, _FakeCupyArray(W))
    with pytest.raises(
        ValueError, match=r"grad_output must be on cpu, but got grad_output on cuda:0"
    ):
        F.conv_backward(_FakeCupyArray(DY), X, W, has_bias=False)


def test_absurd_sizes_end_in_memory_error_before_allocating():
    x, w = np.zeros((1, 1, 3)), np.zeros((1, 1, 3))
    with pytest.raises(
        MemoryError, match=r"needs about .* GiB of buffers .* but only .* GiB of memory is free"
    ):
        F.conv1d(x, w, padding=10**12)
    with pytest.raises(MemoryError, match=r"GiB of memory is free"):
        F.conv_transpose1d(x, w, stride=10**12)
