"""Coverage-guided fuzzing of every checkpoint reader with atheris (libFuzzer).

Each input is written as one checkpoint of the chosen format and read with
``layouts.checkpoint.read_checkpoint`` (``load_checkpoint`` without its last-resort
conversion of unexpected exceptions). The input passes when it loads or raises
``CheckpointError``; anything else is a crash that libFuzzer records (``crash-*``),
and so is a peak RSS above (start + input size + 64 MiB). libFuzzer's ``-timeout``
catches hangs.

    pip install atheris
    python benchmarks/fuzz_readers.py run torch-zip -runs=200000 -timeout=10 \\
        -rss_limit_mb=2048 -max_len=65536 [corpus dirs...]
    python benchmarks/fuzz_readers.py seeds OUT_DIR      # seed corpus: small real files
    python benchmarks/fuzz_readers.py replay tests/layouts/corpus   # no atheris needed

Formats: torch-zip, torch-legacy, safetensors, pickle (MegEngine and OneFlow single
files), onnx, oneflow-dir (``pickled_data``, one ``meta`` and one ``out``, split by
``SPLIT``; an empty first part makes a legacy ``snapshot_done`` directory). Without
corpus directories, ``run`` seeds from ``tests/layouts/corpus/<format>`` and adds what it
finds to ``$TMPDIR/mconv-fuzz-corpus/<format>`` (libFuzzer writes to the first directory). ``replay``
prints one JSON line per file and exits 1 when any file failed.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile

import numpy as np

FORMATS = ("torch-zip", "torch-legacy", "safetensors", "pickle", "onnx", "oneflow-dir")
SUFFIX = {"torch-zip": ".pt", "torch-legacy": ".pt", "safetensors": ".safetensors",
          "pickle": ".pkl", "onnx": ".onnx", "oneflow-dir": ""}  # fmt: skip
SPLIT = b"--mconv-fuzz--"
RSS_SLACK = 64 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def materialize(fmt: str, data: bytes, workdir: str) -> str:
    """Write ``data`` as a checkpoint of ``fmt`` under ``workdir``; returns its path."""
    if fmt != "oneflow-dir":
        path = os.path.join(workdir, "input" + SUFFIX[fmt])
        with open(path, "wb") as f:
            f.write(data)
        return path
    path = os.path.join(workdir, "ckpt")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(os.path.join(path, "tensor_0"))
    pickled, meta, out = (data.split(SPLIT, 2) + [b"", b""])[:3]
    files = {"tensor_0/meta": meta, "tensor_0/out": out}
    files.update({"pickled_data": pickled} if pickled else {"snapshot_done": b""})
    for name, content in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(content)
    return path


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def check_one(fmt: str, data: bytes, workdir: str) -> str:
    """'ok' or 'refused'; raises anything else (the reader's own exception)."""
    import layouts  # noqa: PLC0415
    from layouts.checkpoint import read_checkpoint  # noqa: PLC0415

    path = materialize(fmt, data, workdir)
    try:
        ckpt = read_checkpoint(path)
    except layouts.CheckpointError:
        return "refused"
    for array in ckpt.tensors.values():  # whatever loaded must be readable
        if array.size:
            np.asarray(array.flat[:16]).sum()
    return "ok"


class RssExceeded(Exception):
    pass


def run(fmt: str, argv: list[str]) -> None:
    import atheris  # noqa: PLC0415

    with atheris.instrument_imports(include=["layouts", "zipfile", "json"]):
        import layouts  # noqa: F401, PLC0415
        import layouts.checkpoint  # noqa: F401, PLC0415
    workdir = tempfile.mkdtemp(prefix=f"fuzz-{fmt}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    check_one(fmt, b"", workdir)  # imports done before the baseline
    baseline = peak_rss()

    def one_input(data: bytes) -> None:
        import warnings  # noqa: PLC0415

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            check_one(fmt, data, workdir)
        if peak_rss() > baseline + len(data) + RSS_SLACK:
            raise RssExceeded(f"peak RSS {peak_rss() >> 20} MiB, baseline {baseline >> 20} MiB, "
                              f"input {len(data)} bytes")  # fmt: skip

    if not any(not a.startswith("-") for a in argv):  # libFuzzer adds new units to the first
        grown = os.path.join(tempfile.gettempdir(), "mconv-fuzz-corpus", fmt)
        os.makedirs(grown, exist_ok=True)
        argv = argv + [grown, os.path.join(ROOT, "tests", "layouts", "corpus", fmt)]
    atheris.Setup([sys.argv[0]] + argv, one_input)
    atheris.Fuzz()


def replay(root: str) -> int:
    """Every file of ``root/<format>/`` once; one JSON line each; 1 when any failed."""
    failed = 0
    workdir = tempfile.mkdtemp(prefix="replay-")
    import layouts  # noqa: F401, PLC0415

    check_one("safetensors", b"", workdir)
    baseline = peak_rss()
    for fmt in FORMATS:
        folder = os.path.join(root, fmt)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            with open(os.path.join(folder, name), "rb") as f:
                data = f.read()
            try:
                outcome = check_one(fmt, data, workdir)
            except Exception as error:  # noqa: BLE001 - reported, not raised
                outcome = f"{type(error).__name__}: {error}"
            grown = max(peak_rss() - baseline - len(data), 0)
            bad = outcome not in ("ok", "refused") or grown > RSS_SLACK
            failed += bad
            print(json.dumps({"format": fmt, "file": name, "outcome": outcome[:300],
                              "rss_growth_mib": round(grown / 2**20, 1), "failed": bad}),
                  flush=True)  # fmt: skip
    shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


def write_seeds(out: str) -> None:
    """Small real files of every format (needs torch, onnx, safetensors: the test extra)."""
    sys.path.insert(0, os.path.join(ROOT, "tests", "layouts"))
    import pickle  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from conftest import sample_state, write_onnx  # noqa: PLC0415
    from safetensors.numpy import save_file  # noqa: PLC0415

    state = {k: v[..., :2] if v.ndim > 1 else v for k, v in sample_state().items()}
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
    for fmt in FORMATS:
        os.makedirs(os.path.join(out, fmt), exist_ok=True)
    torch.save(tensors, os.path.join(out, "torch-zip", "seed-state.pt"))
    torch.save({"w": torch.zeros(1).expand(8), "t": torch.arange(6.0).view(2, 3).t()},
               os.path.join(out, "torch-zip", "seed-views.pt"))  # fmt: skip
    torch.save(tensors, os.path.join(out, "torch-legacy", "seed-state.pt"),
               _use_new_zipfile_serialization=False)  # fmt: skip
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()},
              os.path.join(out, "safetensors", "seed-state.safetensors"), metadata={"format": "pt"})  # fmt: skip
    with open(os.path.join(out, "pickle", "seed-megengine.pkl"), "wb") as f:
        pickle.dump({"state_dict": state, "epoch": 3}, f, protocol=4)
    with open(os.path.join(out, "pickle", "seed-protocol2.pkl"), "wb") as f:
        pickle.dump(state, f, protocol=2)
    write_onnx(os.path.join(out, "onnx", "seed-state.onnx"), state)
    oneflow = os.path.join(ROOT, "tests", "layouts", "data", "oneflow-0.9.0")
    for name in sorted(os.listdir(oneflow)) if os.path.isdir(oneflow) else []:
        pickled = os.path.join(oneflow, name, "pickled_data")
        if not os.path.isfile(pickled):
            continue
        variable = min(d for d in os.listdir(os.path.join(oneflow, name)) if d.startswith("tensor_"))
        meta = os.path.join(oneflow, name, variable, "meta")
        if os.path.isfile(meta):
            parts = [open(p, "rb").read() for p in (pickled, meta, meta[:-4] + "out")]
            with open(os.path.join(out, "oneflow-dir", f"seed-{name}"), "wb") as f:
                f.write(SPLIT.join(parts))


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "run" and argv[1] in FORMATS:
        run(argv[1], argv[2:])
        return 0
    if len(argv) == 2 and argv[0] == "replay":
        return replay(argv[1])
    if len(argv) == 2 and argv[0] == "seeds":
        write_seeds(argv[1])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
