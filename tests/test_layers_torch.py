"""BatchNorm, activations, dropout, adaptive and dilated/ceil-mode pools and the skip
containers against PyTorch float64: forward, input gradient, parameter gradients, running
statistics, state_dict keys, train/eval."""

import copy

import numpy as np
import pytest
import torch
from reference import assert_close

from mconv import nn


def _torch_run(module, x, dy):
    """(y, dx, {name: grad}) from torch autograd."""
    tx = torch.tensor(x, requires_grad=True)
    y = module(tx)
    y.backward(torch.tensor(dy))
    grads = {n: p.grad.numpy() for n, p in module.named_parameters() if p.grad is not None}
    return y.detach().numpy(), tx.grad.numpy(), grads


def _ours(module, x, dy):
    y = module(x)
    dx = module.backward(dy)
    return y, dx, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _copy_state(theirs, ours):
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})


@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (6, 3)), ("BatchNorm1d", (4, 3, 5)),
                                       ("BatchNorm2d", (3, 3, 4, 5)), ("BatchNorm3d", (2, 3, 2, 3, 4))])  # fmt: skip
@pytest.mark.parametrize("momentum", [0.1, None, 0.7])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False)])
def test_batch_norm_matches_torch(cls, shape, momentum, affine, track):
    rng = np.random.default_rng(1)
    theirs = getattr(torch.nn, cls)(3, momentum=momentum, affine=affine,
                                    track_running_stats=track).double()  # fmt: skip
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5), theirs.bias.uniform_(-0.5, 0.5)
    ours = getattr(nn, cls)(3, momentum=momentum, affine=affine, track_running_stats=track,
                            dtype="float64")  # fmt: skip
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _copy_state(theirs, ours)
    for step in range(3):  # training: batch statistics, running statistics updated
        x = rng.standard_normal(shape) * 2 + step
        dy = rng.standard_normal(shape)
        want, got = _torch_run(theirs, x, dy), _ours(ours, x, dy)
        for a, b in zip(got[:2], want[:2]):
            assert_close(a, b)
        for name, grad in want[2].items():
            assert_close(got[2][name], grad)
        ours.zero_grad(), theirs.zero_grad()
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value.numpy())
    theirs.eval(), ours.eval()  # eval: the running statistics (when tracked)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    want, got = _torch_run(theirs, x, dy), _ours(ours, x, dy)
    for a, b in zip(got[:2], want[:2]):
        assert_close(a, b)
    for name, grad in want[2].items():
        assert_close(got[2][name], grad)


def test_batch_norm_fp16_accumulates_in_fp32():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 4, 8, 8)) * 3 + 100).astype(np.float16)
    ours = nn.BatchNorm2d(4, dtype="float16")
    y = ours(x)
    assert y.dtype == np.float16 and ours.running_mean.dtype == np.float16
    exact = nn.BatchNorm2d(4, dtype="float64")(x.astype(np.float64))
    assert np.abs(y.astype(np.float64) - exact).max() <= 2e-3 * np.abs(exact).max()


def test_batch_norm_errors():
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bn(np.zeros((3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"Expected more than 1 value per channel when training"):
        bn(np.zeros((1, 3, 1, 1), np.float32))
    with pytest.raises(ValueError, match=r"expected input with 3 channels"):
        bn(np.zeros((2, 4, 2, 2), np.float32))
    with pytest.raises(TypeError, match=r"momentum must be a number, but got str"):
        nn.BatchNorm1d(3, momentum="0.1")
    with pytest.raises(ValueError, match=r"eps must be a finite positive number"):
        nn.BatchNorm1d(3, eps=0)
    bn.eval()
    assert bn(np.zeros((1, 3, 1, 1), np.float32)).shape == (1, 3, 1, 1)


ACTIVATIONS = [
    ("ReLU", {}), ("ReLU6", {}), ("LeakyReLU", {"negative_slope": 0.2}), ("SiLU", {}),
    ("GELU", {}), ("GELU", {"approximate": "tanh"}), ("Sigmoid", {}), ("Tanh", {}),
    ("Hardswish", {}), ("Hardsigmoid", {}), ("Identity", {}), ("Softmax", {"dim": 1}),
    ("Softmax", {"dim": -1}),
]  # fmt: skip


@pytest.mark.parametrize("name,kw", ACTIVATIONS)
def test_activations_match_torch(name, kw):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(200) * 4, [-6, -3, 0, 3, 6, 0.5, 40, -40]])
    x = x.reshape(2, 4, -1)
    dy = rng.standard_normal(x.shape)
    want = _torch_run(getattr(torch.nn, name)(**kw), x, dy)
    got = _ours(getattr(nn, name)(**kw), x, dy)
    assert_close(got[0], want[0], 1e-12)
    assert_close(got[1], want[1], 1e-12)


@pytest.mark.parametrize("num,shape", [(1, (2, 3, 4)), (3, (2, 3, 4)), (3, (4, 3)), (1, (3,)),
                                       (1, ())])  # fmt: skip
def test_prelu_matches_torch(num, shape):
    rng = np.random.default_rng(4)
    theirs = torch.nn.PReLU(num, init=0.3).double()
    with torch.no_grad():
        theirs.weight.uniform_(0.1, 0.5)
    ours = nn.PReLU(num, init=0.3, dtype="float64")
    _copy_state(theirs, ours)
    x, dy = rng.standard_normal(shape), rng.standard_normal(shape)
    want, got = _torch_run(theirs, x, dy), _ours(ours, x, dy)
    for a, b in zip(got[:2], want[:2]):
        assert_close(a, b, 1e-12)
    assert_close(got[2]["weight"], want[2]["weight"], 1e-12)


def test_prelu_needs_its_channels():
    with pytest.raises(ValueError, match=r"expected input with 3 channels on axis 1, but got "
                                         r"input of size \[3\]"):  # fmt: skip
        nn.PReLU(3)(np.ones(3, np.float32))


@pytest.mark.parametrize("cls,shape", [("Dropout", (50, 40)), ("Dropout2d", (20, 30, 3, 3))])
def test_dropout_is_seeded_scaled_and_off_in_eval(cls, shape):
    x = np.ones(shape)
    drop = getattr(nn, cls)(0.3)
    nn.manual_seed(5)
    y = drop(x)
    nn.manual_seed(5)
    np.testing.assert_array_equal(drop(x), y)  # the same seed, the same mask
    assert set(np.unique(y)) <= {0.0, 1 / 0.7}
    assert abs((y == 0).mean() - 0.3) < 0.05
    if cls == "Dropout2d":  # whole channels
        assert all(len(np.unique(c)) == 1 for c in y.reshape(-1, 9))
    np.testing.assert_array_equal(drop.backward(np.ones(shape)), y)
    drop.eval()
    assert drop(x) is x and drop.backward(x) is x


@pytest.mark.parametrize("size", [1, 3, (2, 5), (None, 2)])
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (3, 6, 4)])
def test_adaptive_avg_pool_matches_torch(size, shape):
    rng = np.random.default_rng(6)
    x = rng.standard_normal(shape)
    theirs = torch.nn.AdaptiveAvgPool2d(size)
    y = theirs(torch.tensor(x)).numpy()
    dy = rng.standard_normal(y.shape)
    want, got = _torch_run(theirs, x, dy), _ours(nn.AdaptiveAvgPool2d(size), x, dy)
    assert_close(got[0], want[0], 1e-12)
    assert_close(got[1], want[1], 1e-12)


@pytest.mark.parametrize("kernel,stride,padding,dilation", [(2, 2, 0, 1), (3, 2, 1, 1),
                                                            (3, 2, 1, 2), (2, 3, 1, 2), (3, 3, 0, 1)])  # fmt: skip
@pytest.mark.parametrize("ceil", [False, True])
@pytest.mark.parametrize("shape", [(2, 3, 7, 8), (2, 3, 9, 5)])
def test_max_pool_ceil_mode_and_dilation_match_torch(
    kernel, stride, padding, dilation, ceil, shape
):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(shape)
    kw = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil)
    theirs = torch.nn.MaxPool2d(**kw)
    dy = rng.standard_normal(theirs(torch.tensor(x)).shape)
    want, got = _torch_run(theirs, x, dy), _ours(nn.MaxPool2d(**kw), x, dy)
    assert_close(got[0], want[0], 0)  # the same maxima
    assert_close(got[1], want[1], 1e-15)  # overlapping windows add in another order


def test_residual_and_concat_match_torch_composition():
    rng = np.random.default_rng(8)
    nn.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, dtype="float64"), nn.ReLU())
    shortcut = nn.Conv2d(4, 4, 1, dtype="float64")
    res = nn.Residual(copy.deepcopy(body), copy.deepcopy(shortcut))
    cat = nn.Concat(copy.deepcopy(body), nn.Identity(), dim=1)
    plain = nn.Residual(copy.deepcopy(body))
    assert list(res.state_dict()) == ["body.0.weight", "body.0.bias", "shortcut.weight",
                                      "shortcut.bias"]  # fmt: skip
    tb = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.ReLU()).double()
    ts = torch.nn.Conv2d(4, 4, 1).double()
    tb.load_state_dict({k: torch.tensor(v) for k, v in body.state_dict().items()})
    ts.load_state_dict({k: torch.tensor(v) for k, v in shortcut.state_dict().items()})
    x = rng.standard_normal((2, 4, 5, 5))
    for ours, theirs in [(res, lambda t: tb(t) + ts(t)), (plain, lambda t: tb(t) + t),
                         (cat, lambda t: torch.cat([tb(t), t], dim=1))]:  # fmt: skip
        tx = torch.tensor(x, requires_grad=True)
        ty = theirs(tx)
        dy = rng.standard_normal(ty.shape)
        ty.backward(torch.tensor(dy))
        assert_close(ours(x), ty.detach().numpy())
        assert_close(ours.backward(dy), tx.grad.numpy())
        tb.zero_grad(), ts.zero_grad()


@pytest.mark.parametrize("name,kw", ACTIVATIONS)
def test_activations_in_fp16_round_once(name, kw):
    """fp16 in, the fp32-computed value rounded once: within one fp16 spacing of the exact
    (torch float64) value on fp16 inputs, and its correctly rounded value almost always."""
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((4, 3, 50)) * 3).astype(np.float16)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    want = _torch_run(getattr(torch.nn, name)(**kw), x.astype(np.float64), dy.astype(np.float64))
    got = _ours(getattr(nn, name)(**kw), x, dy)
    for mine, exact, share in zip(got[:2], want[:2], (0.9, 0.9)):  # fp32 formulas (GELU, dx)
        assert mine.dtype == np.float16
        spacing = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(mine.astype(np.float64) - exact) <= spacing + 1e-6)
        assert np.mean(mine == exact.astype(np.float16)) > share


def test_batch_norm_fp16_gradients_against_torch_float64():
    rng = np.random.default_rng(10)
    x = (rng.standard_normal((8, 3, 6, 6)) * 2 + 3).astype(np.float16)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    theirs = torch.nn.BatchNorm2d(3).double()
    want = _torch_run(theirs, x.astype(np.float64), dy.astype(np.float64))
    ours = nn.BatchNorm2d(3, dtype="float16")
    got = _ours(ours, x, dy)
    for mine, exact in zip(got[:2], want[:2]):
        assert mine.dtype == np.float16
        assert np.abs(mine.astype(np.float64) - exact).max() <= 4e-3 * np.abs(exact).max()
    for key in ("running_mean", "running_var"):
        exact = getattr(theirs, key).numpy()
        assert (
            np.abs(ours.state_dict()[key].astype(np.float64) - exact).max()
            <= 2e-3 * np.abs(exact).max()
        )


@pytest.mark.parametrize(
    "make_ours,make_theirs",
    [
        (lambda: nn.AdaptiveAvgPool2d((2, 3)), lambda: torch.nn.AdaptiveAvgPool2d((2, 3))),
        (lambda: nn.PReLU(3, dtype="float16"), lambda: torch.nn.PReLU(3).double()),
        (lambda: nn.Softmax(dim=1), lambda: torch.nn.Softmax(dim=1)),
        (lambda: nn.Dropout(0.5).eval(), lambda: torch.nn.Dropout(0.5).eval()),
    ],
)
def test_more_layers_in_fp16_against_torch_float64(make_ours, make_theirs):
    """fp16 in, fp32 inside, one rounding out: within an fp16 spacing of the exact value."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 7, 5)).astype(np.float16)
    dy = rng.standard_normal(make_ours()(x).shape).astype(np.float16)
    theirs = make_theirs()
    if isinstance(theirs, torch.nn.PReLU):
        with torch.no_grad():
            theirs.weight.fill_(0.25)
    want = _torch_run(theirs, x.astype(np.float64), dy.astype(np.float64))
    got = _ours(make_ours(), x, dy)
    for mine, exact in zip(got[:2], want[:2]):
        assert mine.dtype == np.float16
        spacing = np.spacing(np.abs(exact).astype(np.float16)).astype(np.float64)
        assert np.all(np.abs(mine.astype(np.float64) - exact) <= spacing + 1e-6)


@pytest.fixture(params=["jit", "numpy"])
def jit_or_numpy(request):
    """Both ways the CPU computes BatchNorm's fma: numba's kernel, and NumPy in float64."""
    from mconv.backends import numpy_jit

    if request.param == "jit" and not numpy_jit.enabled():
        pytest.skip("numba is not installed")
    before = numpy_jit.switched_on()
    numpy_jit.set_enabled(request.param == "jit")
    yield request.param
    numpy_jit.set_enabled(before)


@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (4, 16, 9)), ("BatchNorm2d", (3, 16, 10, 7)),
                                       ("BatchNorm3d", (2, 16, 3, 4, 5))])  # fmt: skip
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_float32_equals_torch_bit_for_bit(cls, shape, affine, jit_or_numpy):
    """Eval outputs as torch's float32 CPU kernel, to the bit. Training: the batch sums
    are added in another order (torch: one float64 sum per channel), so a channel's mean or
    inv_std can round an ulp apart: outputs within 4 ulps, running statistics within 1,
    most channels equal. A mean far from 0 and channels of very different scales make the
    rounding of every step show."""
    rng = np.random.default_rng(7)
    theirs = getattr(torch.nn, cls)(16, affine=affine, dtype=torch.float32)
    ours = getattr(nn, cls)(16, affine=affine)
    scale = np.logspace(-3, 3, 16).reshape(1, -1, *(1,) * (len(shape) - 2))
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(-2, 2), theirs.bias.uniform_(-2, 2)
    with torch.no_grad():
        theirs.running_mean.uniform_(-5, 5), theirs.running_var.uniform_(0.1, 9)
    _copy_state(theirs, ours)
    for _ in range(2):
        x = ((rng.standard_normal(shape) + 3) * scale).astype(np.float32)
        with torch.no_grad():
            want = theirs(torch.from_numpy(x)).numpy()
        got = ours(x)
        np.testing.assert_array_max_ulp(got, want, 4)
        assert np.mean(got == want) > 0.8
        for key in ("running_mean", "running_var"):
            np.testing.assert_array_max_ulp(getattr(ours, key), getattr(theirs, key).numpy(), 1)
    theirs.eval(), ours.eval()
    _copy_state(theirs, ours)  # the same running statistics
    x = ((rng.standard_normal(shape) + 3) * scale).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(ours(x), theirs(torch.from_numpy(x)).numpy())


def _fma32(a: float, b: float, c: float) -> np.float32:
    """a * b + c rounded once to float32 (ties to even), from exact fractions."""
    from fractions import Fraction

    exact = Fraction(a) * Fraction(b) + Fraction(c)
    near = np.float32(float(exact))  # within an ulp: pick the nearest of it and its neighbours
    candidates = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]  # fmt: skip
    return min(
        candidates, key=lambda v: (abs(Fraction(float(v)) - exact), int(v.view(np.int32)) & 1)
    )


def test_channel_affine_rounds_once(jit_or_numpy):
    """fma(x, alpha[c], beta[c]) in float32 against exact arithmetic; products and sums that
    cancel, so that two roundings would differ."""
    from mconv.backends import numpy_elementwise

    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, 4, 50)).astype(np.float32)
    alpha = rng.standard_normal(4).astype(np.float32)
    beta = (-x[0, :, 0] * alpha).astype(np.float32)  # the first element of each plane cancels
    y = numpy_elementwise.channel_affine(x, alpha, beta)
    want = [_fma32(float(x[n, c, p]), float(alpha[c]), float(beta[c]))
            for n in range(3) for c in range(4) for p in range(50)]  # fmt: skip
    np.testing.assert_array_equal(y.reshape(-1), np.array(want, np.float32))
    half = numpy_elementwise.channel_affine(
        x.astype(np.float16), alpha, beta
    )  # float16: in float32
    assert half.dtype == np.float32


@pytest.mark.parametrize("name", ["ReLU", "ReLU6"])
def test_relus_pass_nan_and_negative_zero_as_torch_does(name, jit_or_numpy):
    x = np.array([-0.0, np.nan, -1.0, 2.0, 0.0, -np.inf, 6.0, 7.5, np.inf], np.float32)
    ours, theirs = getattr(nn, name)(), getattr(torch.nn, name)()
    want = theirs(torch.from_numpy(x)).numpy()
    y = ours(x)
    np.testing.assert_array_equal(y, want)
    assert np.array_equal(np.signbit(y), np.signbit(want))
    tx = torch.from_numpy(x).requires_grad_()
    theirs(tx).backward(torch.ones(x.size))
    np.testing.assert_array_equal(ours.backward(np.ones(x.size, np.float32)), tx.grad.numpy())
