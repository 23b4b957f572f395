"""Crafted hostile checkpoints, one per way a reader used to crash, hang, get poisoned or
allocate far beyond the file (issue 13). ``CASES[name](folder) -> path`` writes one;
``EXPECTED[name]`` is the CheckpointError message it must give (None: it must load).

``python hostile_files.py make DIR`` writes them; ``load DIR`` loads each in this process
and prints one JSON line per case (outcome, message, peak RSS growth): test_hostile.py
runs it in a child process, so a crash (segfault) fails a test instead of killing pytest.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import sys
import zipfile

import numpy as np


def _pickle_file(folder, name, payload: bytes):
    path = os.path.join(folder, name)
    with open(path, "wb") as f:
        f.write(payload)
    return path


def _torch_zip(folder, name, payload: bytes, compress=zipfile.ZIP_STORED, storages=None):
    path = os.path.join(folder, name)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", payload, compress_type=compress)
        archive.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
    return path


class _Reduce:
    def __init__(self, fn, args, state=None):
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self):
        return (self.fn, self.args) if self.state is None else (self.fn, self.args, self.state)


_RECONSTRUCT = np.zeros(1).__reduce__()[0]


def _tensor_pickle(size, stride) -> bytes:
    """A torch zip data.pkl with one float tensor whose size and stride we choose."""
    import torch  # noqa: PLC0415

    buffer, storage = io.BytesIO(), _Reduce(None, ())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is storage else None

    Pickler(buffer, protocol=2).dump(
        {"w": _Reduce(torch._utils._rebuild_tensor_v2, (storage, 0, size, stride, False, {}))}
    )
    return buffer.getvalue()


def _deep_tuple_key(depth):
    # {((((),),),): 1} nested `depth` deep: hashing it recursed on the C stack
    return b"\x80\x02}" + b")" + b"\x85" * depth + b"K\x01s."


def _dag_tuple_key(levels):
    # t = (); t = (t, t) `levels` times through DUP: 3 bytes per level, 2**levels to hash
    return b"\x80\x02}" + b")" + b"2\x86" * levels + b"K\x01s."


def _forged_dtype_array():
    dtype = _Reduce(np.dtype, ("f4", False, True), (3, "<", None, None, None, 16))
    array = _Reduce(_RECONSTRUCT, (np.ndarray, (0,), b"b"),
                    (1, (4,), dtype, False, b"\0" * 16))  # fmt: skip
    return pickle.dumps({"w": array}, protocol=2)


def _poisoning_build():
    # BUILD with dict state on the shared torch.FloatStorage stand-in
    return b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypectorch\nint\nsb}X\x01\x00\x00\x00wK\x01s."


def _deflate_bomb(folder):
    """data.pkl deflated from 64 MiB, its declared size patched to 20 bytes."""
    path = _torch_zip(folder, "bomb.pt", b"\0" * (64 << 20), compress=zipfile.ZIP_DEFLATED)
    raw = bytearray(open(path, "rb").read())
    for sig, size_at in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        at = raw.find(sig)
        raw[at + size_at : at + size_at + 4] = (20).to_bytes(4, "little")
    open(path, "wb").write(bytes(raw))
    return path


def _encrypted(folder):
    path = _torch_zip(folder, "encrypted.pt", pickle.dumps({"a": 1}))
    raw = bytearray(open(path, "rb").read())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = raw.find(sig)
        raw[at + flag_at] |= 1
    open(path, "wb").write(bytes(raw))
    return path


def _expanded(folder):
    import torch  # noqa: PLC0415 - the real file torch writes

    path = os.path.join(folder, "expanded.pt")
    torch.save({"w": torch.zeros(1).expand(2**26)}, path)
    return path


def _safetensors(folder, name, header: bytes, data=b""):
    return _pickle_file(folder, name, len(header).to_bytes(8, "little") + header + data)


def _onnx_string(folder):
    import onnx  # noqa: PLC0415
    from onnx import helper  # noqa: PLC0415

    init = helper.make_tensor("names", onnx.TensorProto.STRING, [2], [b"a", b"b"])
    graph = helper.make_graph([], "g", [], [], [init])
    path = os.path.join(folder, "strings.onnx")
    onnx.save(helper.make_model(graph), path)
    return path


def _deep_folders(folder):
    root = os.path.join(folder, "deep")
    path = os.path.join(root, *["d"] * 70)
    os.makedirs(path)
    open(os.path.join(root, "snapshot_done"), "w").close()
    return root


def _fifo(folder):
    path = os.path.join(folder, "fifo.pt")
    os.mkfifo(path)
    return path


def _dev_zero(folder):
    path = os.path.join(folder, "model.onnx")
    os.symlink("/dev/zero", path)
    return path


CASES = {
    "deep-tuple-dict-key": lambda d: _pickle_file(d, "deep.pkl", _deep_tuple_key(10**6)),
    "dag-tuple-hash": lambda d: _pickle_file(d, "dag.pkl", _dag_tuple_key(80)),
    "forged-dtype-state": lambda d: _pickle_file(d, "dtype.pkl", _forged_dtype_array()),
    "forged-dtype-in-torch-zip": lambda d: _torch_zip(d, "dtype.pt", _forged_dtype_array()),
    "storage-poisoning": lambda d: _torch_zip(d, "poison.pt", _poisoning_build()),
    "memo-index-2**26": lambda d: _pickle_file(d, "memo.pkl", b"\x80\x02K\x01r\x00\x00\x00\x04."),
    "ndarray-declares-256MiB": lambda d: _pickle_file(d, "big.pkl", pickle.dumps(
        _Reduce(_RECONSTRUCT, (np.ndarray, (2**26,), b"f")), protocol=2)),
    "ndarray-data-short": lambda d: _pickle_file(d, "short.pkl", pickle.dumps(
        np.zeros(4, np.float32), protocol=3).replace(b"\x00" * 16, b"\x00" * 8).replace(
        b"C\x10", b"C\x08")),  # fmt: skip
    "deep-lists": lambda d: _pickle_file(d, "lists.pkl", b"\x80\x02" + b"]" * 5000
                                         + b"a" * 4999 + b"."),  # fmt: skip
    "self-containing-dict": lambda d: _pickle_file(d, "loop.pkl", b"\x80\x02}q\x00X\x01\x00\x00"
                                                   b"\x00ah\x00s."),  # fmt: skip
    "bz2-record": lambda d: _torch_zip(d, "bz2.pt", pickle.dumps({"a": 1}), zipfile.ZIP_BZIP2),
    "lzma-record": lambda d: _torch_zip(d, "lzma.pt", pickle.dumps({"a": 1}), zipfile.ZIP_LZMA),
    "deflate-bomb": _deflate_bomb,
    "encrypted-record": _encrypted,
    "expanded-zeros": _expanded,
    "size-2**63": lambda d: _torch_zip(d, "huge.pt", _tensor_pickle((2**63,), (1,)),
                                       storages={"0": b"\0" * 16}),
    "safetensors-shape-str": lambda d: _safetensors(
        d, "s.safetensors", b'{"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}}', b"\0" * 8),
    "safetensors-deep-json": lambda d: _safetensors(d, "j.safetensors", b'{"a":' + b"[" * 100000),
    "safetensors-dim-2**64": lambda d: _safetensors(
        d, "z.safetensors", b'{"w":{"dtype":"F32","shape":[0,18446744073709551616],'
                            b'"data_offsets":[0,0]}}'),  # fmt: skip
    "onnx-string-initializer": _onnx_string,
    "oneflow-deep-folders": _deep_folders,
    "fifo": _fifo,
    "dev-zero-link": _dev_zero,
}


EXPECTED = {
    "deep-tuple-dict-key": r"nested more than 256 deep",
    "dag-tuple-hash": r"hashing it would never end",
    "forged-dtype-state": r"refusing a numpy dtype state",
    "forged-dtype-in-torch-zip": r"refusing a numpy dtype state",
    "storage-poisoning": r"modifies an allowlisted global",
    "memo-index-2**26": r"memo index 67108864 after only 3 opcodes",
    "ndarray-declares-256MiB": r"ndarray is rebuilt without its data",
    "ndarray-data-short": r"needs 16 bytes, but its data holds 8",
    "deep-lists": r"nested more than 256 deep",
    "self-containing-dict": r"contains itself",
    "bz2-record": r"uses bzip2 compression",
    "lzma-record": r"uses lzma compression",
    "deflate-bomb": r"holds 21\+ bytes, but its header declares 20",
    "encrypted-record": r"is encrypted",
    "expanded-zeros": None,
    "size-2**63": r"size must be a tuple of at most 64 non-negative ints below 2\*\*63",
    "safetensors-shape-str": r"malformed shape for tensor 'w'.*got '2'",
    "safetensors-deep-json": r"safetensors header nested 100001 deep \(at most 64\)",
    "safetensors-dim-2**64": r"malformed shape",
    "onnx-string-initializer": r"initializer 'names' has data type 8, not a plain numeric type",
    "oneflow-deep-folders": r"folders nested more than 64 deep",
    "fifo": r"not a regular file but a FIFO",
    "dev-zero-link": r"not a regular file but a character device",
}


def make_all(folder: str) -> dict[str, str]:
    """Write every case under ``folder``; name -> path (also saved as manifest.json)."""
    paths = {}
    for name, make in CASES.items():
        case_dir = os.path.join(folder, name.replace("*", "x"))
        os.makedirs(case_dir)
        paths[name] = make(case_dir)
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(paths, f)
    return paths


def load_all(folder: str) -> None:
    """Load every case of ``folder``'s manifest; one JSON line each (peak RSS growth too)."""
    sys.setrecursionlimit(10**6)  # a recursive reader would now overflow the C stack
    import layouts  # noqa: PLC0415
    import onnx  # noqa: F401, PLC0415 - imported before the baseline

    with open(os.path.join(folder, "manifest.json")) as f:
        paths = json.load(f)
    for name, path in paths.items():
        print(json.dumps({"case": name, "started": True}), flush=True)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            ckpt = layouts.load_checkpoint(path)
            result = {"outcome": "ok", "shapes": {k: list(v.shape) for k, v in ckpt.tensors.items()},
                      "writeable": any(v.flags.writeable for v in ckpt.tensors.values())}  # fmt: skip
        except Exception as error:  # noqa: BLE001 - reported to the test
            result = {"outcome": type(error).__name__, "message": str(error)}
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(json.dumps({"case": name, **result, "rss_growth_mib": grown / 1024}), flush=True)


if __name__ == "__main__":
    {"make": make_all, "load": load_all}[sys.argv[1]](sys.argv[2])
