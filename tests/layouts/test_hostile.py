"""Crafted hostile files (hostile_files.py): each is refused with a CheckpointError that
names the problem, or loads within its memory budget; none crashes, hangs or leaks
another exception type. They are loaded in one child process: a segfault fails a test
here instead of killing pytest; a FIFO that blocks would time the child out."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import layouts
from layouts import CheckpointError

import hostile_files

HERE = os.path.dirname(os.path.abspath(__file__))
MiB = 2**20


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("hostile"))
    hostile_files.make_all(folder)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(HERE)),
                                                        os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    proc = subprocess.run([sys.executable, os.path.join(HERE, "hostile_files.py"), "load", folder],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    results = {line["case"]: line for line in lines if "started" not in line}
    started = [line["case"] for line in lines if "started" in line]
    return results, started, proc


@pytest.mark.parametrize("case", list(hostile_files.CASES))
def test_hostile_file(outcomes, case):
    results, started, proc = outcomes
    if case not in results:
        pytest.fail(f"the child died (exit {proc.returncode}) while loading {started[-1]!r}: "
                    f"{proc.stderr[-2000:]}")  # fmt: skip
    result, expected = results[case], hostile_files.EXPECTED[case]
    if expected is None:
        assert result["outcome"] == "ok", result
        assert not result["writeable"]
    else:
        assert result["outcome"] in ("CheckpointError", "UnsafePickleError"), result
        import re

        assert re.search(expected, result["message"]), result["message"]
    assert result["rss_growth_mib"] < 64, result


def test_expanded_tensor_is_a_read_only_view(tmp_path):
    """torch.zeros(1).expand(2**26): 256 MiB dense, kept as a stride-0 view of 4 bytes."""
    path = tmp_path / "expanded.pt"
    torch.save({"w": torch.zeros(1).expand(2**26), "t": torch.arange(6.0).view(2, 3).t()}, path)
    ckpt = layouts.load_checkpoint(path)
    w = ckpt.tensors["w"]
    assert w.shape == (2**26,) and w.strides == (0,) and not w.flags.writeable
    np.testing.assert_array_equal(ckpt.tensors["t"], np.arange(6.0, dtype=np.float32).reshape(2, 3).T)


def test_a_refused_build_does_not_poison_later_loads(tmp_path):
    """BUILD on the shared torch.FloatStorage stand-in is refused, and the next real
    checkpoint still loads as float32."""
    poisoned = hostile_files.CASES["storage-poisoning"](str(tmp_path))
    with pytest.raises(CheckpointError, match="modifies an allowlisted global"):
        layouts.load_checkpoint(poisoned)
    from layouts.torch_format import TORCH_GLOBALS

    storage = TORCH_GLOBALS[("torch", "FloatStorage")]
    with pytest.raises(CheckpointError, match="refusing to change the stand-in StorageType"):
        storage.dtype = None
    with pytest.raises(CheckpointError, match="refusing to set the state"):
        storage.__setstate__({"dtype": None})
    path = tmp_path / "real.pt"
    torch.save({"w": torch.arange(4, dtype=torch.float32)}, path)
    loaded = layouts.load_checkpoint(path).tensors["w"]
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, np.arange(4, dtype=np.float32))


def test_big_endian_and_strided_views_share_one_converted_storage(tmp_path):
    """Byte-swapped storages are converted once, then every tensor is a view of that copy."""
    from layouts.torch_format import StorageHandle, StorageType, TensorRef, TorchDType, resolve_tensors

    handle = StorageHandle()
    raw = np.arange(4, dtype=">f4").view(np.uint8)
    storages = {handle: (raw, StorageType(TorchDType("float")))}
    refs = {"a": TensorRef(handle, 0, (3, 4), (0, 1), None), "b": TensorRef(handle, 1, (2,), (2,), None)}
    out = resolve_tensors(refs, storages, True, "x")
    np.testing.assert_array_equal(out["a"], np.tile(np.arange(4, dtype=np.float32), (3, 1)))
    np.testing.assert_array_equal(out["b"], [1.0, 3.0])
    assert out["a"].dtype == np.float32 and not out["a"].flags.writeable
