"""Real trained weights end to end: facenet-pytorch's MTCNN networks (PNet, RNet, ONet; the
wheel ships their state dicts) run entirely in mconv and match torch in float32 and float64.

The wheel is fetched with ``pip download --no-deps`` into a temporary folder (skipped only
when no package registry is reachable). The torch reference is facenet-pytorch's own class
source (its module imports torchvision, which does not install beside the pinned torch, so
the three classes are taken from ``mtcnn.py`` and run as they are); the mconv nets are the
same layers with the same attribute names, and load the ``.pt`` files through
``layouts.load_into(strict=True)``.
"""

import ast
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from reference import assert_close

import layouts
from mconv import nn

VERSION = "2.6.0"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("facenet")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         f"facenet-pytorch=={VERSION}", "-d", str(folder)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    files = list(folder.glob("*.whl"))
    if done.returncode != 0 or not files:
        reachable = "No matching distribution" in done.stderr or "HTTP error" in done.stderr
        if reachable or os.environ.get("CI"):
            pytest.fail(f"pip download facenet-pytorch failed:\n{done.stderr[-2000:]}")
        pytest.skip(f"no package registry reachable: {done.stderr.strip()[-300:]}")
    with zipfile.ZipFile(files[0]) as z:
        z.extractall(folder)
    return folder / "facenet_pytorch"


def torch_nets(root):
    """facenet-pytorch's PNet/RNet/ONet classes, from its source, with pretrained=False."""
    source = (root / "models" / "mtcnn.py").read_text()
    tree = ast.parse(source)
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in
               ("PNet", "RNet", "ONet")]  # fmt: skip
    namespace = {"torch": torch, "nn": torch.nn, "os": os}
    exec(compile(ast.Module(classes, []), "mtcnn.py", "exec"), namespace)  # noqa: S102
    return {name: namespace[name] for name in ("PNet", "RNet", "ONet")}


class _Net(nn.Module):
    """The trunk (layers named as facenet's, run in order), then the heads on its output."""

    trunk: tuple[str, ...] = ()
    heads: tuple[tuple[str, ...], ...] = ()
    flatten = False

    def forward(self, x):
        for name in self.trunk:
            x = getattr(self, name)(x)
        if self.flatten:  # facenet: x.permute(0, 3, 2, 1) before the dense layers
            x = x.transpose(0, 3, 2, 1).reshape(x.shape[0], -1)
            for name in self.dense:
                x = getattr(self, name)(x)
        outputs = []
        for head in self.heads:
            y = x
            for name in head:
                y = getattr(self, name)(y)
            outputs.append(y)
        return tuple(outputs)


def mconv_nets(dtype):
    def conv(cin, cout, k):
        return nn.Conv2d(cin, cout, k, dtype=dtype)

    def prelu(c):
        return nn.PReLU(c, dtype=dtype)

    def pool(k, s):
        return nn.MaxPool2d(k, s, ceil_mode=True)

    class PNet(_Net):
        trunk = ("conv1", "prelu1", "pool1", "conv2", "prelu2", "conv3", "prelu3")
        heads = (("conv4_2",), ("conv4_1", "softmax4_1"))

        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1, self.pool1 = conv(3, 10, 3), prelu(10), pool(2, 2)
            self.conv2, self.prelu2 = conv(10, 16, 3), prelu(16)
            self.conv3, self.prelu3 = conv(16, 32, 3), prelu(32)
            self.conv4_1, self.softmax4_1 = conv(32, 2, 1), nn.Softmax(dim=1)
            self.conv4_2 = conv(32, 4, 1)

    class RNet(_Net):
        trunk = ("conv1", "prelu1", "pool1", "conv2", "prelu2", "pool2", "conv3", "prelu3")
        flatten, dense = True, ("dense4", "prelu4")
        heads = (("dense5_2",), ("dense5_1", "softmax5_1"))

        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1, self.pool1 = conv(3, 28, 3), prelu(28), pool(3, 2)
            self.conv2, self.prelu2, self.pool2 = conv(28, 48, 3), prelu(48), pool(3, 2)
            self.conv3, self.prelu3 = conv(48, 64, 2), prelu(64)
            self.dense4, self.prelu4 = nn.Linear(576, 128, dtype=dtype), prelu(128)
            self.dense5_1, self.softmax5_1 = nn.Linear(128, 2, dtype=dtype), nn.Softmax(dim=1)
            self.dense5_2 = nn.Linear(128, 4, dtype=dtype)

    class ONet(_Net):
        trunk = ("conv1", "prelu1", "pool1", "conv2", "prelu2", "pool2", "conv3", "prelu3",
                 "pool3", "conv4", "prelu4")  # fmt: skip
        flatten, dense = True, ("dense5", "prelu5")
        heads = (("dense6_2",), ("dense6_3",), ("dense6_1", "softmax6_1"))

        def __init__(self):
            super().__init__()
            self.conv1, self.prelu1, self.pool1 = conv(3, 32, 3), prelu(32), pool(3, 2)
            self.conv2, self.prelu2, self.pool2 = conv(32, 64, 3), prelu(64), pool(3, 2)
            self.conv3, self.prelu3, self.pool3 = conv(64, 64, 3), prelu(64), pool(2, 2)
            self.conv4, self.prelu4 = conv(64, 128, 2), prelu(128)
            self.dense5, self.prelu5 = nn.Linear(1152, 256, dtype=dtype), prelu(256)
            self.dense6_1, self.softmax6_1 = nn.Linear(256, 2, dtype=dtype), nn.Softmax(dim=1)
            self.dense6_2 = nn.Linear(256, 4, dtype=dtype)
            self.dense6_3 = nn.Linear(256, 10, dtype=dtype)

    return {"PNet": PNet, "RNet": RNet, "ONet": ONet}


INPUTS = {"PNet": (2, 3, 37, 30), "RNet": (3, 3, 24, 24), "ONet": (3, 3, 48, 48)}


@pytest.mark.parametrize("name", ["PNet", "RNet", "ONet"])
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-10), ("float32", 2e-5)])
def test_mtcnn_nets_run_in_mconv_as_in_torch(wheel, name, dtype, tol):
    path = wheel / "data" / f"{name.lower()}.pt"
    theirs = torch_nets(wheel)[name](pretrained=False)
    theirs.load_state_dict(torch.load(path))
    theirs = theirs.to(getattr(torch, dtype)).eval()
    ours = mconv_nets(dtype)[name]()
    layouts.load_into(ours, path, strict=True)  # the real trained weights, read without torch
    x = np.random.default_rng(0).uniform(-1, 1, INPUTS[name]).astype(dtype)
    with torch.no_grad():
        want = theirs(torch.tensor(x))
    got = ours(x)
    assert len(got) == len(want)
    for mine, ref in zip(got, want):
        assert mine.dtype == np.dtype(dtype)
        assert_close(mine, ref.numpy(), tol)
