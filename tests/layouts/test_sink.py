"""Streaming writes (layouts.sink): reading from the source file, the transposing copy,
the copy from memory, direct and buffered writes give the same files as the
straightforward writers, and every output shows its progress bar."""

import concurrent.futures
import fcntl
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


WAYS = {  # how the sink can be made to write: each must give the same file
    "default": {},
    "direct I/O, small buffers": {"CHUNK": 3 * sink.ALIGN},  # many buffers, unaligned ends carried
    "buffered, small buffers": {"CHUNK": 3 * sink.ALIGN, "_DIRECT": False},
    "from the map, not the file": {"_FROM_FILE": False},
    "one converting thread": {"HANDS": 1, "CHUNK": 3 * sink.ALIGN},
}


@pytest.mark.parametrize("to,suffix", OUTPUTS)
def test_every_way_of_writing_gives_the_reference_file(tmp_path, checkpoint, monkeypatch, to,
                                                       suffix):  # fmt: skip
    src, spec = checkpoint
    files = {}
    for way, settings in WAYS.items():
        with monkeypatch.context() as patch:
            for name, value in settings.items():
                patch.setattr(sink, name, value)
            dst = tmp_path / f"{len(files)}{suffix}"
            out = _convert(src, dst, spec, to)
            files[way] = dst.read_bytes()
    reference = _reference(dst, out)
    assert {way: data == reference for way, data in files.items()} == dict.fromkeys(WAYS, True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pkl"])
@pytest.mark.parametrize("chunk", [None, 3 * sink.ALIGN])
def test_cast_outputs_match_the_reference(tmp_path, checkpoint, monkeypatch, suffix, chunk):
    src, spec = checkpoint
    if chunk is not None:  # direct writes of small buffers: the cast pieces cross them
        monkeypatch.setattr(sink, "CHUNK", chunk)
    dst = tmp_path / f"half{suffix}"
    out = _convert(src, dst, spec, "tensorflow", dtype="float16")
    assert dst.read_bytes() == _reference(dst, out, np.float16)


def _spy_writes(monkeypatch):
    """Every pwrite as (offset, length, whether the descriptor was in direct mode)."""
    writes, real = [], os.pwrite

    def spy(fd, data, offset):
        direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
        writes.append((offset, memoryview(data).nbytes, direct))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", spy)
    return writes


def test_large_outputs_are_written_direct_and_read_from_the_source_file(tmp_path, checkpoint,
                                                                        monkeypatch):  # fmt: skip
    src, spec = checkpoint
    monkeypatch.setattr(sink, "CHUNK", 4 * sink.ALIGN)
    reads, real_preadv = [], os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: reads.append(offset) or
                        real_preadv(fd, bufs, offset))  # fmt: skip
    writes = _spy_writes(monkeypatch)
    dst = tmp_path / "a.safetensors"
    _convert(src, dst, spec, "torch")
    assert reads  # the tensors' bytes came from the file, not through the map
    direct = [(offset, n) for offset, n, d in writes if d]
    buffered = [(offset, n) for offset, n, d in writes if not d]
    assert len(direct) > 10 and all(o % sink.ALIGN == 0 and n % sink.ALIGN == 0 for o, n in direct)
    assert len(buffered) == 1 and buffered[0][0] + buffered[0][1] == dst.stat().st_size  # the tail
    assert sum(n for _, n, _ in writes) == dst.stat().st_size  # each byte written once
    released = []  # transposed tensors' pages leave the RSS once converted
    real_madvise = MappedFile.madvise
    monkeypatch.setattr(MappedFile, "madvise",
                        lambda self, *a: released.append(a) or real_madvise(self, *a))  # fmt: skip
    _convert(src, tmp_path / "b.safetensors", spec, "tensorflow")
    assert len(released) == 3  # a.weight, b.weight, t.weight


@pytest.mark.parametrize("refused", ["fcntl", "pwrite"])
def test_refused_direct_io_falls_back_to_buffered_writes(tmp_path, checkpoint, monkeypatch,
                                                         refused):  # fmt: skip
    """A file system without direct I/O refuses O_DIRECT (fcntl) or its writes (EINVAL,
    e.g. when it needs larger alignment): the rest of the file is written buffered."""
    src, spec = checkpoint
    _convert(src, tmp_path / "a.pkl", spec, "tensorflow")
    monkeypatch.setattr(sink, "CHUNK", 4 * sink.ALIGN)
    writes = _spy_writes(monkeypatch)
    if refused == "fcntl":
        real_fcntl = fcntl.fcntl

        def no_direct(fd, command, arg=0):
            if command == fcntl.F_SETFL and arg & os.O_DIRECT:
                raise OSError(22, "Invalid argument")
            return real_fcntl(fd, command, arg)

        monkeypatch.setattr(fcntl, "fcntl", no_direct)
    else:
        spy = os.pwrite

        def misaligned(fd, data, offset):
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT and len(writes) >= 2:
                raise OSError(22, "Invalid argument")
            return spy(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", misaligned)
    _convert(src, tmp_path / "b.pkl", spec, "tensorflow")
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
    assert [d for _, _, d in writes].count(True) == (0 if refused == "fcntl" else 2)


def test_sink_after_other_writes_and_pieces_larger_than_a_buffer(tmp_path, monkeypatch):
    """A sink that starts at an unaligned position writes buffered; a converted piece
    larger than a buffer gets a bigger one; the file position ends after the sink's bytes."""
    monkeypatch.setattr(sink, "CHUNK", 2 * sink.ALIGN)
    rng = np.random.default_rng(0)
    wide = rng.standard_normal((3, 5000)).astype(np.float32)  # rows of 20000 bytes
    tall = rng.standard_normal((7000, 3)).astype(np.float32)
    with open(tmp_path / "o.bin", "wb") as f:
        f.write(b"head")
        with sink.Sink(f) as w:
            w.write(b"x" * 10000)
            w.write_array(wide.T, np.float64)  # cast and transposed: one row is 40000 bytes
            w.write_array(tall, np.float32)  # in memory, contiguous
            w.write(sink.ArrayBytes(wide, np.float16))
        f.write(b"tail")
    expected = (b"head" + b"x" * 10000 + np.ascontiguousarray(wide.T, np.float64).tobytes()
                + tall.tobytes() + wide.astype(np.float16).tobytes() + b"tail")  # fmt: skip
    assert (tmp_path / "o.bin").read_bytes() == expected


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
    with pytest.raises(CheckpointError, match="shrank"):
        with open(tmp_path / "o.bin", "wb") as f, sink.Sink(f) as w:  # not via the map: it faults
            w.write_array(weight, weight.dtype)


@pytest.mark.parametrize("shape,axes,step", [((8, 6, 3, 3), (2, 3, 1, 0), 1), ((5, 7), (1, 0), 1),
                                             ((4, 3, 2, 5, 6), (0, 2, 3, 4, 1), 1), ((3,), (0,), 1),
                                             ((9, 4, 3), (2, 0, 1), -1), ((10, 6), (1, 0), 2)])  # fmt: skip
def test_blocked_copy_equals_a_strided_copy(shape, axes, step, monkeypatch):
    monkeypatch.setattr(sink, "BLOCK", 64)
    monkeypatch.setattr(sink, "HANDS", 3)  # many blocks even for small arrays
    a = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    view = a.transpose(axes)[::step]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        for dtype, helpers in [(np.float32, None), (np.float16, None), (np.float32, pool)]:
            out = np.empty(view.shape, dtype)
            sink.copy_blocked(out, view, helpers)  # with helpers: the blocks in three runs
            np.testing.assert_array_equal(out, view.astype(dtype))


@pytest.mark.parametrize("to,suffix", OUTPUTS)
def test_every_output_prints_each_step_of_its_bar_once(tmp_path, checkpoint, capsys, to, suffix):
    src, spec = checkpoint
    _convert(src, tmp_path / f"o{suffix}", spec, to, progress=True)
    err = capsys.readouterr().err
    steps = [
        line.split("]")[1].split("%")[0].strip() for line in err.strip("\n").split("\r") if line
    ]
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
    real = os.pwrite
    written = []

    def fail_later(fd, data, offset):
        written.append(offset)
        if len(written) > 2:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(sink, "CHUNK", 4 * sink.ALIGN)
    monkeypatch.setattr(os, "pwrite", fail_later)
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


@pytest.mark.parametrize("missing", [("O_DIRECT",), ("pwrite", "preadv")])
def test_without_direct_io_positioned_io_or_writeback_the_file_is_the_same(tmp_path, checkpoint,
                                                                           monkeypatch, missing):  # fmt: skip
    """No O_DIRECT, no pwrite/preadv (Windows), no sync_file_range in the C library."""
    src, spec = checkpoint
    _convert(src, tmp_path / "a.pkl", spec, "megengine")
    for name in missing:
        monkeypatch.delattr(os, name)
    monkeypatch.setattr(sink._Writeback, "call", False)
    monkeypatch.setattr(sink, "CHUNK", sink.ALIGN)
    _convert(src, tmp_path / "b.pkl", spec, "megengine")
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
