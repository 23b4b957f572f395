"""Real files written by real PyTorch, read by layouts in a subprocess where
``import torch`` fails; compared with the tensors torch saved."""

import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

import layouts
from layouts import CheckpointError

# runs in a fresh interpreter: torch cannot be imported there
READER = r"""
import sys, json
sys.modules["torch"] = None          # any `import torch` now raises ImportError
import numpy as np, layouts
path, out = sys.argv[1], sys.argv[2]
ckpt = layouts.load_checkpoint(path)
assert "torch" not in [m.split(".")[0] for m in sys.modules if sys.modules[m] is not None]
np.savez(out, **{k.replace(".", "__"): np.asarray(v).astype(np.float64) if v.dtype.name == "bfloat16" else v
                  for k, v in ckpt.tensors.items()})
print(json.dumps({"framework": ckpt.framework, "metadata": {k: str(v) for k, v in ckpt.metadata.items()},
                  "dtypes": {k: str(v.dtype) for k, v in ckpt.tensors.items()}}))
"""


def _read_without_torch(path, tmp_path):
    out = tmp_path / "out.npz"
    done = subprocess.run([sys.executable, "-c", READER, str(path), str(out)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout.strip().splitlines()[-1])
    with np.load(out) as arrays:
        return {k.replace("__", "."): arrays[k] for k in arrays.files}, info


def _state(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 6, generator=g)
    return {
        "conv.weight": torch.randn(8, 3, 3, 3, generator=g),
        "conv.bias": torch.randn(8, generator=g),
        "half": torch.randn(5, generator=g).half(),
        "double": torch.randn(2, 3, generator=g).double(),
        "long": torch.arange(7),
        "int8": torch.arange(-3, 3, dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "complex": torch.randn(3, dtype=torch.complex64, generator=g),
        "transposed": base.t(),  # non-contiguous view
        "column": base[:, 2],  # strided view with a storage offset
        "rows": base[1:3],  # contiguous view with an offset, same storage
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "param": torch.nn.Parameter(torch.randn(3, generator=g)),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_save_files_load_without_torch(tmp_path, zip_format):
    state = _state()
    path = tmp_path / "model.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    arrays, info = _read_without_torch(path, tmp_path)
    assert info["framework"] == "torch"
    assert info["metadata"]["format"] == ("torch-zip" if zip_format else "torch-legacy")
    assert set(arrays) == set(state)
    for name, tensor in state.items():
        expected = tensor.detach().numpy()
        assert arrays[name].dtype == expected.dtype, name
        np.testing.assert_array_equal(arrays[name], expected, err_msg=name)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module-prefix", "nested"])
def test_nested_checkpoints_are_unwrapped(tmp_path, wrapper):
    state = {"a.weight": torch.randn(2, 3), "a.bias": torch.randn(2)}
    if wrapper == "module-prefix":
        obj = {f"module.{k}": v for k, v in state.items()}
    elif wrapper == "nested":
        obj = {"a": {"weight": state["a.weight"], "bias": state["a.bias"]}}
    else:
        obj = {wrapper: state, "epoch": 7, "optimizer": {"lr": 0.1}}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    arrays, info = _read_without_torch(path, tmp_path)
    assert sorted(arrays) == ["a.bias", "a.weight"]
    np.testing.assert_array_equal(arrays["a.weight"], state["a.weight"].numpy())
    if wrapper in ("state_dict", "model"):
        assert info["metadata"]["epoch"] == "7"


def test_bfloat16_with_and_without_ml_dtypes(tmp_path, monkeypatch):
    values = torch.tensor([1.5, -2.25, 3.0e38, 1.0e-3]).bfloat16()
    path = tmp_path / "bf16.pt"
    torch.save({"w": values}, path)
    exact = values.float().numpy()
    ckpt = layouts.load_checkpoint(path)
    assert ckpt.tensors["w"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(ckpt.tensors["w"].astype(np.float32), exact)
    monkeypatch.setattr("layouts.dtypes.ml_dtype", lambda name, source: None)
    monkeypatch.setattr("layouts.torch_format.ml_dtype", lambda name, source: None)
    with pytest.warns(UserWarning, match="bfloat16 tensors load as float32"):
        fallback = layouts.load_checkpoint(path).tensors["w"]
    assert fallback.dtype == np.float32
    np.testing.assert_array_equal(fallback, exact)


def test_big_endian_byteorder_record(tmp_path):
    """A checkpoint written on a big-endian machine: byteorder 'big', swapped storages."""
    source = tmp_path / "little.pt"
    torch.save(
        {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "i": torch.arange(3)}, source
    )
    target = tmp_path / "big.pt"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as dst:
        itemsize = {"0": 4, "1": 8}
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                key = info.filename.rsplit("/", 1)[1]
                data = (
                    np.frombuffer(data, f"<u{itemsize[key]}").astype(f">u{itemsize[key]}").tobytes()
                )
            dst.writestr(info.filename, data)
    ckpt = layouts.load_checkpoint(target)
    np.testing.assert_array_equal(ckpt.tensors["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(ckpt.tensors["i"], np.arange(3))
    assert ckpt.tensors["w"].dtype.isnative


def test_contiguous_tensors_are_zero_copy_views(tmp_path):
    path = tmp_path / "big.pt"
    torch.save({"w": torch.randn(256, 256)}, path)
    w = layouts.load_checkpoint(path).tensors["w"]
    assert not w.flags.owndata and not w.flags.writeable  # a view of the read-only memory map


def test_uint16_and_float8_via_rebuild_tensor_v3(tmp_path):
    pytest.importorskip("ml_dtypes")
    state = {"u16": torch.tensor([1, 2, 65535], dtype=torch.uint16),
             "f8": torch.tensor([0.5, -1.0, 2.0]).to(torch.float8_e4m3fn)}  # fmt: skip
    path = tmp_path / "v3.pt"
    torch.save(state, path)
    ckpt = layouts.load_checkpoint(path)
    np.testing.assert_array_equal(ckpt.tensors["u16"], [1, 2, 65535])
    assert ckpt.tensors["f8"].dtype.name == "float8_e4m3fn"
    np.testing.assert_array_equal(ckpt.tensors["f8"].astype(np.float32), [0.5, -1.0, 2.0])


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match=r"unrecognised checkpoint format"):
        layouts.load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        layouts.load_checkpoint(tmp_path / "missing.pt")
