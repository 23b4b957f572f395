"""OneFlow checkpoints written the way OneFlow writes them, without oneflow, then read back
and compared with the arrays that were written.

What OneFlow does (python/oneflow/framework/check_point_v2.py):
- ``_SaveVarDict`` (<= 0.5) / ``_save_tensor_to_disk``: ``<dir>/<name>/out`` is
  ``tensor.numpy().tobytes()``, ``<dir>/<name>/meta`` is ``text_format.MessageToString`` of a
  ``VariableMetaInfo``; ``snapshot_done`` marks a finished legacy save.
- ``save`` (0.6 - 0.9 directories, 1.0 single file): ``pickle.dumps({"protocol_version": 1,
  [magic: None,] "data": obj})``; a tensor pickles through ``tensor_getstate`` as
  ``{"path": "tensor_<n>"}`` (directory) or ``{"data", "dtype", "device"}`` (single file).
- oneflow/api/python/framework/tensor.cpp: ``Tensor.__module__ == "oneflow"``,
  ``Parameter.__module__ == "oneflow.nn"``; dtype.cpp: ``oneflow._oneflow_internal.dtype``
  pickles (pybind11 ``py::pickle``) as its ``DataType`` number.
The stand-in classes below have those module names and that ``__getstate__``, so the real
``pickle.dumps`` (protocol 4, Python's default from 3.8 to 3.13) writes the same opcodes.
"""

import os
import pickle
import pickletools
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import layouts
from layouts import CheckpointError, UnsafePickleError
from layouts.oneflow_format import is_oneflow_checkpoint, read_oneflow

# oneflow/core/common/data_type.proto
DATA_TYPES = {
    np.dtype(np.float32): (2, "kFloat"), np.dtype(np.float64): (3, "kDouble"),
    np.dtype(np.int8): (4, "kInt8"), np.dtype(np.int32): (5, "kInt32"),
    np.dtype(np.int64): (6, "kInt64"), np.dtype(np.uint8): (7, "kUInt8"),
    np.dtype(np.float16): (9, "kFloat16"), np.dtype(np.bool_): (12, "kBool"),
}  # fmt: skip
KBFLOAT16 = (11, "kBFloat16")


class Bf16:
    """A bfloat16 tensor to write: its raw bits (numpy has no bfloat16)."""

    def __init__(self, values):
        self.values = np.asarray(values, np.float32)
        self.bits = (self.values.view(np.uint32) >> 16).astype(np.uint16)


class Tensor:
    """Pickles like ``oneflow.Tensor``: ``copyreg.__newobj__(cls)`` then BUILD(state)."""

    __module__ = "oneflow"

    def __init__(self, state):
        self.state = state

    def __getstate__(self):
        return self.state


class Parameter(Tensor):
    __module__ = "oneflow.nn"


class DType:
    """Pickles like ``oneflow.dtype``: NEWOBJ then BUILD(DataType number)."""

    __module__ = "oneflow._oneflow_internal"
    __qualname__ = "dtype"

    def __init__(self, code):
        self.code = code

    def __getstate__(self):
        return self.code


DTYPES = {code: DType(code) for code, _ in [*DATA_TYPES.values(), KBFLOAT16]}  # singletons


@pytest.fixture
def oneflow_modules(monkeypatch):
    """Importable ``oneflow`` names for the stand-ins, so ``pickle`` can write them."""
    for name, attrs in [("oneflow", {"Tensor": Tensor}), ("oneflow.nn", {"Parameter": Parameter}),
                        ("oneflow._oneflow_internal", {"dtype": DType})]:  # fmt: skip
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, module)


def meta_text(shape, data_type):
    """``text_format.MessageToString(VariableMetaInfo)``, as OneFlow writes ``meta``."""
    dims = "".join(f"  dim: {d}\n" for d in shape)
    return f"shape {{\n{dims}}}\ndata_type: {data_type}\n"


def raw_and_type(value):
    if isinstance(value, Bf16):
        return value.bits, KBFLOAT16
    return np.array(value, order="C"), DATA_TYPES[value.dtype]  # (ascontiguousarray: ndim >= 1)


def write_variable(var_dir, value, meta=None):
    """``_save_tensor_to_disk``: ``out`` (raw little-endian bytes) and ``meta``."""
    raw, (_, name) = raw_and_type(value)
    os.makedirs(var_dir)
    with open(os.path.join(var_dir, "out"), "wb") as f:
        f.write(raw.astype(raw.dtype.newbyteorder("<")).tobytes())
    with open(os.path.join(var_dir, "meta"), "w") as f:
        f.write(meta if meta is not None else meta_text(raw.shape, name))


def save_legacy(root, tensors):
    """``_SaveVarDict``: ``os.path.join(root, name)`` per variable, then ``snapshot_done``."""
    os.makedirs(root)
    for name, value in tensors.items():
        write_variable(os.path.join(root, name), value)
    open(os.path.join(root, "snapshot_done"), "w").close()
    return str(root)


def map_leaves(obj, fn):
    if isinstance(obj, dict):
        return type(obj)((k, map_leaves(v, fn)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_leaves(v, fn) for v in obj)
    return fn(obj) if isinstance(obj, (np.ndarray, Bf16)) else obj


def save_pickled_dir(root, obj, magic=None, cls=Tensor):
    """``flow.save(obj, dir)`` (0.6 - 0.9; 1.0 with ``save_as_external_data=True``)."""
    os.makedirs(root)
    counter = iter(range(1000))

    def external(value):
        rel = f"tensor_{next(counter)}"
        write_variable(os.path.join(root, rel), value)
        return cls({"path": rel})

    header = {"protocol_version": 1, **({magic: None} if magic else {})}
    payload = pickle.dumps({**header, "data": map_leaves(obj, external)}, protocol=4)
    with open(os.path.join(root, "pickled_data"), "wb") as f:
        f.write(payload)
    return str(root)


def save_single_file(path, obj, magic="__oneflow__", cls=Tensor):
    """``flow.save(obj, file)`` (1.0): tensors inline as ``{"data", "dtype", "device"}``."""

    def inline(value):
        return cls({"data": value, "dtype": DTYPES[DATA_TYPES[value.dtype][0]], "device": "cpu"})

    payload = {"protocol_version": 1, magic: None, "data": map_leaves(obj, inline)}
    with open(path, "wb") as f:
        f.write(pickle.dumps(payload, protocol=4))
    return str(path)


def sample():
    rng = np.random.default_rng(0)
    return {
        "conv1.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "conv1.bias": rng.standard_normal(4).astype(np.float16),
        "steps": np.arange(-3, 3, dtype=np.int64).reshape(2, 3) * (1 << 40),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),  # a scalar, shape []
        "empty": np.zeros((0, 3), np.float32),
        "mask": np.array([True, False, True]),
    }


def assert_same(got, want):
    assert isinstance(got, np.ndarray), type(got)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape)
    np.testing.assert_array_equal(got, want)


# -- legacy directories ---------------------------------------------------------------------


def test_legacy_directory_with_nested_names(tmp_path):
    tensors = {**sample(), "layer1.0.conv.weight": np.ones((2, 2), np.float64),
               "block/conv/weight": np.full((3,), 5, np.int32)}  # fmt: skip
    root = save_legacy(tmp_path / "ckpt", tensors)
    assert os.path.isfile(tmp_path / "ckpt" / "block" / "conv" / "weight" / "out")
    assert is_oneflow_checkpoint(root)
    obj, meta = read_oneflow(root)
    assert meta == {"format": "oneflow-legacy", "snapshot_done": True}
    assert sorted(obj) == sorted(tensors)
    for name, want in tensors.items():
        assert_same(obj[name], want)
    assert not obj["conv1.weight"].flags.writeable  # a read-only memory map, not a copy


def test_meta_helper_matches_protobuf_text_format(tmp_path):
    """The ``meta`` files above are what protobuf's text_format writes for OneFlow's schema."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

    field = descriptor_pb2.FieldDescriptorProto
    schema = descriptor_pb2.FileDescriptorProto(
        name="of_meta.proto", package="oneflow", syntax="proto2"
    )
    enum = schema.enum_type.add(name="DataType")
    for number, name in [(0, "kInvalidDataType"), *DATA_TYPES.values(), KBFLOAT16]:
        enum.value.add(name=name, number=number)
    schema.message_type.add(name="ShapeProto").field.add(
        name="dim", number=1, type=field.TYPE_INT64, label=field.LABEL_REPEATED
    )
    info = schema.message_type.add(name="VariableMetaInfo")
    info.field.add(name="shape", number=2, type=field.TYPE_MESSAGE, label=field.LABEL_REQUIRED,
                   type_name=".oneflow.ShapeProto")  # fmt: skip
    info.field.add(name="data_type", number=3, type=field.TYPE_ENUM, label=field.LABEL_REQUIRED,
                   type_name=".oneflow.DataType")  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    message = message_factory.GetMessageClass(
        pool.FindMessageTypeByName("oneflow.VariableMetaInfo")
    )
    tensors = sample()
    os.makedirs(tmp_path / "ckpt")
    for name, array in tensors.items():
        meta = message()
        meta.shape.dim[:] = array.shape  # as _save_tensor_to_disk does
        meta.data_type = DATA_TYPES[array.dtype][0]
        text = text_format.MessageToString(meta)
        assert text == meta_text(array.shape, DATA_TYPES[array.dtype][1])
        write_variable(tmp_path / "ckpt" / name, array, meta=text)
    obj, _ = read_oneflow(str(tmp_path / "ckpt"))
    for name, want in tensors.items():
        assert_same(obj[name], want)


@pytest.mark.parametrize(
    "text",
    [
        "shape { dim: 2 dim: 3 } data_type: kInt32",
        "shape {\n  dim: 2\n  dim: 3\n}\ndata_type: 5\n",  # the enum as a number
        "# comment\nshape: < dim: [2, 3] >; data_type: kInt32;",  # other text-format spellings
        "shape { dim: 2 dim: 3 }\nstride { dim: 3 dim: 1 }\ndata_type: kInt32\n",  # newer schema
    ],
)
def test_meta_spellings(tmp_path, text):
    want = np.arange(6, dtype=np.int32).reshape(2, 3)
    write_variable(tmp_path / "ckpt" / "w", want, meta=text)
    assert_same(read_oneflow(str(tmp_path / "ckpt"))[0]["w"], want)


def test_meta_without_shape_is_a_scalar(tmp_path):
    """protobuf may leave an empty ``shape {}`` out of the text entirely."""
    write_variable(tmp_path / "ckpt" / "t", np.array(2.5, np.float64), meta="data_type: kDouble\n")
    assert_same(read_oneflow(str(tmp_path / "ckpt"))[0]["t"], np.array(2.5, np.float64))


BF16 = [1.0, -2.5, 0.15625, 65280.0, 0.0, -0.0]


def read_bf16(tmp_path, layout):
    value = Bf16(BF16)
    if layout == "legacy":
        return read_oneflow(save_legacy(tmp_path / "ckpt", {"w": value}))[0]["w"], value
    return read_oneflow(save_pickled_dir(tmp_path / "ckpt", {"w": value}))[0]["w"], value


@pytest.mark.parametrize("layout", ["legacy", "pickled-dir"])
def test_bfloat16_with_ml_dtypes(tmp_path, layout, oneflow_modules, monkeypatch):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    got, value = read_bf16(tmp_path, layout)
    assert got.dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(got.view(np.uint16), value.bits)
    np.testing.assert_array_equal(got.astype(np.float32), value.values)


@pytest.mark.parametrize("layout", ["legacy", "pickled-dir"])
def test_bfloat16_without_ml_dtypes_widens_to_float32(
    tmp_path, layout, oneflow_modules, monkeypatch
):
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # `import ml_dtypes` raises ImportError
    with pytest.warns(UserWarning, match="bfloat16"):
        got, value = read_bf16(tmp_path, layout)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), value.values.view(np.uint32))  # -0.0 kept


# -- pickled directories and single files ---------------------------------------------------


@pytest.mark.parametrize("magic", [None, "__oneflow__"])
@pytest.mark.parametrize("cls", [Tensor, Parameter])
def test_pickled_directory(tmp_path, oneflow_modules, magic, cls):
    tensors = sample()
    saved = {"model": tensors, "epoch": 3, "history": [tensors["conv1.bias"], 0.5]}
    root = save_pickled_dir(tmp_path / "ckpt", saved, magic=magic, cls=cls)
    assert sorted(os.listdir(root))[-1] == "tensor_6" and "snapshot_done" not in os.listdir(root)
    assert is_oneflow_checkpoint(root)
    obj, meta = read_oneflow(root)
    assert meta == {"format": "oneflow-pickled-dir", "protocol_version": 1, "magic_key": magic}
    assert (
        obj["epoch"] == 3 and obj["history"][1] == 0.5 and sorted(obj["model"]) == sorted(tensors)
    )
    for name, want in tensors.items():
        assert_same(obj["model"][name], want)
    assert_same(obj["history"][0], tensors["conv1.bias"])


@pytest.mark.parametrize("magic", ["__oneflow__", "oneflow"])
@pytest.mark.parametrize("cls", [Tensor, Parameter])
def test_single_file_pickle(tmp_path, oneflow_modules, magic, cls):
    tensors = sample()
    path = save_single_file(tmp_path / "model.of", {"state": tensors, "step": 9}, magic, cls)
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(Path(path).read_bytes())]
    assert ("SHORT_BINUNICODE", cls.__module__) in ops and ("NEWOBJ", None) in ops
    assert ("SHORT_BINUNICODE", "oneflow._oneflow_internal") in ops and ("BUILD", None) in ops
    assert is_oneflow_checkpoint(path)
    obj, meta = read_oneflow(path)
    assert meta == {"format": "oneflow-pickle", "protocol_version": 1, "magic_key": magic}
    assert obj["step"] == 9 and sorted(obj["state"]) == sorted(tensors)
    for name, want in tensors.items():
        assert_same(obj["state"][name], want)


def test_single_file_bfloat16_dtype_is_applied(tmp_path, oneflow_modules, monkeypatch):
    """OneFlow rebuilds ``flow.tensor(data, dtype=dtype)``: the declared dtype wins."""
    values = np.array(BF16, np.float32)
    payload = {"protocol_version": 1, "__oneflow__": None,
               "data": {"w": Tensor({"data": values, "dtype": DTYPES[11], "device": "cpu"})}}  # fmt: skip
    (tmp_path / "f").write_bytes(pickle.dumps(payload, protocol=4))
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    got = read_oneflow(str(tmp_path / "f"))[0]["w"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values)


def test_load_checkpoint_reads_oneflow(tmp_path):
    root = save_legacy(tmp_path / "ckpt", {"conv.weight": np.ones((2, 1, 3, 3), np.float32)})
    ckpt = layouts.load_checkpoint(root)
    assert ckpt.framework == "oneflow" and ckpt.metadata["format"] == "oneflow-legacy"
    assert_same(ckpt.tensors["conv.weight"], np.ones((2, 1, 3, 3), np.float32))


def test_sniff_rejects_other_things(tmp_path):
    import torch

    (tmp_path / "empty").mkdir()
    torch.save({"w": torch.ones(2)}, tmp_path / "t.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"protocol_version": 1, "w": np.ones(2)}))
    (tmp_path / "junk").write_bytes(b"\x80\x04junk")
    for name in ["empty", "t.pt", "plain.pkl", "junk", "missing"]:
        assert not is_oneflow_checkpoint(str(tmp_path / name)), name


# -- refused input --------------------------------------------------------------------------


def test_meta_shape_disagrees_with_out_size(tmp_path):
    write_variable(
        tmp_path / "ckpt" / "w", np.zeros(7, np.float32), meta=meta_text((2, 3), "kFloat")
    )
    with pytest.raises(CheckpointError, match=r"w/out: meta declares shape \[2, 3\] of kFloat "
                       r"\(24 bytes\), but the file holds 28 bytes$"):  # fmt: skip
        read_oneflow(str(tmp_path / "ckpt"))


def test_truncated_out(tmp_path):
    root = save_legacy(tmp_path / "ckpt", {"w": np.ones((4, 4), np.float64)})
    with open(os.path.join(root, "w", "out"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"w/out: .*holds 100 bytes \(truncated\)"):
        read_oneflow(root)


@pytest.mark.parametrize(
    "text, match",
    [
        ("\x00\x17\x99garbage", "malformed meta"),
        ("shape { dim: two } data_type: kFloat", "malformed meta: expected an integer"),
        ("shape { dim: 2 data_type: kFloat", "malformed meta"),
        ("shape { dim: 2 } data_type: kFloat shape { dim: 2 }", "repeated field 'shape'"),
        ("shape { dim: 2 } dtype: kFloat", "unexpected or repeated field 'dtype'"),
        ("shape { dim: 2 }", "no data_type"),
        ("shape { dim: 2 } data_type: kFloat128", "unknown OneFlow data_type 'kFloat128'"),
        ("shape { dim: 2 } data_type: 99", "unknown OneFlow data_type 99"),
        ("shape { dim: 2 } data_type: kOFRecord", "kOFRecord holds no plain array"),
        ("shape { dim: -2 } data_type: kFloat", r"invalid shape \[-2\]"),
    ],
)
def test_garbage_meta(tmp_path, text, match):
    write_variable(tmp_path / "ckpt" / "w", np.zeros(2, np.float32), meta=text)
    with pytest.raises(CheckpointError, match=match) as info:
        read_oneflow(str(tmp_path / "ckpt"))
    assert os.path.join("w", "meta") in str(info.value)


def test_missing_meta_and_non_regular_out(tmp_path):
    root = save_legacy(tmp_path / "ckpt", {"w": np.zeros(2, np.float32)})
    os.remove(os.path.join(root, "w", "meta"))
    with pytest.raises(CheckpointError, match=r"w/meta: missing"):
        read_oneflow(root)
    root = save_legacy(tmp_path / "ckpt2", {"w": np.zeros(2, np.float32)})
    os.remove(os.path.join(root, "w", "out"))
    os.mkfifo(os.path.join(root, "w", "out"))  # would block a reader that opens it
    with pytest.raises(CheckpointError, match=r"w/out: not a regular file"):
        read_oneflow(root)


class System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)  # pickles as posix.system


@pytest.mark.parametrize("layout", ["pickled-dir", "single-file"])
def test_pickle_asking_for_posix_system_is_refused(tmp_path, layout):
    marker = tmp_path / "ran"
    payload = pickle.dumps(
        {"protocol_version": 1, "__oneflow__": None, "data": {"w": System(marker)}}
    )
    path = tmp_path / ("ckpt" if layout == "pickled-dir" else "model.of")
    if layout == "pickled-dir":
        path.mkdir()
        (path / "pickled_data").write_bytes(payload)
    else:
        path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=r"posix\.system"):
        read_oneflow(str(path))
    assert not marker.exists()


def test_tensor_paths_outside_the_directory_are_refused(tmp_path, oneflow_modules):
    write_variable(tmp_path / "outside", np.ones(2, np.float32))  # a valid variable, elsewhere
    root = tmp_path / "ckpt"
    root.mkdir()
    os.symlink(tmp_path / "outside", root / "tensor_0")
    for rel in ["../outside", str(tmp_path / "outside"), "tensor_0", "a/../../outside", "", 5]:
        payload = {"protocol_version": 1, "data": {"w": Tensor({"path": rel})}}
        (root / "pickled_data").write_bytes(pickle.dumps(payload, protocol=4))
        with pytest.raises(CheckpointError, match="refusing the tensor path"):
            read_oneflow(str(root))


def test_data_file_symlink_leaving_the_directory_is_refused(tmp_path, oneflow_modules):
    (tmp_path / "secret").write_bytes(np.ones(2, np.float32).tobytes())  # the right size
    root = save_pickled_dir(tmp_path / "ckpt", {"w": np.zeros(2, np.float32)})
    out = os.path.join(root, "tensor_0", "out")
    os.remove(out)
    os.symlink(tmp_path / "secret", out)
    with pytest.raises(CheckpointError, match=r"tensor_0/out: a symlink that leaves"):
        read_oneflow(root)


def test_legacy_symlink_leaving_the_directory_is_refused(tmp_path):
    write_variable(tmp_path / "outside", np.ones(2, np.float32))
    root = save_legacy(tmp_path / "ckpt", {"w": np.zeros(2, np.float32)})
    os.symlink(tmp_path / "outside", os.path.join(root, "v"))
    with pytest.raises(CheckpointError, match="a symlink that leaves the checkpoint directory"):
        read_oneflow(root)


@pytest.mark.parametrize(
    "payload, match",
    [
        ([1, 2], "not a OneFlow pickle"),
        ({"protocol_version": 1, "data": {}}, "not a OneFlow pickle"),  # no magic key
        ({"protocol_version": 2, "__oneflow__": None, "data": {}}, "protocol_version 2"),
        (
            {"protocol_version": 1, "__oneflow__": None, "data": Tensor({"path": "tensor_0"})},
            "single-file checkpoint has none",
        ),  # fmt: skip
        (
            {"protocol_version": 1, "__oneflow__": None, "data": Tensor({"data": [1.0]})},
            "neither 'path' nor an array 'data'",
        ),  # fmt: skip
        ({"protocol_version": 1, "__oneflow__": None, "data": Tensor([1])}, "not a dict"),
    ],
)
def test_malformed_single_file(tmp_path, oneflow_modules, payload, match):
    (tmp_path / "f").write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(CheckpointError, match=match):
        read_oneflow(str(tmp_path / "f"))


def test_truncated_pickle(tmp_path, oneflow_modules):
    path = save_single_file(tmp_path / "model.of", sample())
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.of: corrupted pickle"):
        read_oneflow(path)


def mutations(data, seed, count):
    """Deterministic random byte flips, deletions and insertions of ``data``."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        out = bytearray(data)
        for _ in range(rng.integers(1, 5)):
            i, op = int(rng.integers(len(out))), rng.random()
            if op < 0.5:
                out[i] = int(rng.integers(256))
            elif op < 0.75:
                del out[i : i + int(rng.integers(1, 9))]
            else:
                out[i:i] = (
                    rng.integers(256, size=int(rng.integers(1, 5))).astype(np.uint8).tobytes()
                )
        yield bytes(out)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numpy's own noise
def test_corrupted_files_raise_checkpoint_error_only(tmp_path, oneflow_modules):
    """Corrupted pickles and meta files either load or raise CheckpointError; nothing else."""
    single = save_single_file(tmp_path / "model.of", sample())
    root = save_pickled_dir(tmp_path / "ckpt", sample())
    meta = os.path.join(root, "tensor_0", "meta")
    originals = {path: Path(path).read_bytes() for path in [single, meta]}
    for path, original in originals.items():
        target = single if path == single else root
        for corrupted in mutations(original, seed=len(path), count=300):
            Path(path).write_bytes(corrupted)
            try:
                is_oneflow_checkpoint(target)
                read_oneflow(target)
            except CheckpointError:
                pass
        Path(path).write_bytes(original)
