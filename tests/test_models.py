"""mconv.models against the same architectures in torch (tests/torch_models.py, written out
from torchvision's definitions): the state_dict keys and shapes key for key, torch files
loaded with layouts.load_into(strict=True) computing torch's output, and SGD steps of a
ResNeXt-style net in training mode (BatchNorm batch statistics) equal torch's."""

import numpy as np
import pytest
import torch
import torch_models as tm
from reference import assert_close

import layouts
from mconv import models, nn, optim

ARCHITECTURES = {
    "resnet18": (lambda: models.resnet18(10, dtype="float64"),
                 lambda: tm.ResNet(tm.BasicBlock, [2, 2, 2, 2], 10)),
    "resnet50": (lambda: models.resnet50(10, dtype="float64"),
                 lambda: tm.ResNet(tm.Bottleneck, [3, 4, 6, 3], 10)),
    "resnext50_32x4d": (lambda: models.resnext50_32x4d(10, dtype="float64"),
                        lambda: tm.ResNet(tm.Bottleneck, [3, 4, 6, 3], 10, 32, 4)),
    "mobilenet_v2": (lambda: models.mobilenet_v2(10, dtype="float64"),
                     lambda: tm.MobileNetV2(10)),
}  # fmt: skip


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_torch_checkpoints_load_strictly_and_compute_what_torch_computes(name, tmp_path):
    make_ours, make_theirs = ARCHITECTURES[name]
    torch.manual_seed(0)
    theirs = tm.randomize_batch_norms(make_theirs().double()).eval()
    ours = make_ours().eval()
    want_keys = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want_keys
    assert list(ours.state_dict()) == list(want_keys)
    path = tmp_path / f"{name}.pth"
    torch.save(theirs.state_dict(), path)
    layouts.load_into(ours, path, strict=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64))
    with torch.no_grad():
        want = theirs(torch.tensor(x)).numpy()
    assert_close(ours(x), want, 1e-9)


def test_three_sgd_steps_of_a_resnext_net_equal_torchs():
    torch.manual_seed(1)
    theirs = tm.ResNet(tm.Bottleneck, [1, 1, 1, 1], 5, groups=4, width_per_group=8).double()
    tm.randomize_batch_norms(theirs)
    ours = models.ResNet("bottleneck", [1, 1, 1, 1], 5, groups=4, width_per_group=8,
                         dtype="float64")  # fmt: skip
    ours.load_state_dict({k: v.numpy().copy() for k, v in theirs.state_dict().items()})
    t_opt = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=0.9)
    o_opt = optim.SGD(ours.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(2)
    for _ in range(3):
        x, target = rng.standard_normal((4, 3, 32, 32)), rng.standard_normal((4, 5))
        t_opt.zero_grad()
        out = theirs(torch.tensor(x))
        ((out - torch.tensor(target)) ** 2).sum().mul(0.5).backward()
        t_opt.step()
        o_opt.zero_grad()
        y = ours(x)
        ours.backward(y - target)
        o_opt.step()
    for key, value in theirs.state_dict().items():
        assert_close(ours.state_dict()[key], value.numpy(), 1e-9)


def test_model_errors():
    with pytest.raises(ValueError, match=r"block must be one of \('basic', 'bottleneck'\)"):
        models.ResNet("wide", [1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"layers must be 4 block counts, but got layers=\[1\]"):
        models.ResNet("basic", [1])
    with pytest.raises(ValueError, match=r"BasicBlock only supports groups=1"):
        models.ResNet("basic", [1, 1, 1, 1], groups=2)
    assert isinstance(models.resnet18().layer1[0].relu, nn.ReLU)


def test_a_megengine_checkpoint_of_the_architecture_loads_through_the_conversion(tmp_path):
    """mconv model -> MegEngine layout (grouped weights 5-D, no num_batches_tracked) as
    safetensors and as a MegEngine .pkl (through ``mconv convert``) -> a fresh model, strict:
    the same outputs."""
    import subprocess
    import sys

    from layouts import checkpoint

    nn.manual_seed(3)
    model = models.ResNet("bottleneck", [1, 1, 1, 1], 5, groups=4, width_per_group=8,
                          dtype="float64")  # fmt: skip
    model(np.random.default_rng(5).standard_normal((4, 3, 32, 32)) * 3 + 1)  # BN statistics
    model.eval()
    source = tmp_path / "model.safetensors"
    layouts.save_safetensors(model, source, layout="megengine")
    pkl = tmp_path / "model.pkl"
    done = subprocess.run([sys.executable, "-m", "mconv", "convert", str(source), str(pkl),
                           "--to", "megengine"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for path in (source, pkl):
        tensors = checkpoint.load_checkpoint(path).tensors
        assert tensors["layer1.0.conv2.weight"].shape == (4, 8, 8, 3, 3)  # (G, O/G, I/G, k, k)
        assert not any(name.endswith("num_batches_tracked") for name in tensors)
        fresh = models.ResNet("bottleneck", [1, 1, 1, 1], 5, groups=4, width_per_group=8,
                              dtype="float64").eval()  # fmt: skip
        layouts.load_into(fresh, path, strict=True)
        x = np.random.default_rng(4).standard_normal((2, 3, 32, 32))
        assert_close(fresh(x), model(x), 1e-12)
