"""load_into / save_safetensors: a model loaded from each foreign layout computes what the
PyTorch reference model computes (grouped, depthwise and transposed layers included)."""

import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file as torch_load_file

import layouts
from layouts import CheckpointError
from mconv import nn

from conftest import write_onnx


def _pair(n):
    """(torch model, mconv model) of the same architecture, spatial rank n, float64."""
    tconv = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[n]
    tup = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d, 3: torch.nn.ConvTranspose3d}[n]
    mconv_conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[n]
    mconv_up = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[n]
    reference = torch.nn.Sequential(
        tconv(4, 6, 3, padding=1, groups=2),  # grouped
        torch.nn.ReLU(),
        tconv(6, 12, 3, padding=1, groups=6),  # depthwise, multiplier 2
        torch.nn.ReLU(),
        tup(12, 4, 2, stride=2),  # transposed
        torch.nn.Flatten(),
    ).double()
    ours = nn.Sequential(
        mconv_conv(4, 6, 3, padding=1, groups=2, dtype="float64"), nn.ReLU(),
        mconv_conv(6, 12, 3, padding=1, groups=6, dtype="float64"), nn.ReLU(),
        mconv_up(12, 4, 2, stride=2, dtype="float64"), nn.Flatten(),
    )  # fmt: skip
    return reference, ours


def _spatial(w):
    return tuple(range(2, w.ndim))


# Each framework's documented layout, written out here from the reference model's weights.
def _export(framework, reference, n):
    state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
    out = {}
    for name, w in state.items():
        layer = reference[int(name.split(".")[0])]
        transposed = isinstance(layer, torch.nn.modules.conv._ConvTransposeNd)
        groups = layer.groups
        if name.endswith("bias"):
            out[name] = w.reshape(1, -1, *(1,) * n) if framework == "megengine" else w
        elif framework == "megengine":
            out[name] = w.reshape(groups, w.shape[0] // groups, *w.shape[1:]) if groups > 1 else w
        elif framework == "tensorflow" and groups > 1 and groups == layer.in_channels:
            c, m = groups, w.shape[0] // groups  # DepthwiseConv: (*k, C, M)
            out[name] = np.transpose(w.reshape(c, m, *w.shape[2:]), (*_spatial(w), 0, 1))
        elif framework in ("tensorflow", "jax") and transposed:
            if framework == "jax":  # Flax: (*k, I, O), flipped
                flipped = w[(slice(None), slice(None), *(slice(None, None, -1),) * n)]
                out[name] = np.transpose(flipped, (*_spatial(w), 0, 1))
            else:  # Keras: (*k, O, I)
                out[name] = np.transpose(w, (*_spatial(w), 1, 0))
        elif framework in ("tensorflow", "jax"):  # HWIO: (*k, I/G, O)
            out[name] = np.transpose(w, (*_spatial(w), 1, 0))
        else:
            out[name] = w
    if framework == "tensorflow":  # Keras names: '0/kernel:0'
        out = {
            k.replace(".weight", "/kernel:0").replace(".bias", "/bias:0"): v for k, v in out.items()
        }
    if framework == "jax":  # Flax names: 'params/0/kernel'
        out = {
            "params/" + k.replace(".weight", "/kernel").replace(".bias", "/bias"): v
            for k, v in out.items()
        }
    return out


def _write(framework, tensors, path):
    # the safetensors package writes a non-contiguous numpy array in memory order: hand it copies
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    if framework == "megengine":
        with open(path, "wb") as f:
            pickle.dump(tensors, f)
    elif framework == "onnx":
        write_onnx(path, tensors)
    else:
        save_file(tensors, str(path))


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize(
    "framework", ["torch", "megengine", "tensorflow", "jax", "onnx", "oneflow", "tripy"]
)
def test_foreign_layouts_load_to_the_reference_outputs(tmp_path, rng, n, framework):
    reference, ours = _pair(n)
    suffix = {"megengine": ".pkl", "onnx": ".onnx"}.get(framework, ".safetensors")
    path = tmp_path / f"weights{suffix}"
    _write(framework, _export(framework, reference, n), path)
    result = layouts.load_into(ours, path, framework=framework)
    assert result == ([], [])
    x = rng.standard_normal((2, 4, *(5, 4, 3)[:n]))
    expected = reference(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(ours(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", layouts.FRAMEWORKS)
def test_save_safetensors_round_trips_in_every_layout(tmp_path, rng, layout):
    _, ours = _pair(2)
    path = tmp_path / "model.safetensors"
    layouts.save_safetensors(ours, path, layout=layout, metadata={"note": "hello"})
    ckpt = layouts.load_checkpoint(path)
    assert ckpt.framework == layout and ckpt.metadata["note"] == "hello"
    _, fresh = _pair(2)
    layouts.load_into(fresh, path)  # layout and per-parameter kinds come from the metadata
    for (name, a), b in zip(ours.state_dict().items(), fresh.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_torch_layout_file_loads_into_real_torch(tmp_path, rng):
    reference, ours = _pair(2)
    path = tmp_path / "for_torch.safetensors"
    layouts.save_safetensors(ours, path, layout="torch")
    reference.load_state_dict(torch_load_file(str(path)))
    x = rng.standard_normal((2, 4, 5, 4))
    np.testing.assert_allclose(
        reference(torch.tensor(x)).detach().numpy(), ours(x), rtol=1e-12, atol=1e-12
    )


def test_megengine_file_with_grouped_weights_loads_into_torch_model(tmp_path):
    """The MegEngine grouped 5-d weight converts through mconv convert back to torch's layout."""
    _, ours = _pair(2)
    mge = tmp_path / "mge.pkl"
    layouts.save_safetensors(ours, tmp_path / "m.safetensors", layout="megengine")
    assert layouts.load_checkpoint(tmp_path / "m.safetensors").tensors["0.weight"].shape == (
        2,
        3,
        2,
        3,
        3,
    )
    from layouts.convert import convert

    convert(str(tmp_path / "m.safetensors"), str(mge), to_framework="megengine")
    back = convert(str(mge), str(tmp_path / "back.safetensors"), to_framework="torch")
    for name, value in ours.state_dict().items():
        if (
            name != "2.weight"
        ):  # a depthwise weight's groups cannot be read off a MegEngine-less shape
            np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_mismatches_are_reported_together(tmp_path):
    _, ours = _pair(2)
    state = {k: np.asarray(v) for k, v in ours.state_dict().items()}
    del state["0.bias"]
    state["0.weight"] = np.zeros((6, 2, 5, 5))
    state["extra.weight"] = np.zeros(3)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    before = {k: v.copy() for k, v in ours.state_dict().items()}
    with pytest.raises(CheckpointError) as info:
        layouts.load_into(ours, path)
    message = str(info.value)
    assert (
        "size mismatch for 0.weight" in message
        and "[6, 2, 5, 5]" in message
        and "[6, 2, 3, 3]" in message
    )
    assert "missing key 0.bias (model expects [6])" in message
    assert "unexpected key extra.weight of size [3]" in message
    for name, value in ours.state_dict().items():
        np.testing.assert_array_equal(value, before[name])  # nothing was modified
    del state["0.weight"], state["extra.weight"]
    path2 = tmp_path / "partial.safetensors"
    save_file(state, str(path2))
    assert layouts.load_into(ours, path2, strict=False) == (["0.weight", "0.bias"], [])


def test_save_safetensors_is_atomic(tmp_path, monkeypatch):
    _, ours = _pair(1)
    path = tmp_path / "model.safetensors"
    layouts.save_safetensors(ours, path)
    original = path.read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("layouts.atomic.os.replace", explode)
    with pytest.raises(OSError, match="disk full"):
        layouts.save_safetensors(ours, path, layout="megengine")
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left


def test_our_safetensors_match_the_safetensors_package(tmp_path):
    from safetensors.numpy import load_file

    from layouts.safetensors_format import write_safetensors

    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(3, dtype=np.int64),
               "c": np.zeros((0, 2), np.float16), "d": np.array(True)}  # fmt: skip
    ours = tmp_path / "ours.safetensors"
    write_safetensors(tensors, ours, {"k": "v"})
    for name, value in load_file(str(ours)).items():
        np.testing.assert_array_equal(value, tensors[name])
    theirs = tmp_path / "theirs.safetensors"
    save_file(tensors, str(theirs))
    for name, value in layouts.load_checkpoint(theirs).tensors.items():
        np.testing.assert_array_equal(value, tensors[name])


def test_bf16_safetensors_written_by_torch(tmp_path):
    from safetensors.torch import save_file as torch_save_file

    values = torch.tensor([1.5, -2.25, 1.0e-3]).bfloat16()
    path = tmp_path / "bf16.safetensors"
    torch_save_file({"w": values}, str(path))
    w = layouts.load_checkpoint(path).tensors["w"]
    np.testing.assert_array_equal(w.astype(np.float32), values.float().numpy())
