"""Writes the checkpoint fixtures in this folder with the REAL frameworks (not run by the tests).

The tests (tests/layouts/test_real_framework_files.py) read these files with ``layouts`` only;
this script documents exactly how each one was made. Run it once per framework, each under an
interpreter that has that framework (the frameworks were never installed side by side):

    # OneFlow 0.9.0 (PyPI wheel oneflow-0.9.0-cp310-cp310-manylinux_2_17_x86_64, a CUDA 11 build:
    # it imports on a CPU-only machine once cuDNN 8 / cuBLAS 11 are on LD_LIBRARY_PATH, e.g. from
    # the pip packages nvidia-cudnn-cu11==8.9.6.50 and nvidia-cublas-cu11==11.11.3.6; numpy 1.26.4)
    LD_LIBRARY_PATH=$SP/nvidia/cudnn/lib:$SP/nvidia/cublas/lib \
        /tmp/venv310/bin/python make_real_fixtures.py oneflow

    # OneFlow 0.8.0 (PyPI wheel oneflow-0.8.0-cp39-cp39-manylinux_2_17_x86_64, Python 3.9.18,
    # numpy 1.23.5: 0.8.0 still uses np.bool, gone in numpy 1.24)
    /tmp/venv39of08/bin/python make_real_fixtures.py oneflow

    # MegEngine 1.13.0 (PyPI wheel MegEngine-1.13.0-cp310-cp310-manylinux2014_x86_64, Python
    # 3.10.13, numpy 1.26.4; runs "under CPU mode" when no CUDA driver is found)
    /tmp/venv310mge/bin/python make_real_fixtures.py megengine

OneFlow 0.6.0 and 0.7.0 exist on PyPI only as ``py3-none-any`` wheels without the
``_oneflow_internal`` extension, so they cannot be imported; no installable version writes the
legacy ``snapshot_done`` directory (<= 0.5 ``flow.checkpoint.save``; the lazy
``oneflow.compatible.single_client`` API is absent from 0.8.0 / 0.9.0).

What is written (``<framework>-<version>/`` next to this script):

- ``<fixture>`` (file or directory): the framework's own save of the objects below;
- ``<fixture>.npz``: every tensor in it as ``.numpy()`` returned it, under the name
  ``layouts.load_checkpoint`` should give (nested keys joined with '.'); ``__input__`` /
  ``__output__``: a fixed input and the framework's own output of the model (model fixtures);
  bfloat16 tensors are stored as their float32 values (numpy has no bfloat16).

The model in every framework is ``Sequential(Conv2d(4, 6, 3, padding=1, groups=2),
ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2), Conv2d(4, 4, 3, padding=2, dilation=2,
groups=4))``: a grouped conv, a grouped transposed conv and a depthwise dilated conv, all with bias (MegEngine's zero-initialised biases are redrawn).
No ``output_padding``: MegEngine 1.13.0 fails on a grouped ConvTranspose2d with output_padding > 0
("group conv channel mismatch" from megdnn), whatever the padding.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def fresh(path: str) -> str:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)
    return path


def fixed_input() -> np.ndarray:
    return np.random.default_rng(2024).standard_normal((2, 4, 5, 5)).astype(np.float32)


def make_oneflow() -> None:
    os.chdir(tempfile.mkdtemp())  # OneFlow writes its glog files to ./log
    import oneflow as flow
    from oneflow.framework import check_point_v2

    out = os.path.join(HERE, f"oneflow-{flow.__version__}")
    os.makedirs(out, exist_ok=True)
    flow.manual_seed(0)
    nn = flow.nn
    model = nn.Sequential(
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2),
        nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),
    )
    model.eval()
    x = fixed_input()
    y = model(flow.tensor(x)).numpy()
    state = model.state_dict()
    expected = {k: v.numpy() for k, v in state.items()}

    # 1. flow.save(state_dict, dir): a directory with pickled_data + tensor_<n>/{meta,out}
    flow.save(state, fresh(os.path.join(out, "state_dict")))
    np.savez(os.path.join(out, "state_dict.npz"), __input__=x, __output__=y, **expected)
    if flow.__version__ != "0.9.0":
        return  # 0.8.0: only the state dict, to cover a second release

    # 2. a training checkpoint dict: load_checkpoint unwraps "model", epoch goes to metadata
    flow.save({"model": state, "epoch": 3}, fresh(os.path.join(out, "checkpoint")))
    np.savez(os.path.join(out, "checkpoint.npz"), **expected)

    # 3. dtypes and shapes: fp16, bf16, int64, bool, float64, a 0-d, an empty and a
    # non-contiguous tensor, tensors inside a list
    w = state["0.weight"]
    dtypes = {
        "half": flow.tensor(np.linspace(-2, 2, 6).reshape(2, 3), dtype=flow.float16),
        "bf16": flow.tensor(np.linspace(-3, 3, 5), dtype=flow.bfloat16),
        "steps": flow.tensor(np.array([1, -2, 2**40], dtype=np.int64)),
        "mask": flow.tensor(np.array([True, False, True])),
        "double": flow.tensor(np.array([[1.5, -0.25]], dtype=np.float64)),
        "step": flow.tensor(7, dtype=flow.int64),
        "empty": flow.zeros(0, 3),
        "transposed": w.reshape(6, 18).t(),
        "pair": [flow.tensor([1.0, 2.0]), flow.tensor([3, 4], dtype=flow.int32)],
    }
    flow.save(dtypes, fresh(os.path.join(out, "dtypes")))
    flat = {}
    for k, v in dtypes.items():
        for i, t in enumerate(v) if isinstance(v, list) else [(None, v)]:
            name = k if i is None else f"{k}.{i}"
            flat[name] = t.float().numpy() if t.dtype == flow.bfloat16 else t.numpy()
    np.savez(os.path.join(out, "dtypes.npz"), **flat)

    # 4. flow.save(nn.Graph, dir): model.mlir + one <name_prefix><name>/{meta,out} per state
    # tensor, no snapshot_done (flow.load of this directory fails its snapshot_done assertion)
    class Graph(nn.Graph):
        def __init__(self):
            super().__init__()
            self.m = model

        def build(self, inp):
            return self.m(inp)

    graph = Graph()
    yg = graph(flow.tensor(x)).numpy()
    assert np.array_equal(yg, y)
    flow.save(graph, fresh(os.path.join(out, "graph")))
    np.savez(os.path.join(out, "graph.npz"), **{f"m.{k}": v for k, v in expected.items()})

    # 5. the legacy layout as far as 0.9.0 still has it: <name>/{meta,out} written by 0.9.0's
    # own _save_tensor_to_disk, plus the snapshot_done marker flow.load's legacy_load requires
    # (no installable release writes snapshot_done itself); checked by flow.load below
    legacy = fresh(os.path.join(out, "legacy"))
    for k, v in state.items():
        check_point_v2._save_tensor_to_disk(v, os.path.join(legacy, k))
    open(os.path.join(legacy, "snapshot_done"), "w").close()
    back = flow.load(legacy)
    assert sorted(back) == sorted(state)
    assert all(np.array_equal(back[k].numpy(), expected[k]) for k in state)
    np.savez(os.path.join(out, "legacy.npz"), **expected)

    # the pickled fixtures load back in OneFlow itself, except "dtypes": 0.9.0 writes a bfloat16
    # tensor's `out` as tensor.numpy(), i.e. float32 bytes under `data_type: kBFloat16`, and its
    # own flow.load then raises NotImplementedError (no numpy dtype for bfloat16)
    for name in ("state_dict", "checkpoint"):
        flow.load(os.path.join(out, name))
    make_resnet_oneflow(out)
    try:
        flow.load(os.path.join(out, "dtypes"))
    except NotImplementedError:
        pass
    else:
        raise AssertionError("OneFlow now loads the bfloat16 tensor: recheck its bytes")


def make_megengine() -> None:
    import megengine as mge
    import megengine.module as M
    from megengine.module import init

    out = os.path.join(HERE, f"megengine-{mge.__version__}")
    os.makedirs(out, exist_ok=True)
    np.random.seed(0)
    mge.random.seed(0)
    model = M.Sequential(
        M.Conv2d(4, 6, 3, padding=1, groups=2),
        M.ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2),
        M.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),
    )
    for layer in (model[0], model[1], model[2]):
        init.normal_(layer.bias)
    model.eval()
    x = fixed_input()
    y = model(mge.tensor(x)).numpy()

    # 1. megengine.save(module.state_dict(), "x.pkl"): an OrderedDict of numpy arrays
    state = model.state_dict()
    mge.save(state, fresh(os.path.join(out, "state_dict.pkl")))
    np.savez(os.path.join(out, "state_dict.npz"), __input__=x, __output__=y, **state)

    # 2. a training checkpoint: {"state_dict", "optimizer" (SGD with momentum, one step), "epoch"}
    opt = mge.optimizer.SGD(model.parameters(), lr=0.0, momentum=0.9)
    gm = mge.autodiff.GradManager().attach(model.parameters())
    with gm:
        gm.backward(model(mge.tensor(x)).sum())
    opt.step()
    ckpt = {"state_dict": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    mge.save(ckpt, fresh(os.path.join(out, "checkpoint.pkl")))
    np.savez(os.path.join(out, "checkpoint.npz"), **ckpt["state_dict"])

    # 3. megengine.Tensor / Parameter objects: state_dict(keep_var=True) and tensors of other
    # dtypes (MegEngine has no int64 tensors: an int64 array becomes int32; a numpy int64 array
    # saved as such stays int64)
    kept = model.state_dict(keep_var=True)
    tensors = {
        "model": kept,
        "half": mge.tensor(np.linspace(-2, 2, 6).reshape(2, 3), dtype="float16"),
        "ints": mge.tensor(np.array([1, -2, 3], dtype=np.int64)),
        "scalar": mge.tensor(2.5),
        "np_int64": np.array([1, -2, 2**40], dtype=np.int64),
    }
    mge.save(tensors, fresh(os.path.join(out, "tensors.pkl")))
    flat = {f"model.{k}": v.numpy() for k, v in kept.items()}
    flat.update({k: (v if isinstance(v, np.ndarray) else v.numpy()) for k, v in tensors.items()
                 if k != "model"})  # fmt: skip
    np.savez(os.path.join(out, "tensors.npz"), **flat)

    for name in ("state_dict.pkl", "checkpoint.pkl", "tensors.pkl"):
        mge.load(os.path.join(out, name))
    make_resnet_megengine(out)


# -- a ResNet-style model (issue 12): BN, a residual, grouped, depthwise and transposed convs
#
#   stem: Conv2d(4, 8, 3, padding=1, bias=False) -> BatchNorm2d(8) -> ReLU
#   block (residual): x + bn2(dw(relu(bn1(conv1(x)))))
#       conv1: Conv2d(8, 8, 3, padding=1, groups=2, bias=False); dw: Conv2d(8, 8, 3, padding=1,
#       groups=8, bias=False) (depthwise); bn1, bn2: BatchNorm2d(8)
#   up: ConvTranspose2d(8, 4, 2, stride=2, groups=2)
#   fc: Linear(4 * 8 * 8, 3) on the flattened output
# Written as it is in each framework (the module API is the same in all three); a few training
# steps give the BatchNorm statistics values, then eval. Saved: the state dict, and the whole
# module (megengine.save(module) / flow.save(module, dir)); resnet.npz holds __input__,
# __output__ and every state_dict() tensor as the framework itself returns it (its names and
# shapes are the judge of what a conversion to that framework must write).


def resnet_style(nn, F):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
            self.bn1 = nn.BatchNorm2d(8)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
            self.bn2 = nn.BatchNorm2d(8)

        def forward(self, x):
            return x + self.bn2(self.dw(F.relu(self.bn1(self.conv1(x)))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(4, 8, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(8)
            self.block = Block()
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
            self.fc = nn.Linear(4 * 8 * 8, 3)

        def forward(self, x):
            y = self.up(self.block(F.relu(self.bn(self.stem(x)))))
            return self.fc(y.reshape(y.shape[0], -1))

    for cls in (Block, Net):  # module-level names, so that the whole module can be pickled
        cls.__qualname__ = cls.__name__
        globals()[cls.__name__] = cls
    return Net


def resnet_input() -> np.ndarray:
    return np.random.default_rng(12).standard_normal((2, 4, 4, 4)).astype(np.float32)


def make_resnet_megengine(out: str) -> None:
    import megengine as mge
    import megengine.functional as F
    import megengine.module as M
    from megengine.module import init

    np.random.seed(12)
    mge.random.seed(12)
    model = resnet_style(M, F)()
    for name, p in model.named_parameters():
        if "bn" in name or name.endswith("bias"):
            init.normal_(p)  # BN affine and biases are not trivially 1 / 0
    model.train()
    for step in range(3):  # BN running statistics from real batches
        model(mge.tensor(np.random.default_rng(step).standard_normal((8, 4, 4, 4)).astype("f4")))
    model.eval()
    x = resnet_input()
    y = model(mge.tensor(x)).numpy()
    state = model.state_dict()
    mge.save(state, fresh(os.path.join(out, "resnet_state_dict.pkl")))
    mge.save(model, fresh(os.path.join(out, "resnet_module.pkl")))
    np.savez(os.path.join(out, "resnet.npz"), __input__=x, __output__=y, **state)
    back = mge.load(os.path.join(out, "resnet_module.pkl"))
    assert np.array_equal(back(mge.tensor(x)).numpy(), y)


def make_resnet_oneflow(out: str) -> None:
    import oneflow as flow
    import oneflow.nn.functional as F

    flow.manual_seed(12)
    nn = flow.nn
    model = resnet_style(nn, F)()
    with flow.no_grad():
        for name, p in model.named_parameters():
            if "bn" in name or name.endswith("bias"):
                p.copy_(flow.randn(*p.shape))
    model.train()
    for step in range(3):
        model(flow.tensor(np.random.default_rng(step).standard_normal((8, 4, 4, 4)).astype("f4")))
    model.eval()
    x = resnet_input()
    y = model(flow.tensor(x)).numpy()
    state = model.state_dict()
    flow.save(state, fresh(os.path.join(out, "resnet_state_dict")))
    flow.save(model, fresh(os.path.join(out, "resnet_module")))
    np.savez(os.path.join(out, "resnet.npz"), __input__=x, __output__=y,
             **{k: v.numpy() for k, v in state.items()})  # fmt: skip
    back = flow.load(os.path.join(out, "resnet_module"))
    assert np.array_equal(back(flow.tensor(x)).numpy(), y)


if __name__ == "__main__":
    if sys.argv[1:] == ["oneflow"]:
        make_oneflow()
    elif sys.argv[1:] == ["megengine"]:
        make_megengine()
    else:
        sys.exit("usage: make_real_fixtures.py oneflow|megengine")
