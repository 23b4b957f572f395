"""mconv convert / inspect, run as a user would."""

import pickle
import subprocess
import sys

import numpy as np
import pytest

import layouts

from conftest import sample_state


def _mconv(*args):
    return subprocess.run([sys.executable, "-m", "mconv", *map(str, args)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_inspect_prints_a_table(sample_files):
    done = _mconv("inspect", sample_files["torch-zip"])
    assert done.returncode == 0, done.stderr
    assert "format     torch-zip" in done.stdout and "framework  torch" in done.stdout
    assert "conv.weight  (4, 2, 3, 3)  float32  conv 2d" in done.stdout
    assert "4 tensors" in done.stdout


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "safetensors", "megengine", "onnx"])
def test_convert_any_format_to_keras_layout(tmp_path, sample_files, fmt):
    """A bare state dict does not say whether conv.weight is a conv or a transposed conv, nor
    whether head.weight is a Linear or an Embedding weight: refused until a spec says so."""
    out = tmp_path / "keras.safetensors"
    done = _mconv("convert", sample_files[fmt], out, "--to", "tensorflow")
    assert done.returncode == 1 and not out.exists()
    assert "head.weight: [3, 4]" in done.stderr and "--spec FILE" in done.stderr
    # an ONNX graph says what conv.weight is (its Conv node); a 4-d MegEngine weight may also
    # be a grouped 1-d conv
    assert ("conv.weight: [4, 2, 3, 3]" in done.stderr) == (fmt != "onnx")
    spec = tmp_path / "spec.json"
    spec.write_text('{"conv.weight": {"kind": "conv", "ndim": 2}, "head.*": {"role": "linear_weight"}}')
    done = _mconv("convert", sample_files[fmt], out, "--to", "tensorflow", "--spec", spec)
    assert done.returncode == 0, done.stderr
    ckpt = layouts.load_checkpoint(out)
    assert ckpt.framework == "tensorflow"
    w = sample_state()["conv.weight"]
    np.testing.assert_array_equal(ckpt.tensors["conv.weight"], w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(ckpt.tensors["head.weight"], sample_state()["head.weight"].T)
    back = tmp_path / "back.safetensors"  # and back, from the metadata alone
    assert _mconv("convert", out, back).returncode == 0
    np.testing.assert_array_equal(layouts.load_checkpoint(back).tensors["conv.weight"], w)


def test_convert_to_megengine_pkl_with_groups_and_dtype(tmp_path, sample_files):
    out = tmp_path / "mge.pkl"
    done = _mconv("convert", sample_files["torch-zip"], out, "--to", "megengine",
                  "--groups", "conv.weight=2", "--dtype", "float16", "--progress")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "100%" in done.stderr
    with open(out, "rb") as f:
        state = pickle.load(f)
    w = sample_state()["conv.weight"]
    assert (
        state["conv.weight"].shape == (2, 2, 2, 3, 3) and state["conv.weight"].dtype == np.float16
    )
    np.testing.assert_array_equal(state["conv.weight"][1, 0], w[2].astype(np.float16))
    assert state["conv.bias"].shape == (1, 4, 1, 1)
    assert state["steps"].dtype == np.int64  # only floating tensors are cast


def test_errors_have_exit_codes_and_messages(tmp_path, sample_files):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"\x80\x02cposix\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03.")
    done = _mconv("inspect", evil)
    assert done.returncode == 1 and "refusing to load the global posix.system" in done.stderr
    done = _mconv("convert", tmp_path / "missing.pt", tmp_path / "x.safetensors")
    assert done.returncode == 1 and "no such file" in done.stderr
    done = _mconv("convert", sample_files["torch-zip"], tmp_path / "out.bin")
    assert done.returncode == 1 and "must end in .safetensors or .pkl" in done.stderr
    done = _mconv(
        "convert", sample_files["torch-zip"], tmp_path / "o.pkl", "--groups", "conv.weight=x"
    )
    assert done.returncode == 2 and "--groups needs a positive integer" in done.stderr
    done = _mconv("convert", sample_files["torch-zip"], tmp_path / "o.pkl", "--groups", "nope=2")
    assert done.returncode == 1 and "no tensor named 'nope'" in done.stderr
