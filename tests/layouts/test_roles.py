"""Roles from evidence (issue 12): structure in the file, specs, shape facts, and the
refusals where the target layout depends on something unknown. References: torch float64
models and each layout's documented index mapping (test_adapters), never the code under test."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

import layouts
from layouts import CheckpointError
from layouts.convert import convert
from layouts.roles import ParamSpec, merge, needs, shape_facts


def _mconv(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "mconv", *map(str, args)], capture_output=True,
                          text=True, timeout=120, **kwargs)  # fmt: skip


def _pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=4)
    return path


def test_megengine_batchnorm_statistics_load_into_torch_strictly(tmp_path, rng):
    """Older MegEngine files and whole modules keep BN tensors as (1, C, 1, 1): they are BN by
    their sibling names, not 1x1 conv weights; torch gets num_batches_tracked = 0."""
    bn = torch.nn.BatchNorm2d(6).double().eval()
    values = {k: rng.standard_normal(6) for k in ("weight", "bias", "running_mean")}
    values["running_var"] = rng.uniform(0.5, 2, 6)
    src = _pickle(tmp_path / "bn.pkl", {f"bn.{k}": v.reshape(1, 6, 1, 1) for k, v in values.items()})
    out = convert(str(src), str(tmp_path / "t.safetensors"))
    assert out["bn.num_batches_tracked"].dtype == np.int64 and out["bn.num_batches_tracked"] == 0
    from safetensors.torch import load_file

    bn.load_state_dict({k.removeprefix("bn."): v for k, v in load_file(str(tmp_path / "t.safetensors")).items()},
                       strict=True)  # fmt: skip
    np.testing.assert_array_equal(bn.running_var.numpy(), values["running_var"])
    back = convert(str(tmp_path / "t.safetensors"), str(tmp_path / "m.pkl"), to_framework="megengine")
    assert "bn.num_batches_tracked" not in back and back["bn.weight"].shape == (6,)


def test_megengine_conv3d_is_told_by_its_bias_rank(tmp_path, rng):
    w, b = rng.standard_normal((8, 4, 3, 3, 3)), rng.standard_normal((1, 8, 1, 1, 1))
    grouped = rng.standard_normal((2, 4, 2, 3, 3))  # a grouped 2-d conv: bias (1, 8, 1, 1)
    src = _pickle(tmp_path / "m.pkl", {"c3.weight": w, "c3.bias": b, "g.weight": grouped,
                                       "g.bias": rng.standard_normal((1, 8, 1, 1))})  # fmt: skip
    out = convert(str(src), str(tmp_path / "t.safetensors"))
    np.testing.assert_array_equal(out["c3.weight"], w)  # ungrouped 3-d: torch's layout already
    assert out["c3.bias"].shape == (8,) and out["g.weight"].shape == (8, 2, 3, 3)
    np.testing.assert_array_equal(out["g.weight"][4:], grouped[1])


def test_save_safetensors_of_a_state_dict_refuses_what_it_cannot_know(tmp_path):
    """A square transposed conv in a bare state dict cannot be told from a conv: the jax layout
    is refused (a model knows, and round-trips exactly)."""
    from mconv import nn

    model = nn.Sequential(nn.ConvTranspose2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    with pytest.raises(CheckpointError, match=r"(?s)2 tensor.*0\.weight: \[4, 4, 3, 3\].*unknown kind"):
        layouts.save_safetensors(model.state_dict(), tmp_path / "j.safetensors", layout="jax")
    assert not (tmp_path / "j.safetensors").exists()
    layouts.save_safetensors(model, tmp_path / "j.safetensors", layout="jax")
    fresh = nn.Sequential(nn.ConvTranspose2d(4, 4, 3), nn.Conv2d(4, 4, 3))
    layouts.load_into(fresh, tmp_path / "j.safetensors")
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        np.testing.assert_array_equal(a, b, err_msg=name)


def _onnx_model(path, rng):
    """Conv (grouped), ConvTranspose, BatchNormalization, Gemm(transB=1); the transposed weight
    held in a Constant node, and a depthwise Conv inside an If branch."""
    import onnx
    from onnx import helper, numpy_helper

    w = {"conv.w": rng.standard_normal((6, 2, 3, 3)), "up.w": rng.standard_normal((6, 4, 2, 2)),
         "bn.s": rng.standard_normal(4), "bn.b": rng.standard_normal(4),
         "bn.m": rng.standard_normal(4), "bn.v": rng.uniform(1, 2, 4),
         "fc.w": rng.standard_normal((3, 4)), "dw.w": rng.standard_normal((4, 1, 3, 3))}  # fmt: skip
    w = {k: v.astype(np.float32) for k, v in w.items()}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items() if k not in ("up.w", "dw.w")]
    const = helper.make_node("Constant", [], ["up.w"], value=numpy_helper.from_array(w["up.w"], "up.w"))
    branch = helper.make_graph([helper.make_node("Conv", ["z", "dw.w"], ["o"], group=4)], "b", [],
                               [helper.make_tensor_value_info("o", 1, None)],
                               [numpy_helper.from_array(w["dw.w"], "dw.w")])  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["y"], group=3),
        const,
        helper.make_node("ConvTranspose", ["y", "up.w"], ["z"]),
        helper.make_node("BatchNormalization", ["z", "bn.s", "bn.b", "bn.m", "bn.v"], ["n"]),
        helper.make_node("Gemm", ["f", "fc.w"], ["g"], transB=1),
        helper.make_node("If", ["c"], ["o"], then_branch=branch, else_branch=branch),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 6, 5, 5])],
                              [helper.make_tensor_value_info("o", 1, None)], inits)  # fmt: skip
    onnx.save(helper.make_model(graph), str(path))
    return w


def test_onnx_structure_gives_every_role(tmp_path, rng):
    w = _onnx_model(tmp_path / "m.onnx", rng)
    ckpt = layouts.load_checkpoint(tmp_path / "m.onnx")
    assert sorted(ckpt.tensors) == sorted(w)  # Constant nodes and subgraphs included
    s = ckpt.specs
    assert s["conv.w"] == ParamSpec("conv_weight", "conv", 3, 2)
    assert s["up.w"] == ParamSpec("conv_weight", "conv_transpose", 1, 2)
    assert s["dw.w"] == ParamSpec("conv_weight", "depthwise", 4, 2)
    assert s["bn.v"].role == "bn_stat" and s["fc.w"].role == "linear_weight"
    out = convert(str(tmp_path / "m.onnx"), str(tmp_path / "k.safetensors"), to_framework="tensorflow")
    # Keras: conv (*k, I/G, O); transposed (*k, O, I); depthwise (*k, C, M); Dense (in, out)
    np.testing.assert_array_equal(out["conv.w"], w["conv.w"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(out["up.w"], w["up.w"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(out["dw.w"], w["dw.w"].reshape(4, 1, 3, 3).transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(out["fc.w"], w["fc.w"].T)
    mge = convert(str(tmp_path / "m.onnx"), str(tmp_path / "m.pkl"), to_framework="megengine")
    assert mge["conv.w"].shape == (3, 2, 2, 3, 3) and mge["dw.w"].shape == (4, 1, 1, 3, 3)


def test_spec_file_patterns_shapes_and_contradictions(tmp_path, rng):
    src = tmp_path / "sd.pt"
    torch.save({"a.weight": torch.zeros(8, 2, 3, 3), "b.weight": torch.zeros(8, 1, 3, 3),
                "bn.weight": torch.zeros(8), "bn.running_mean": torch.zeros(8),
                "bn.running_var": torch.ones(8)}, src)  # fmt: skip
    spec = tmp_path / "s.json"
    spec.write_text('{"b.weight": {"kind": "depthwise", "groups": 8}, "*": {"groups": 4}}')
    out = convert(str(src), str(tmp_path / "m.pkl"), to_framework="megengine", spec=spec)
    assert out["a.weight"].shape == (4, 2, 2, 3, 3) and out["b.weight"].shape == (8, 1, 1, 3, 3)
    assert out["bn.weight"].shape == (8,)  # the pattern fits conv weights only
    (tmp_path / "m.pkl").unlink()
    spec.write_text('{"nope.*": {"groups": 2}}')
    with pytest.raises(CheckpointError, match=r"no tensor is named or matched by 'nope\.\*'"):
        convert(str(src), str(tmp_path / "m.pkl"), to_framework="megengine", spec=spec)
    spec.write_text('{"a.weight": {"groups": 2, "shape": [8, 2, 5, 5]}}')
    with pytest.raises(CheckpointError, match=r"says shape \[8, 2, 5, 5\], but the tensor a\.weight is \[8, 2, 3, 3\]"):
        convert(str(src), str(tmp_path / "m.pkl"), to_framework="megengine", spec=spec)
    spec.write_text('{"a.weight": {"groups": "two"}}')
    with pytest.raises(CheckpointError, match=r"groups='two', but groups must be a positive integer"):
        convert(str(src), str(tmp_path / "m.pkl"), to_framework="megengine", spec=spec)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2))
    torch.save(model, tmp_path / "full.pt")
    spec.write_text('{"0.weight": {"groups": 4}}')
    with pytest.raises(CheckpointError, match=r"0\.weight: pickled Conv2d module says groups=2, --spec"):
        convert(str(tmp_path / "full.pt"), str(tmp_path / "m.pkl"), to_framework="megengine", spec=spec)
    assert not (tmp_path / "m.pkl").exists()


def test_inspect_spec_out_round_trips(tmp_path):
    src = tmp_path / "sd.pt"
    torch.save({"a.weight": torch.zeros(8, 2, 3, 3), "a.bias": torch.zeros(8)}, src)
    done = _mconv("inspect", src, "--spec-out", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr
    import json

    entries = json.loads((tmp_path / "s.json").read_text())
    assert entries["a.weight"] == {"role": "conv_weight", "kind": None, "groups": None, "ndim": 2,
                                   "shape": [8, 2, 3, 3]}  # fmt: skip
    entries["a.weight"].update(kind="conv", groups=2)
    (tmp_path / "s.json").write_text(json.dumps(entries))
    done = _mconv("convert", src, tmp_path / "m.pkl", "--to", "megengine", "--spec", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr


def test_merge_and_needs_in_isolation():
    unknown = ParamSpec("conv_weight", ndim=2)
    assert needs(unknown, "torch", "onnx") == [] and needs(unknown, "torch", "oneflow") == []
    assert [m.split(" ")[0] for m in needs(unknown, "torch", "megengine")] == ["groups"]
    assert [m.split(":")[0] for m in needs(unknown, "jax", "torch")] == ["kind"]
    merged = merge([("a", {"w": ParamSpec("conv_weight", "conv")}),
                    ("b", {"w": ParamSpec("conv_weight", groups=2, ndim=2)})], ["w", "x"])  # fmt: skip
    assert merged["w"] == ParamSpec("conv_weight", "conv", 2, 2) and merged["x"].role == "other"
    facts = shape_facts({"k": np.zeros((3, 3, 4, 2)), "depthwise_kernel": np.zeros((3, 3, 4, 2))},
                        "tensorflow")  # fmt: skip
    assert facts["depthwise_kernel"] == ParamSpec("conv_weight", "depthwise", 4, 2)


# -- issue 12, item 6: the small defects ---------------------------------------------------


def test_inspect_of_a_file_without_tensors(tmp_path):
    import onnx
    from onnx import helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])])  # fmt: skip
    onnx.save(helper.make_model(graph), str(tmp_path / "empty.onnx"))
    done = _mconv("inspect", tmp_path / "empty.onnx")
    assert done.returncode == 0, done.stderr
    assert "0 tensors, 0 elements" in done.stdout


def test_inspect_into_a_closed_pipe_exits_quietly(tmp_path):
    src = tmp_path / "many.pt"
    torch.save({f"layer{i}.weight": torch.zeros(2) for i in range(3000)}, src)
    done = subprocess.run(f"{sys.executable} -m mconv inspect {src} | head -1; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_missing_output_folder_names_the_destination(tmp_path, sample_files):
    dst = tmp_path / "no" / "such" / "out.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"cannot write '{dst}': no such directory"):
        convert(str(sample_files["safetensors"]), str(dst))


def test_groups_on_a_tensor_that_is_not_a_conv_weight(tmp_path, sample_files):
    done = _mconv("convert", sample_files["torch-zip"], tmp_path / "o.pkl", "--groups", "head.weight=2")
    assert done.returncode == 1 and "kind=None" not in done.stderr
    assert ("--groups and --kind apply to conv weights (3 or more dimensions), but head.weight is "
            "of size [3, 4]: got --groups head.weight=2") in done.stderr


def test_onnx_folder_reached_through_a_symlink(tmp_path, rng):
    import onnx

    real = tmp_path / "real"
    real.mkdir()
    w = _onnx_model(real / "m.onnx", rng)
    model = onnx.load(str(real / "m.onnx"))
    onnx.save_model(model, str(real / "ext.onnx"), save_as_external_data=True,
                    location="weights.bin", size_threshold=0)  # fmt: skip
    os.symlink(real, tmp_path / "link")
    tensors = layouts.load_checkpoint(tmp_path / "link" / "ext.onnx").tensors
    np.testing.assert_array_equal(tensors["conv.w"], w["conv.w"])


def test_whole_model_refusals_hint_at_state_dict(tmp_path):
    evil = tmp_path / "evil.pt"
    # a whole-model pickle that also calls a function: still refused, with the way out
    import zipfile

    payload = (b"\x80\x02ctorch.nn.modules.conv\nConv2d\nq\x00)\x81q\x01cposix\nsystem\nq\x02"
               b"X\x04\x00\x00\x00trueq\x03\x85q\x04Rq\x05\x86q\x06.")  # fmt: skip
    with zipfile.ZipFile(evil, "w") as z:
        z.writestr("evil/data.pkl", payload)
    with pytest.raises(CheckpointError, match=r"refusing to load the global posix\.system.*state_dict\(\)"):
        layouts.load_checkpoint(evil)
