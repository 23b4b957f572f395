"""Checkpoints written by the real OneFlow (0.9.0, 0.8.0) and MegEngine (1.13.0), read back
without either framework and compared with what the framework itself said.

The files under data/ were made by data/make_real_fixtures.py (see it for the exact versions and
commands); each ``<fixture>.npz`` holds the framework's ``.numpy()`` of every tensor under the
name ``load_checkpoint`` must give, and, for the model files, ``__input__`` and the framework's
own ``__output__`` of the model ``Sequential(Conv2d(4, 6, 3, padding=1, groups=2),
ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2), Conv2d(4, 4, 3, padding=2, dilation=2,
groups=4))``.

Names: as the framework's ``state_dict()`` names them, with two differences that come from the
formats, not from the readers:
- ``flow.save(nn.Graph)`` names each variable ``<graph attribute>.<parameter>`` (``m.0.weight``
  for a graph whose module is ``self.m``); its ``model.mlir`` holds no tensors;
- nested dicts are joined with '.', a list index is a name part (``pair.0``), and a checkpoint
  dict (``{"model"/"state_dict": ..., "epoch": 3}`` with no tensor at the top) is unwrapped, its
  scalars going to ``metadata``, its optimizer state dropped.
"""

import copyreg
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import layouts
from layouts import CheckpointError
from layouts.checkpoint import sniff
from mconv.nn import Conv2d, ConvTranspose2d, Module, Sequential

DATA = Path(__file__).parent / "data"
OF9, OF8, MGE = DATA / "oneflow-0.9.0", DATA / "oneflow-0.8.0", DATA / "megengine-1.13.0"

# fixture -> (framework, metadata["format"], scalars expected in metadata)
FIXTURES = {
    OF9 / "state_dict": ("oneflow", "oneflow-pickled-dir", {}),
    OF9 / "checkpoint": ("oneflow", "oneflow-pickled-dir", {"epoch": 3}),
    OF9 / "dtypes": ("oneflow", "oneflow-pickled-dir", {}),
    OF9 / "graph": ("oneflow", "oneflow-legacy", {"snapshot_done": False}),
    OF9 / "legacy": ("oneflow", "oneflow-legacy", {"snapshot_done": True}),
    OF8 / "state_dict": ("oneflow", "oneflow-pickled-dir", {}),
    MGE / "state_dict.pkl": ("megengine", "pickle", {}),
    MGE / "checkpoint.pkl": ("megengine", "pickle", {"epoch": 3}),
    MGE / "tensors.pkl": ("megengine", "pickle", {}),
}
MODEL_NAMES = ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]


def expected(fixture):
    with np.load(fixture.with_suffix(".npz") if fixture.suffix else f"{fixture}.npz") as npz:
        return {k: npz[k] for k in npz.files}


def tensors_of(fixture):
    return {k: v for k, v in expected(fixture).items() if not k.startswith("__")}


def ids(path):
    return str(path.relative_to(DATA))


@pytest.mark.parametrize("fixture", FIXTURES, ids=ids)
def test_real_file_loads_exactly(fixture):
    framework, fmt, scalars = FIXTURES[fixture]
    assert sniff(str(fixture)) == ("oneflow" if framework == "oneflow" else "pickle")
    ckpt = layouts.load_checkpoint(fixture)
    assert ckpt.framework == framework
    assert ckpt.metadata["format"] == fmt
    assert {k: ckpt.metadata[k] for k in scalars} == scalars
    want = tensors_of(fixture)
    assert sorted(ckpt.tensors) == sorted(want)
    for name, value in want.items():
        got = ckpt.tensors[name]
        assert got.shape == value.shape, name
        if str(got.dtype) == "bfloat16":  # stored in the .npz as its float32 values
            assert value.dtype == np.float32, name
            got = got.astype(np.float32)
        assert got.dtype == value.dtype, name
        np.testing.assert_array_equal(got, value, err_msg=name)


@pytest.mark.parametrize(
    "fixture, order",
    [(OF9 / "state_dict", MODEL_NAMES), (OF8 / "state_dict", MODEL_NAMES),
     (MGE / "state_dict.pkl", sorted(MODEL_NAMES))],  # MegEngine's state_dict() sorts names
    ids=lambda p: ids(p) if isinstance(p, Path) else "",
)  # fmt: skip
def test_state_dict_keeps_the_framework_order(fixture, order):
    assert list(layouts.load_checkpoint(fixture).tensors) == order


def test_oneflow_dtypes():
    """fp16, bf16 (from float32 bytes, see below), int64, bool, float64, 0-d, empty, a
    non-contiguous (transposed) tensor, tensors in a list."""
    t = layouts.load_checkpoint(OF9 / "dtypes").tensors
    assert {k: str(v.dtype) for k, v in t.items()} == {
        "half": "float16", "bf16": str(t["bf16"].dtype), "steps": "int64", "mask": "bool",
        "double": "float64", "step": "int64", "empty": "float32", "transposed": "float32",
        "pair.0": "float32", "pair.1": "int32",
    }  # fmt: skip
    assert str(t["bf16"].dtype) in ("bfloat16", "float32")  # float32 without ml_dtypes
    assert t["step"].shape == () and t["step"] == 7
    assert t["steps"][2] == 2**40 and t["empty"].shape == (0, 3)
    weight = tensors_of(OF9 / "state_dict")["0.weight"]
    np.testing.assert_array_equal(t["transposed"], weight.reshape(6, 18).T)


def test_oneflow_090_writes_bfloat16_as_float32_bytes():
    """What OneFlow 0.9.0 really writes for a bfloat16 tensor: meta says kBFloat16, ``out``
    holds ``tensor.numpy()`` (float32), 4 bytes per element, not 2."""
    metas = [p for p in (OF9 / "dtypes").glob("tensor_*/meta") if "kBFloat16" in p.read_text()]
    assert len(metas) == 1
    assert (metas[0].parent / "out").stat().st_size == 5 * 4
    values = np.fromfile(metas[0].parent / "out", np.float32)
    np.testing.assert_array_equal(values, tensors_of(OF9 / "dtypes")["bf16"])


@pytest.mark.parametrize("with_ml_dtypes", [True, False])
def test_oneflow_090_bfloat16_values(with_ml_dtypes, monkeypatch):
    if not with_ml_dtypes:
        monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` fails
    else:
        pytest.importorskip("ml_dtypes")
    bf16 = layouts.load_checkpoint(OF9 / "dtypes").tensors["bf16"]
    assert str(bf16.dtype) == ("bfloat16" if with_ml_dtypes else "float32")
    np.testing.assert_array_equal(bf16.astype(np.float32), [-3.0, -1.5, 0.0, 1.5, 3.0])


def test_oneflow_directory_layouts():
    """What flow.save wrote: a pickled_data directory for objects (0.8.0 and 0.9.0 alike),
    meta/out variable directories plus model.mlir (no snapshot_done) for an nn.Graph."""
    for root in (OF9 / "state_dict", OF8 / "state_dict", OF9 / "checkpoint", OF9 / "dtypes"):
        names = {p.name for p in root.iterdir()} - {"pickled_data"}
        assert (root / "pickled_data").is_file() and all(n.startswith("tensor_") for n in names)
        assert (root / "pickled_data").read_bytes().startswith(b"\x80\x04")  # protocol 4
    graph = sorted(p.name for p in (OF9 / "graph").iterdir())
    assert graph == ["m.0.bias", "m.0.weight", "m.1.bias", "m.1.weight", "m.2.bias",
                     "m.2.weight", "model.mlir"]  # fmt: skip


def test_megengine_layouts_from_the_real_framework():
    """MegEngine's own shapes: grouped conv (G, O/G, I/G, kH, kW), grouped transposed conv
    (G, I/G, O/G, kH, kW), depthwise (C, 1, 1, kH, kW), biases (1, O, 1, 1)."""
    t = layouts.load_checkpoint(MGE / "state_dict.pkl").tensors
    assert {k: v.shape for k, v in t.items()} == {
        "0.weight": (2, 3, 2, 3, 3), "0.bias": (1, 6, 1, 1),
        "1.weight": (2, 3, 2, 3, 3), "1.bias": (1, 4, 1, 1),
        "2.weight": (4, 1, 1, 3, 3), "2.bias": (1, 4, 1, 1),
    }  # fmt: skip


def test_megengine_tensor_objects():
    """state_dict(keep_var=True) (Parameters) and megengine.Tensors: MegEngine has no int64
    tensor (int64 data becomes int32); a numpy int64 array saved beside them stays int64."""
    t = layouts.load_checkpoint(MGE / "tensors.pkl").tensors
    assert t["half"].dtype == np.float16 and t["ints"].dtype == np.int32
    assert t["np_int64"].dtype == np.int64 and t["scalar"].shape == ()
    plain = layouts.load_checkpoint(MGE / "state_dict.pkl").tensors
    for name, value in plain.items():
        np.testing.assert_array_equal(t[f"model.{name}"], value)


def mconv_model():
    return Sequential(
        Conv2d(4, 6, 3, padding=1, groups=2),
        ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2),
        Conv2d(4, 4, 3, padding=2, dilation=2, groups=4),
    )


class GraphLike(Module):
    """The module nn.Graph saw as ``self.m``: its variables are named ``m.<name>``."""

    def __init__(self):
        super().__init__()
        self.m = mconv_model()

    def forward(self, x):
        return self.m(x)


@pytest.mark.parametrize(
    "fixture, io, make",
    [
        (OF9 / "state_dict", OF9 / "state_dict", mconv_model),
        (OF9 / "checkpoint", OF9 / "state_dict", mconv_model),
        (OF9 / "legacy", OF9 / "state_dict", mconv_model),
        (OF9 / "graph", OF9 / "state_dict", GraphLike),
        (OF8 / "state_dict", OF8 / "state_dict", mconv_model),
        (MGE / "state_dict.pkl", MGE / "state_dict.pkl", mconv_model),
        (MGE / "checkpoint.pkl", MGE / "state_dict.pkl", mconv_model),  # an SGD step at lr=0
    ],
    ids=lambda p: ids(p) if isinstance(p, Path) else "",
)
def test_load_into_gives_the_framework_output(fixture, io, make):
    model = make()
    result = layouts.load_into(model, fixture)
    assert not result.missing_keys and not result.unexpected_keys
    saved = expected(io)
    out = model(saved["__input__"])
    assert out.shape == saved["__output__"].shape == (2, 4, 9, 9)
    np.testing.assert_allclose(out, saved["__output__"], rtol=1e-5, atol=1e-5)


def test_megengine_weights_convert_to_the_oneflow_layout():
    """Both frameworks' files in one mconv model each: same shapes in PyTorch's layout."""
    a, b = mconv_model(), mconv_model()
    layouts.load_into(a, MGE / "state_dict.pkl")
    layouts.load_into(b, OF9 / "state_dict")
    assert {k: v.shape for k, v in a.state_dict().items()} == {
        k: v.shape for k, v in b.state_dict().items()
    }


class FakeMegEngineTensor:
    """Pickles as MegEngine 1.13 pickles a Tensor: NEWOBJ(__getnewargs__), BUILD(state)."""

    __module__, __qualname__ = "megengine.tensor", "Tensor"

    def __init__(self, args, state):
        self.args, self.state = args, state

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (type(self), *self.args), self.state


def test_megengine_tensor_stand_in_refuses_what_it_cannot_hold(tmp_path, monkeypatch):
    for name in ("megengine", "megengine.tensor"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["megengine.tensor"].Tensor = FakeMegEngineTensor

    def write(name, args, state):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"w": FakeMegEngineTensor(args, state)}, protocol=4))
        return path

    ok = write("ok.pkl", (np.arange(3.0), np.dtype("f8"), "xpux:0"), {})
    assert b"megengine.tensor" in ok.read_bytes()
    np.testing.assert_array_equal(layouts.load_checkpoint(ok).tensors["w"], np.arange(3.0))
    with pytest.raises(CheckpointError, match="not an array"):
        layouts.load_checkpoint(write("bad.pkl", ("not an array", None, "cpu0"), {}))
    with pytest.raises(CheckpointError, match="qparams"):
        layouts.load_checkpoint(write("q.pkl", (np.arange(3.0), None, "cpu0"), {"qparams": 1}))


# -- the ResNet-style model of issue 12 (data/make_real_fixtures.py: resnet_style) ----------

torch = pytest.importorskip("torch")


class TorchBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(8)

    def forward(self, x):
        return x + self.bn2(self.dw(torch.relu(self.bn1(self.conv1(x)))))


class TorchNet(torch.nn.Module):
    """The fixtures' model, written in torch: the judge of every converted file."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.bn = torch.nn.BatchNorm2d(8)
        self.block = TorchBlock()
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
        self.fc = torch.nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = self.up(self.block(torch.relu(self.bn(self.stem(x)))))
        return self.fc(y.reshape(y.shape[0], -1))


RESNET = [MGE / "resnet_module.pkl", MGE / "resnet_state_dict.pkl", OF9 / "resnet_module",
          OF9 / "resnet_state_dict"]  # fmt: skip


def _resnet_npz(fixture):
    return expected(fixture.parent / "resnet.npz")


@pytest.mark.parametrize("fixture", RESNET, ids=ids)
def test_resnet_converts_to_a_torch_file_that_loads_strictly(tmp_path, fixture):
    """Converted to torch's layout, each real file loads into the same model written in torch
    with strict=True (MegEngine files have no num_batches_tracked: 0 is added) and gives the
    framework's own output. A MegEngine state dict does not say its convs' ranks (a 4-d or
    5-d weight may be a grouped conv of one rank or an ungrouped conv of the next): it needs
    a spec; the whole module carries its structure and needs none."""
    from layouts.convert import convert

    out = str(tmp_path / "torch.safetensors")
    spec = None
    if fixture.name == "resnet_state_dict.pkl":
        with pytest.raises(CheckpointError, match=r"(?s)3 tensor.*block\.conv1\.weight.*"
                           r"block\.dw\.weight.*stem\.weight.*spatial rank or groups.*--spec FILE"):  # fmt: skip
            convert(str(fixture), out)
        assert not (tmp_path / "torch.safetensors").exists()
        spec = tmp_path / "spec.json"
        spec.write_text('{"*": {"ndim": 2}}')  # every conv weight is 2-d; BN is left alone
    convert(str(fixture), out, spec=spec)
    from safetensors.torch import load_file

    model = TorchNet().eval()
    model.load_state_dict(load_file(out), strict=True)
    saved = _resnet_npz(fixture)
    with torch.no_grad():  # float64: the framework's float32 output is the only rounding
        y = model.double()(torch.from_numpy(saved["__input__"]).double()).numpy()
    np.testing.assert_allclose(y, saved["__output__"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("target, data", [("megengine", MGE), ("oneflow", OF9)])
@pytest.mark.parametrize("save", ["module", "torchscript"])
def test_torch_model_converts_to_exactly_the_frameworks_state_dict(tmp_path, target, data, save):
    """A whole torch model (pickled or scripted: structure in the file, no hints) converted to
    MegEngine / OneFlow has exactly the names and shapes that framework's own state_dict() of
    the same model has; and converting back gives the torch values."""
    from layouts.convert import convert

    model = TorchNet().eval()
    src = tmp_path / "model.pt"
    if save == "module":
        torch.save(model, src)
    else:
        torch.jit.save(torch.jit.script(model), src)
    out = tmp_path / ("model.pkl" if target == "megengine" else "model.safetensors")
    written = convert(str(src), str(out), to_framework=target)
    theirs = {k: v.shape for k, v in tensors_of(data / "resnet.npz").items()}
    assert {k: v.shape for k, v in written.items()} == theirs
    back = convert(str(out), str(tmp_path / "back.safetensors"), from_framework=target,
                   spec=_write(tmp_path / "s.json", '{"*": {"ndim": 2}}'))  # fmt: skip
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(back[name], value.numpy(), err_msg=name)


def _write(path, text):
    path.write_text(text)
    return path


def test_torch_state_dict_to_megengine_is_refused_naming_every_conv(tmp_path):
    from layouts.convert import convert

    src = tmp_path / "sd.pt"
    torch.save(TorchNet().state_dict(), src)
    with pytest.raises(CheckpointError) as info:
        convert(str(src), str(tmp_path / "m.pkl"), to_framework="megengine")
    message = str(info.value)
    for name in ("stem.weight", "block.conv1.weight", "block.dw.weight", "up.weight"):
        assert f"{name}: [" in message and "unknown groups" in message
    assert "bn.weight" not in message and "fc.weight" not in message
    assert "4 tensor(s)" in message and not (tmp_path / "m.pkl").exists()
