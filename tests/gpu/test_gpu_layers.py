"""Every layer, loss and optimizer that claims device support, on the GPU against the same
module on the CPU: forward, input gradient, parameter gradients and an optimizer step.

On a real GPU with ``pytest tests/gpu``; in CI on the strict CuPy stand-in
(tests/kernels/test_gpu_suite_on_stand_in.py), which refuses any NumPy array that
reaches device code.
"""

import copy

import gpu_env
import numpy as np
import pytest

from mconv import functional as F
from mconv import losses, nn, optim

pytestmark = gpu_env.requires_gpu

LAYERS = [
    (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1, padding_mode="circular"), (2, 3, 9)),
    (lambda: nn.Conv2d(4, 6, 3, groups=2, dilation=2, padding="same"), (2, 4, 7, 6)),
    (
        lambda: nn.Conv3d(2, 4, 2, conv_mode="convolution", padding_mode="replicate", padding=1),
        (1, 2, 4, 5, 3),
    ),  # fmt: skip
    (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2, output_padding=1), (2, 3, 5)),
    (lambda: nn.ConvTranspose2d(4, 4, 3, stride=2, groups=4, padding=1), (2, 4, 4, 5)),
    (lambda: nn.ConvTranspose3d(2, 2, 2, stride=(1, 2, 1)), (1, 2, 3, 3, 2)),
    (lambda: nn.Conv(2, 3, (3, 3), padding=((1, 1), (0, 2))), (2, 2, 5, 5)),
    (lambda: nn.ConvTranspose(2, 3, (2, 2), stride=(2, 2)), (2, 2, 3, 4)),
    (lambda: nn.Linear(5, 3), (4, 2, 5)),
    (lambda: nn.ReLU(), (3, 4, 5)),
    (lambda: nn.Flatten(), (2, 3, 4)),
    (lambda: nn.GlobalAvgPool(), (2, 3, 4, 5)),
    (lambda: nn.AvgPool1d(3, stride=2, padding=1), (2, 3, 9)),
    (lambda: nn.AvgPool2d(2), (2, 3, 6, 4)),
    (lambda: nn.AvgPool3d(2, stride=1), (1, 2, 3, 4, 3)),
    (lambda: nn.MaxPool1d(3, stride=2, padding=1), (2, 3, 9)),
    (lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 3, 7, 6)),
    (lambda: nn.MaxPool3d(2), (1, 2, 4, 4, 2)),
    (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 2)
        ),
        (2, 3, 6, 6),
    ),  # fmt: skip
    (lambda: nn.BatchNorm1d(3, momentum=None), (4, 3, 5)),
    (lambda: nn.BatchNorm2d(3), (2, 3, 4, 5)),
    (lambda: nn.BatchNorm3d(2, affine=False), (2, 2, 3, 2, 2)),
    (lambda: nn.BatchNorm2d(3).eval(), (2, 3, 4, 5)),
    (lambda: nn.PReLU(3), (2, 3, 4)),
    (
        lambda: nn.Sequential(
            nn.ReLU6(),
            nn.LeakyReLU(0.1),
            nn.SiLU(),
            nn.GELU(),
            nn.Sigmoid(),
            nn.Tanh(),
            nn.Hardswish(),
            nn.Hardsigmoid(),
            nn.Identity(),
            nn.GELU("tanh"),
        ),
        (2, 3, 4),
    ),  # fmt: skip
    (lambda: nn.Dropout(0.3).eval(), (2, 3)),
    (lambda: nn.AdaptiveAvgPool2d((2, 3)), (2, 3, 7, 5)),
    (lambda: nn.MaxPool2d(3, stride=2, padding=1, dilation=2, ceil_mode=True), (2, 3, 9, 8)),
    (
        lambda: nn.Residual(
            nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)), nn.Conv2d(3, 3, 1)
        ),
        (2, 3, 5, 5),
    ),  # fmt: skip
    (lambda: nn.Concat(nn.Conv1d(3, 2, 1), nn.Identity()), (2, 3, 4)),
]


def cupy():
    import cupy as cp

    return cp


def _host(a):
    return cupy().asnumpy(a)


@pytest.mark.parametrize("make,shape", LAYERS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_layer_on_the_gpu_matches_the_cpu(make, shape, dtype):
    cp, rng = cupy(), np.random.default_rng(3)
    nn.init.manual_seed(0)
    cpu = make().to(dtype)
    gpu = copy.deepcopy(cpu).to("cuda")
    x = rng.standard_normal(shape).astype(dtype)
    x[..., 0] = x[..., 1]  # ties for the max pools
    y = cpu(x)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = cpu.backward(dy)
    got_y = gpu(cp.asarray(x))
    got_dx = gpu.backward(cp.asarray(dy))
    assert isinstance(got_y, cp.ndarray) and isinstance(got_dx, cp.ndarray)
    assert got_y.dtype == y.dtype and got_dx.dtype == dx.dtype
    tol = 1e-10 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(_host(got_y), y, rtol=tol, atol=tol)
    np.testing.assert_allclose(_host(got_dx), dx, rtol=tol, atol=tol)
    for (name, p), q in zip(cpu.named_parameters(), gpu.parameters()):
        assert isinstance(q.grad, cp.ndarray), name
        np.testing.assert_allclose(_host(q.grad), p.grad, rtol=tol, atol=tol, err_msg=name)
    for (name, a), b in zip(cpu.named_buffers(), gpu.buffers()):  # BatchNorm's statistics
        assert isinstance(b, cp.ndarray), name
        np.testing.assert_allclose(_host(b), a, rtol=tol, atol=tol, err_msg=name)


def test_fp16_layers_with_fp32_accumulation():
    cp, rng = cupy(), np.random.default_rng(4)
    nn.init.manual_seed(1)
    cpu = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, compute_mode="float32"), nn.ReLU(),
                        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, groups=8, compute_mode="float32"),
                        nn.GlobalAvgPool(), nn.Linear(8, 3)).to("float16")  # fmt: skip
    gpu = copy.deepcopy(cpu).to("cuda")
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float16)
    y, got = cpu(x), gpu(cp.asarray(x))
    dy = rng.standard_normal(y.shape).astype(np.float16)
    dx, got_dx = cpu.backward(dy), gpu.backward(cp.asarray(dy))
    assert got.dtype == got_dx.dtype == np.float16
    np.testing.assert_allclose(_host(got).astype(np.float32), y.astype(np.float32), atol=2e-2)
    np.testing.assert_allclose(_host(got_dx).astype(np.float32), dx.astype(np.float32), atol=2e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_on_the_gpu(reduction):
    cp, rng = cupy(), np.random.default_rng(5)
    logits, target = rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    loss, grad = losses.cross_entropy(logits, target, reduction)
    for labels in (target, cp.asarray(target)):  # class indices on the host or the device
        got_loss, got_grad = losses.cross_entropy(cp.asarray(logits), labels, reduction)
        assert isinstance(got_loss, cp.ndarray) and isinstance(got_grad, cp.ndarray)
        np.testing.assert_allclose(float(got_loss), float(loss), rtol=1e-12)
        np.testing.assert_allclose(_host(got_grad), grad, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("make", [
    lambda ps: optim.SGD(ps, lr=0.1),
    lambda ps: optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda ps: optim.Adam(ps, lr=0.01, weight_decay=0.1),
])  # fmt: skip
def test_optimizer_steps_on_the_gpu(make):
    cp, rng = cupy(), np.random.default_rng(6)
    nn.init.manual_seed(2)
    cpu = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(9, 2)).to("float64")
    gpu = copy.deepcopy(cpu).to("cuda")
    steps = [make(cpu.parameters()), make(gpu.parameters())]
    for _ in range(3):
        x = rng.standard_normal((4, 2, 5))
        for net, opt, xs in ((cpu, steps[0], x), (gpu, steps[1], cp.asarray(x))):
            net.zero_grad()
            y = net(xs)
            net.backward(y)  # d(0.5 |y|^2)/dy
            opt.step()
    for p, q in zip(cpu.parameters(), gpu.parameters()):
        assert isinstance(q.data, cp.ndarray)
        np.testing.assert_allclose(_host(q.data), p.data, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
def test_pad_and_its_adjoint_on_the_gpu(mode):
    cp, rng = cupy(), np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 5, 4))
    pads = ((1, 2), (3, 0))
    y = F.pad(x, pads, mode)
    dy = rng.standard_normal(y.shape)
    got = F.pad(cp.asarray(x), pads, mode)
    np.testing.assert_array_equal(_host(got), y)
    np.testing.assert_allclose(_host(F.pad_backward(cp.asarray(dy), pads, mode)),
                               F.pad_backward(dy, pads, mode), rtol=1e-12)  # fmt: skip


def test_state_dict_round_trip_through_the_gpu():
    nn.init.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    before = {k: v.copy() for k, v in net.state_dict().items()}
    net.to("cuda").to("float32")
    assert all(isinstance(p.data, cupy().ndarray) and p.dtype == np.float32
               for p in net.parameters())  # fmt: skip
    net.load_state_dict(before)  # host values copied to the device (and cast)
    net.to("float64").to("cpu")
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(value, before[name], rtol=1e-6)


def test_the_demo_trains_on_the_gpu_as_on_the_cpu():
    from mconv.demo import train_small_cnn

    cpu = train_small_cnn(steps=4, seed=1)
    gpu = train_small_cnn(steps=4, seed=1, device="cuda")
    np.testing.assert_allclose(gpu, cpu, rtol=1e-4)
