"""Device placement on a real GPU: Module.to('cuda'), layers created on a device,
a training step on the GPU equal to the same step on the CPU."""

import gpu_env
import numpy as np
import pytest

from mconv import nn, optim

pytestmark = gpu_env.requires_gpu


def _net():
    nn.init.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, groups=8), nn.ReLU(),
                         nn.ConvTranspose2d(8, 4, 2, stride=2), nn.GlobalAvgPool(),
                         nn.Linear(4, 2))  # fmt: skip


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_step_on_the_gpu_matches_the_cpu(dtype):
    import cupy

    x = np.random.default_rng(1).standard_normal((4, 3, 12, 12)).astype(dtype)
    grad = np.random.default_rng(2).standard_normal((4, 2)).astype(dtype)
    results = []
    for device in ("cpu", "cuda"):
        net = _net().to(dtype).to(device)
        opt = optim.SGD(net.parameters(), lr=0.1)
        xs = x if device == "cpu" else cupy.asarray(x)
        y = net(xs)
        net.backward(grad if device == "cpu" else cupy.asarray(grad))
        opt.step()
        results.append([cupy.asnumpy(a) for a in (y, *(p.data for p in net.parameters()))])
    tol = 1e-4 if dtype == "float32" else 1e-10
    for cpu, gpu in zip(*results):
        np.testing.assert_allclose(gpu, cpu, rtol=tol, atol=tol)


def test_to_and_from_the_gpu():
    import cupy

    net = _net()
    before = {k: v.copy() for k, v in net.state_dict().items()}
    net.to("cuda:0")
    assert all(isinstance(p.data, cupy.ndarray) and p.data.device.id == 0
               for p in net.parameters())  # fmt: skip
    net.load_state_dict(before)  # NumPy values copied onto the GPU
    assert isinstance(net[0].weight.data, cupy.ndarray)
    net.to("cpu")
    for name, value in net.state_dict().items():
        assert type(value) is np.ndarray
        np.testing.assert_array_equal(value, before[name])


def test_layers_created_on_the_gpu():
    import cupy

    conv = nn.Conv3d(2, 4, 3, device="cuda")
    assert isinstance(conv.weight.data, cupy.ndarray) and conv.device == "cuda:0"
    y = conv(cupy.ones((1, 2, 5, 5, 5), dtype=np.float32))
    assert isinstance(y, cupy.ndarray) and y.shape == (1, 4, 3, 3, 3)
    count = gpu_env.device_count()
    with pytest.raises(ValueError, match=f"CuPy sees {count} CUDA device"):
        nn.Conv2d(1, 1, 3, device=f"cuda:{count}")
