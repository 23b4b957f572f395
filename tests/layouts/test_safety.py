"""Untrusted files: malicious pickles run nothing, forged sizes allocate nothing,
truncated or mutated files give CheckpointError and never anything else."""

import collections
import io
import json
import os
import pickle
import subprocess
import zipfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import layouts
from layouts import CheckpointError, UnsafePickleError

from conftest import sample_state


class _Exploit:
    """Pickles as ``callable(*args)``: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _torch_zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", payload)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")


EXPLOITS = [
    ("posix.system", lambda marker: _Exploit(os.system, f"touch {marker}")),
    ("builtins.eval", lambda marker: _Exploit(eval, f"open({str(marker)!r}, 'w')")),
    ("builtins.exec", lambda marker: _Exploit(exec, f"open({str(marker)!r}, 'w')")),
    ("subprocess.Popen", lambda marker: _Exploit(subprocess.Popen, ["touch", str(marker)])),
    ("builtins.getattr", lambda marker: _Exploit(getattr, print, "__call__")),
    ("io.open", lambda marker: _Exploit(io.open, str(marker), "w")),
]


@pytest.mark.parametrize("container", ["torch-zip", "pickle"])
@pytest.mark.parametrize("name,make", EXPLOITS, ids=[e[0] for e in EXPLOITS])
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, container, name, make):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": make(marker)}, protocol=4)
    path = tmp_path / ("evil.pt" if container == "torch-zip" else "evil.pkl")
    if container == "torch-zip":
        _torch_zip_with_pickle(path, payload)
    else:
        path.write_bytes(payload)
    with pytest.raises(UnsafePickleError, match=rf"refusing to load the global {name}"):
        layouts.load_checkpoint(path)
    assert not marker.exists()


def test_reduce_through_an_allowed_rebuild_function_cannot_reach_a_forbidden_callable(tmp_path):
    """_rebuild_from_type_v2(func, ...) calls func: func itself must pass the allowlist."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(
        _Exploit(torch._tensor._rebuild_from_type_v2, os.system, object, (f"touch {marker}",), {})
    )
    path = tmp_path / "evil.pt"
    _torch_zip_with_pickle(path, payload)
    with pytest.raises(UnsafePickleError, match="posix.system"):
        layouts.load_checkpoint(path)
    assert not marker.exists()


def test_numpy_object_arrays_are_refused(tmp_path):
    path = tmp_path / "objects.pkl"
    with open(path, "wb") as f:
        pickle.dump({"w": np.array([1, "x"], dtype=object)}, f)
    with pytest.raises(UnsafePickleError, match="object arrays"):
        layouts.load_checkpoint(path)


# -- forged sizes and offsets ---------------------------------------------------------------


class _Storage:
    """Pickles as the persistent id torch writes for a storage."""

    def __init__(self, numel, key="0"):
        self.numel, self.key = numel, key


def _forged_torch_zip(path, storage_numel, data_bytes, size, stride, offset=0):
    """A zip checkpoint with one float tensor whose records we choose."""
    buffer = io.BytesIO()

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
            return None

    tensor = _Exploit(torch._utils._rebuild_tensor_v2, _Storage(storage_numel), offset, size, stride,
                      False, collections.OrderedDict())  # fmt: skip
    Pickler(buffer, protocol=2).dump({"w": tensor})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/data/0", b"\0" * data_bytes)


@pytest.mark.parametrize("numel,nbytes,size,stride,offset,pattern", [
    (10**12, 16, (4,), (1,), 0, r"declares 1000000000000 elements but holds 16 bytes"),
    (4, 16, (5,), (1,), 0, r"reaches element 4 of a storage of 4 elements"),
    (4, 16, (2, 2), (1, 3), 0, r"reaches element 4"),
    (4, 16, (2,), (1,), 3, r"reaches element 4"),
    (4, 16, (10**9, 10**9), (1, 1), 0, r"reaches element"),
    (4, 16, (2,), (-1,), 0, r"non-negative ints"),
])  # fmt: skip
def test_forged_tensor_records_are_refused(tmp_path, numel, nbytes, size, stride, offset, pattern):
    path = tmp_path / "forged.pt"
    _forged_torch_zip(path, numel, nbytes, size, stride, offset)
    with pytest.raises(CheckpointError, match=pattern):
        layouts.load_checkpoint(path)


def _safetensors(path, header: dict, data: bytes, header_length=None):
    raw = json.dumps(header).encode()
    length = len(raw) if header_length is None else header_length
    path.write_bytes(length.to_bytes(8, "little") + raw + data)


@pytest.mark.parametrize("header,data,length,pattern", [
    ({"w": {"dtype": "F32", "shape": [10**12], "data_offsets": [0, 4 * 10**12]}}, b"\0" * 8, None,
     r"tensors cover 4000000000000 bytes but the data region holds 8"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**15,
     r"header of 1000000000000000 bytes does not fit"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, r"overlaps the previous tensor"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, r"leaves a hole"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, r"needs 12 bytes"),
    ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, r"unknown safetensors dtype 'X9'"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, r"malformed shape"),
    ({"__metadata__": {"k": 1}}, b"", None, r"__metadata__ must map strings to strings"),
])  # fmt: skip
def test_forged_safetensors_headers_are_refused(tmp_path, header, data, length, pattern):
    path = tmp_path / "forged.safetensors"
    _safetensors(path, header, data, length)
    with pytest.raises(CheckpointError, match=pattern):
        layouts.load_checkpoint(path)


def test_overlapping_zip_storages_are_refused(tmp_path):
    """Two storage records whose central-directory entries point at the same bytes."""
    source = tmp_path / "two.pt"
    torch.save({"a": torch.ones(4), "b": torch.zeros(4)}, source)
    raw = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        infos = {i.filename.rsplit("/", 1)[-1]: i for i in archive.infolist()}
    # patch the central directory entry of storage "1" to reuse storage "0"'s local header
    a, b = infos["0"].header_offset, infos["1"].header_offset
    name_b = infos["1"].filename.encode()
    central = raw.find(name_b, raw.find(b"PK\x01\x02")) - 46
    assert (
        raw[central : central + 4] == b"PK\x01\x02"
        and int.from_bytes(raw[central + 42 : central + 46], "little") == b
    )
    raw[central + 42 : central + 46] = a.to_bytes(4, "little")
    forged = tmp_path / "overlap.pt"
    forged.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="overlap|local header"):
        layouts.load_checkpoint(forged)


# -- truncation and fuzzing -----------------------------------------------------------------

FORMATS = ["torch-zip", "torch-legacy", "safetensors", "megengine", "onnx"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files_give_a_clear_error(tmp_path, sample_files, fmt):
    data = sample_files[fmt].read_bytes()
    suffix = sample_files[fmt].suffix
    for cut in sorted({1, 8, 9, 40, len(data) // 3, len(data) // 2, len(data) - 9, len(data) - 1}):
        path = tmp_path / f"cut{cut}{suffix}"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError):
            layouts.load_checkpoint(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_files_load(sample_files, fmt):
    ckpt = layouts.load_checkpoint(sample_files[fmt])
    for name, value in sample_state().items():
        np.testing.assert_array_equal(ckpt.tensors[name], value, err_msg=f"{fmt} {name}")


@pytest.mark.parametrize("fmt", FORMATS)
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_files_never_crash(tmp_path, sample_files, fmt, data):
    """Random byte flips, insertions and cuts: either a valid load or CheckpointError."""
    raw = bytearray(sample_files[fmt].read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "byte", "cut", "insert"]))
        if action == "flip":
            raw[position] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "byte":
            raw[position] = data.draw(st.integers(0, 255))
        elif action == "cut" and len(raw) > 16:
            del raw[position : position + data.draw(st.integers(1, 16))]
        else:
            raw[position:position] = bytes(data.draw(st.binary(min_size=1, max_size=8)))
    path = tmp_path / f"mutated{sample_files[fmt].suffix}"
    path.write_bytes(bytes(raw))
    try:
        ckpt = layouts.load_checkpoint(path)
    except CheckpointError:
        return
    for array in ckpt.tensors.values():  # whatever loaded must be readable
        np.asarray(array).sum()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_pickles_of_every_protocol_load(tmp_path, protocol):
    state = sample_state()
    path = tmp_path / f"p{protocol}.pkl"
    with open(path, "wb") as f:
        pickle.dump(state, f, protocol=protocol)
    ckpt = layouts.load_checkpoint(path)
    assert ckpt.framework == "megengine"
    for name, value in state.items():
        np.testing.assert_array_equal(ckpt.tensors[name], value)
