"""Small real checkpoint files of every format, written by each format's own tool
(torch, the safetensors package, pickle, onnx)."""

import pickle

import numpy as np
import pytest
import torch


def sample_state():
    rng = np.random.default_rng(7)
    return {
        "conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4).astype(np.float32),
        "head.weight": rng.standard_normal((3, 4)).astype(np.float16),
        "steps": np.arange(5, dtype=np.int64),
    }


def write_onnx(path, state):
    import onnx
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(v, name) for name, v in state.items()]
    node = helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1, 2, 5, 5])],
                              [helper.make_tensor_value_info("y", 1, None)], inits)  # fmt: skip
    onnx.save(helper.make_model(graph), str(path))


@pytest.fixture(scope="session")
def sample_files(tmp_path_factory):
    """format -> path of a small real file holding sample_state()."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("samples")
    state = sample_state()
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    files = {
        "torch-zip": root / "model.pt",
        "torch-legacy": root / "legacy.pt",
        "safetensors": root / "model.safetensors",
        "megengine": root / "model.pkl",
        "onnx": root / "model.onnx",
    }
    torch.save(tensors, files["torch-zip"])
    torch.save(tensors, files["torch-legacy"], _use_new_zipfile_serialization=False)
    save_file(state, str(files["safetensors"]), metadata={"format": "pt"})
    with open(files["megengine"], "wb") as f:
        pickle.dump({"state_dict": state, "epoch": 3}, f, protocol=4)
    write_onnx(files["onnx"], state)
    return files
