"""Streaming writes (layouts.sink): the kernel copy, the transposing copy and the plain
write from memory give the same files as the straightforward writers, and every output
shows its progress bar."""

import io
import json
import os
import pickle

import numpy as np
import pytest
import torch

import layouts
from layouts import sink
from layouts.convert import convert
from layouts.errors import CheckpointError
from layouts.files import MappedFile

OUTPUTS = [(to, suffix) for to in layouts.FRAMEWORKS for suffix in (".safetensors", ".pkl")]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A torch zip file with tensors above the pickler's 64 KiB frame (so they stream),
    a float16 one, a transposed (non-contiguous) one, a bias and a 0-d scalar."""
    root = tmp_path_factory.mktemp("sink")
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(64, 32, 3, 3, generator=g), "a.bias": torch.randn(64, generator=g),
             "b.weight": torch.randn(128, 64, 3, 3, generator=g).half(),
             "t.weight": torch.randn(64, 96, 3, 3, generator=g).transpose(0, 1),
             "steps": torch.tensor(7)}  # fmt: skip
    torch.save(state, root / "model.pt")
    spec = {"*.weight": {"kind": "conv", "groups": 1, "ndim": 2},
            "a.bias": {"role": "conv_bias", "ndim": 2}}  # fmt: skip
    (root / "spec.json").write_text(json.dumps(spec))
    return root / "model.pt", root / "spec.json"


def _reference(path, tensors, dtype=None):
    """What the writers wrote before the sink: every tensor made contiguous in memory."""
    cast = {k: v if dtype is None or v.dtype.kind != "f" else v.astype(dtype)
            for k, v in tensors.items()}  # fmt: skip
    if str(path).endswith(".pkl"):
        f = io.BytesIO()
        pickler = pickle.Pickler(f, protocol=4)
        pickler.fast = True
        pickler.dump({k: np.array(v, order="C") for k, v in cast.items()})
        return f.getvalue()
    with open(path, "rb") as f:  # the header is the writer's; the data must follow it
        head = f.read(8)
        header = f.read(int.from_bytes(head, "little"))
    names = sorted(json.loads(header)) if header else []
    body = b"".join(np.ascontiguousarray(cast[n]).astype(cast[n].dtype.newbyteorder("<")).tobytes()
                    for n in names if n != "__metadata__")  # fmt: skip
    return head + header + body


def _convert(src, dst, spec, to, **kw):
    return convert(str(src), str(dst), to_framework=to, spec=str(spec), **kw)


@pytest.mark.parametrize("to,suffix", OUTPUTS)
def test_kernel_copy_and_fallback_write_identical_files(tmp_path, checkpoint, monkeypatch, to,
                                                        suffix):  # fmt: skip
    src, spec = checkpoint
    fast, slow = tmp_path / f"fast{suffix}", tmp_path / f"slow{suffix}"
    out = _convert(src, fast, spec, to)
    monkeypatch.setattr(sink, "_KERNEL_COPY", False)
    _convert(src, slow, spec, to)
    assert fast.read_bytes() == slow.read_bytes() == _reference(fast, out)


@pytest.mark.parametrize("suffix", [".safetensors", ".pkl"])
def test_cast_outputs_match_the_reference(tmp_path, checkpoint, suffix):
    src, spec = checkpoint
    dst = tmp_path / f"half{suffix}"
    out = _convert(src, dst, spec, "tensorflow", dtype="float16")
    assert dst.read_bytes() == _reference(dst, out, np.float16)


def test_kernel_copy_is_used_and_sendfile_backs_it_up(tmp_path, checkpoint, monkeypatch):
    src, spec = checkpoint
    calls = []
    real = os.copy_file_range

    def refuse(*args):
        calls.append(args)
        raise OSError(18, "Invalid cross-device link")  # EXDEV

    _convert(src, tmp_path / "a.safetensors", spec, "torch")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    sent = []
    real_sendfile = os.sendfile
    monkeypatch.setattr(os, "sendfile", lambda *a: sent.append(a) or real_sendfile(*a))
    _convert(src, tmp_path / "b.safetensors", spec, "torch")
    assert calls and sent and real
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    released = []  # transposed tensors' pages leave the RSS once converted
    real_madvise = MappedFile.madvise
    monkeypatch.setattr(MappedFile, "madvise",
                        lambda self, *a: released.append(a) or real_madvise(self, *a))  # fmt: skip
    _convert(src, tmp_path / "c.safetensors", spec, "tensorflow")
    assert len(released) == 3  # a.weight, b.weight, t.weight


def test_replaced_source_falls_back_to_memory(tmp_path, checkpoint):
    """The path now names another file: its bytes must not be copied."""
    src, _ = checkpoint
    copy = tmp_path / "model.pt"
    copy.write_bytes(src.read_bytes())
    ckpt = layouts.load_checkpoint(str(copy))
    os.replace(copy, tmp_path / "moved.pt")
    copy.write_bytes(b"\0" * src.stat().st_size)  # same size, other contents
    layouts.save_safetensors({"w": ckpt.tensors["a.bias"]}, tmp_path / "o.safetensors")
    np.testing.assert_array_equal(layouts.load_checkpoint(str(tmp_path / "o.safetensors")).tensors["w"],
                                  ckpt.tensors["a.bias"])  # fmt: skip


def test_source_shrunk_after_reading_is_an_error(tmp_path, checkpoint):
    src, _ = checkpoint
    copy = tmp_path / "model.pt"
    copy.write_bytes(src.read_bytes())
    ckpt = layouts.load_checkpoint(str(copy))
    weight = ckpt.tensors["a.weight"]
    offset = sink.extent(weight)[0] - sink.mapped_origin(weight).address
    with open(copy, "r+b") as f:
        f.truncate(offset + 8)
    with pytest.raises(CheckpointError, match="shrank"):  # met by the writer thread
        with open(tmp_path / "o.bin", "wb") as f, sink.Sink(f) as w:  # not via the map: it faults
            w.write_array(weight, weight.dtype)


@pytest.mark.parametrize("shape,axes,step", [((8, 6, 3, 3), (2, 3, 1, 0), 1), ((5, 7), (1, 0), 1),
                                             ((4, 3, 2, 5, 6), (0, 2, 3, 4, 1), 1), ((3,), (0,), 1),
                                             ((9, 4, 3), (2, 0, 1), -1), ((10, 6), (1, 0), 2)])  # fmt: skip
def test_blocked_copy_equals_a_strided_copy(shape, axes, step, monkeypatch):
    monkeypatch.setattr(sink, "BLOCK", 64)  # many blocks even for small arrays
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    view = a.transpose(axes)[::step]
    for dtype in (np.float32, np.float16):
        out = np.empty(view.shape, dtype)
        sink.copy_blocked(out, view)
        np.testing.assert_array_equal(out, view.astype(dtype))


@pytest.mark.parametrize("to,suffix", OUTPUTS)
def test_every_output_prints_each_step_of_its_bar_once(tmp_path, checkpoint, capsys, to, suffix):
    src, spec = checkpoint
    _convert(src, tmp_path / f"o{suffix}", spec, to, progress=True)
    err = capsys.readouterr().err
    steps = [line.split("]")[1].split("%")[0].strip() for line in err.strip("\n").split("\r") if line]
    assert steps == sorted(set(steps), key=int) and steps[-1] == "100", steps
    assert err.endswith("\n") and err.count("\n") == 1


def test_scalar_keeps_its_shape_in_a_pkl(tmp_path, checkpoint):
    src, spec = checkpoint
    _convert(src, tmp_path / "o.pkl", spec, "torch")
    with open(tmp_path / "o.pkl", "rb") as f:
        assert pickle.load(f)["steps"].shape == ()


@pytest.mark.parametrize("suffix", [".safetensors", ".pkl"])
def test_a_write_error_in_the_writer_thread_reaches_the_caller(tmp_path, checkpoint, monkeypatch,
                                                              suffix):  # fmt: skip
    src, spec = checkpoint
    real = os.write
    written = []

    def fail_later(fd, data):
        written.append(len(data))
        if len(written) > 2:
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(sink, "_KERNEL_COPY", False)
    monkeypatch.setattr(os, "write", fail_later)
    with pytest.raises(OSError, match="No space left"):
        _convert(src, tmp_path / f"o{suffix}", spec, "tensorflow")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no temporary file


def test_an_interrupted_write_leaves_nothing(tmp_path):
    from layouts.safetensors_format import write_safetensors

    tensors = {f"w{i}": np.full((64, 64, 3, 3), i, np.float32).transpose(2, 3, 1, 0)
               for i in range(4)}  # fmt: skip

    def interrupt(nbytes):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_safetensors(tensors, tmp_path / "o.safetensors", progress=interrupt)
    assert list(tmp_path.iterdir()) == []


def test_without_kernel_copy_or_writeback_calls_the_file_is_the_same(tmp_path, checkpoint,
                                                                     monkeypatch):  # fmt: skip
    """No copy_file_range, no sendfile (e.g. not Linux), no sync_file_range in the C library."""
    src, spec = checkpoint
    _convert(src, tmp_path / "a.pkl", spec, "megengine")

    def refuse(*args):
        raise OSError(38, "Function not implemented")  # ENOSYS

    monkeypatch.setattr(os, "copy_file_range", refuse)
    monkeypatch.setattr(os, "sendfile", refuse)
    monkeypatch.setattr(sink._Writeback, "call", False)
    monkeypatch.setattr(sink, "WRITEBACK", 1)  # would start writeback after every write
    _convert(src, tmp_path / "b.pkl", spec, "megengine")
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
