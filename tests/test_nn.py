"""The Module system and layers, against torch.nn modules in float64."""

import math

import numpy as np
import pytest
import torch

from mconv import nn

from reference import assert_close


def _torch_twin(ours, theirs):
    """Copy our parameters into the torch module (same names, same layout)."""
    theirs.double()
    theirs.load_state_dict({k: torch.tensor(v) for k, v in ours.state_dict().items()})
    return theirs


def _run_both(ours, theirs, x, rng, **forward_kw):
    """Forward + backward through both; returns ((y, dx, grads), (y, dx, grads))."""
    y = ours(x, **forward_kw)
    dy = rng.standard_normal(y.shape)
    dx = ours.backward(dy)
    tx = torch.tensor(x, requires_grad=True)
    ty = theirs(tx, **forward_kw)
    ty.backward(torch.tensor(dy))
    ours_grads = {k: p.grad for k, p in ours.named_parameters()}
    their_grads = {k: p.grad.numpy() for k, p in theirs.named_parameters()}
    return (y, dx, ours_grads), (ty.detach().numpy(), tx.grad.numpy(), their_grads)


LAYERS = [
    (
        lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, dtype="float64"),
        lambda: torch.nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
        (2, 4, 9),
    ),
    (
        lambda: nn.Conv2d(
            3, 4, (3, 2), padding="same", dilation=2, padding_mode="reflect", dtype="float64"
        ),
        lambda: torch.nn.Conv2d(3, 4, (3, 2), padding="same", dilation=2, padding_mode="reflect"),
        (2, 3, 7, 6),
    ),
    (
        lambda: nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular", bias=False, dtype="float64"),
        lambda: torch.nn.Conv2d(3, 4, 3, padding=2, padding_mode="circular", bias=False),
        (3, 5, 5),
    ),
    (
        lambda: nn.Conv3d(
            2, 4, 2, stride=(1, 2, 1), padding=1, padding_mode="replicate", dtype="float64"
        ),
        lambda: torch.nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=1, padding_mode="replicate"),
        (1, 2, 4, 5, 3),
    ),
    (
        lambda: nn.ConvTranspose1d(
            4, 6, 3, stride=3, padding=1, output_padding=2, groups=2, dtype="float64"
        ),
        lambda: torch.nn.ConvTranspose1d(4, 6, 3, stride=3, padding=1, output_padding=2, groups=2),
        (2, 4, 5),
    ),
    (
        lambda: nn.ConvTranspose2d(3, 2, (2, 3), stride=2, dilation=(1, 2), dtype="float64"),
        lambda: torch.nn.ConvTranspose2d(3, 2, (2, 3), stride=2, dilation=(1, 2)),
        (2, 3, 4, 3),
    ),
    (
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, bias=False, dtype="float64"),
        lambda: torch.nn.ConvTranspose3d(2, 2, 2, stride=2, bias=False),
        (2, 3, 2, 3),
    ),
    (lambda: nn.Linear(5, 3, dtype="float64"), lambda: torch.nn.Linear(5, 3), (4, 2, 5)),
    (
        lambda: nn.MaxPool2d(3, stride=2, padding=1),
        lambda: torch.nn.MaxPool2d(3, stride=2, padding=1),
        (2, 3, 7, 6),
    ),
    (lambda: nn.AvgPool2d(2, padding=1), lambda: torch.nn.AvgPool2d(2, padding=1), (2, 3, 5, 6)),
    (lambda: nn.ReLU(), lambda: torch.nn.ReLU(), (2, 3, 4)),
    (lambda: nn.Flatten(), lambda: torch.nn.Flatten(), (2, 3, 4, 2)),
]


@pytest.mark.parametrize("make_ours,make_theirs,shape", LAYERS)
def test_layers_match_torch_modules(rng, make_ours, make_theirs, shape):
    ours = make_ours()
    theirs = _torch_twin(ours, make_theirs())
    x = rng.standard_normal(shape)
    (y, dx, grads), (ry, rdx, rgrads) = _run_both(ours, theirs, x, rng)
    assert_close(y, ry)
    assert_close(dx, rdx)
    assert grads.keys() == rgrads.keys()
    for name in grads:
        assert_close(grads[name], rgrads[name])


def test_global_avg_pool_matches_mean(rng):
    x = rng.standard_normal((2, 3, 4, 5))
    pool = nn.GlobalAvgPool()
    assert_close(pool(x), x.mean(axis=(2, 3)))
    tx = torch.tensor(x, requires_grad=True)
    dy = rng.standard_normal((2, 3))
    tx.mean(dim=(2, 3)).backward(torch.tensor(dy))
    assert_close(pool.backward(dy), tx.grad.numpy())


def test_backward_accumulates_and_zero_grad_clears(rng):
    conv = nn.Conv2d(2, 3, 3, dtype="float64")
    x = rng.standard_normal((1, 2, 5, 5))
    dy = rng.standard_normal((1, 3, 3, 3))
    conv(x)
    conv.backward(dy)
    first = conv.weight.grad.copy()
    conv(x)
    conv.backward(dy)
    assert_close(conv.weight.grad, 2 * first)
    conv.zero_grad()
    assert conv.weight.grad is None and conv.bias.grad is None


def test_default_init_is_pytorch_kaiming_uniform():
    nn.manual_seed(0)
    conv = nn.Conv2d(64, 32, 3, groups=4)
    bound = 1 / math.sqrt(16 * 9)  # fan_in = in_channels / groups * prod(k)
    for p in (conv.weight.data, conv.bias.data):
        assert p.dtype == np.float32 and np.abs(p).max() <= bound
    assert abs(conv.weight.data.std() - bound / math.sqrt(3)) < 0.02 * bound
    up = nn.ConvTranspose2d(8, 6, 3, groups=2)
    assert up.weight.shape == (8, 3, 3, 3)
    assert np.abs(up.weight.data).max() <= 1 / math.sqrt(3 * 9)  # PyTorch: fan_in from dim 1
    nn.manual_seed(0)
    assert np.array_equal(nn.Conv2d(64, 32, 3, groups=4).weight.data, conv.weight.data)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (
            lambda: nn.Conv2d(16, 33, (3, 5), stride=(2, 1), padding=(4, 2), dilation=(3, 1)),
            lambda: torch.nn.Conv2d(16, 33, (3, 5), stride=(2, 1), padding=(4, 2), dilation=(3, 1)),
        ),
        (
            lambda: nn.Conv1d(
                4, 4, 3, padding="same", groups=4, bias=False, padding_mode="reflect"
            ),
            lambda: torch.nn.Conv1d(
                4, 4, 3, padding="same", groups=4, bias=False, padding_mode="reflect"
            ),
        ),
        (
            lambda: nn.ConvTranspose3d(2, 4, 3, stride=2, output_padding=1),
            lambda: torch.nn.ConvTranspose3d(2, 4, 3, stride=2, output_padding=1),
        ),
        (
            lambda: nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
            lambda: torch.nn.Sequential(
                torch.nn.Conv2d(1, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(8, 2)
            ),
        ),
    ],
)
def test_repr_and_state_dict_names_match_torch(ours, theirs):
    ours, theirs = ours(), theirs()
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }


def test_our_extra_options_show_in_repr():
    conv = nn.Conv2d(
        2, 2, 3, padding=((1, 0), (0, 1)), conv_mode="convolution", compute_mode="float32"
    )
    assert repr(conv) == (
        "Conv2d(2, 2, kernel_size=(3, 3), stride=(1, 1), padding=((1, 0), (0, 1)), "
        "conv_mode=convolution, compute_mode=float32)"
    )


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        self.head = nn.Linear(2, 2)
        self.scale = nn.Parameter(np.ones(1, dtype=np.float32))


def test_module_traversal():
    net = _Net()
    assert [n for n, _ in net.named_children()] == ["features", "head"]
    assert [n for n, _ in net.named_modules()] == [
        "",
        "features",
        "features.0",
        "features.1",
        "head",
    ]
    assert [n for n, _ in net.named_parameters()] == [
        "scale",
        "features.0.weight",
        "features.0.bias",
        "head.weight",
        "head.bias",
    ]
    assert len(list(net.parameters())) == 5 and len(list(net.modules())) == 5
    assert [n for n, _ in net.named_parameters(recurse=False)] == ["scale"]


def test_shared_parameter_is_listed_once_but_saved_under_each_name():
    net = _Net()
    net.head2 = net.head
    assert len(list(net.parameters())) == 5
    assert "head2.weight" not in dict(net.named_parameters())
    assert {"head.weight", "head2.weight"} <= set(net.state_dict())


def test_load_state_dict_strict_and_lenient():
    net, other = _Net(), _Net()
    result = net.load_state_dict(other.state_dict())
    assert result == ([], []) and result.missing_keys == [] and result.unexpected_keys == []
    assert np.array_equal(net.head.weight.data, other.head.weight.data)

    partial = dict(other.state_dict())
    del partial["head.bias"]
    partial["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match=r'Missing key\(s\) in state_dict: "head.bias"'):
        net.load_state_dict(partial)
    with pytest.raises(ValueError, match=r'Unexpected key\(s\) in state_dict: "extra"'):
        net.load_state_dict(partial)
    missing, unexpected = net.load_state_dict(partial, strict=False)
    assert (missing, unexpected) == (["head.bias"], ["extra"])


def test_load_state_dict_shape_mismatch_changes_nothing():
    net = _Net()
    before = {k: v.copy() for k, v in net.state_dict().items()}
    bad = {k: np.full(v.shape, 7.0, v.dtype) for k, v in net.state_dict().items()}
    bad["head.weight"] = np.zeros((3, 2), np.float32)
    with pytest.raises(
        ValueError,
        match=r"size mismatch for head.weight: copying a param with shape "
        r"\[3, 2\] from checkpoint, the shape in current model is \[2, 2\]",
    ):
        net.load_state_dict(bad, strict=False)
    for name, value in net.state_dict().items():
        assert np.array_equal(value, before[name]), name
    with pytest.raises(TypeError, match=r"state_dict\['scale'\] must be an ndarray, but got list"):
        net.load_state_dict({**before, "scale": [1.0]})
    with pytest.raises(TypeError, match="state_dict must be a mapping"):
        net.load_state_dict([1, 2])


def test_to_train_eval():
    net = _Net()
    assert net.training and net.features[0].training
    net.eval()
    assert not net.training and not net.features[1].training
    net.train()
    assert net.head.training
    net.to("float64")
    assert all(p.dtype == np.float64 for p in net.parameters())
    assert net.features[0](np.zeros((1, 1, 4, 4))).dtype == np.float64
    assert net.to("cpu") is net
    with pytest.raises(ValueError, match="got device='cuda:99'"):  # no CuPy, or no 100th GPU
        net.to("cuda:99")


def test_attribute_registration_rules():
    net = _Net()
    with pytest.raises(TypeError, match="cannot assign ndarray to 'scale'"):
        net.scale = np.zeros(1)
    conv = nn.Conv2d(1, 1, 1, bias=False)
    assert conv.bias is None and "bias" not in conv.state_dict()
    del net.head
    assert "head.weight" not in net.state_dict()


def test_unbatched_layer_forward_and_backward(rng):
    conv = nn.Conv(2, 3, (3, 3), padding=((1, 1), (0, 2)), dtype="float64")
    x = rng.standard_normal((2, 5, 5))
    y = conv(x)
    assert y.shape == (3, 5, 5)
    assert conv.backward(np.ones_like(y)).shape == x.shape


def test_tripy_conv_transpose_with_padding_pairs(rng):
    layer = nn.ConvTranspose(2, 3, (3, 2), padding=((1, 0), (0, 1)), stride=(2, 1), dtype="float64")
    y = layer(rng.standard_normal((1, 2, 4, 3)))
    assert y.shape == (1, 3, (4 - 1) * 2 - 1 + 3, (3 - 1) - 1 + 2)


@pytest.mark.parametrize(
    "layer", [nn.MaxPool2d(2), nn.AvgPool2d(2), nn.GlobalAvgPool(), nn.ReLU(), nn.Flatten()]
)
def test_layers_take_an_empty_batch(layer):
    x = np.zeros((0, 3, 4, 4), dtype=np.float32)
    y = layer(x)
    assert y.shape[0] == 0
    assert layer.backward(np.zeros_like(y)).shape == x.shape
