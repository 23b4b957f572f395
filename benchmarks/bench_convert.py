"""Converting a large checkpoint vs ``cp`` of the same file: wall time and peak RSS.

Writes a PyTorch zip checkpoint of ``--size-mb`` (conv-shaped float32 tensors;
needs the test extra for torch), then runs, each in its own process: ``cp``, ``cp``
followed by an fsync of the copy (``sync FILE``: mconv fsyncs before its rename, ``cp``
does not), and ``mconv convert`` to every kind of output (:data:`TARGETS`: torch-layout
safetensors, a streamed copy; Keras and Flax layouts, every tensor transposed;
MegEngine's layout as safetensors and as ``.pkl``; the Keras layout cast to float16).
Each job runs once to warm the page cache, then ``--repeat`` times, the jobs taking
turns; the median time and the largest peak RSS are reported. Every run starts after a
``sync``, so that no job pays for the writeback of the one before. The targets (issue
12) are against plain ``cp``: at most 2x its time and 1.2x the file size in peak RSS; the
ratio to ``cp`` + fsync is shown too.

By default each run replaces the output of the job's previous run, as a user re-running a
conversion does: ``cp`` truncates its target first and refills the pages it just freed,
while mconv writes a temporary file beside the old one (direct I/O, past the page cache)
and renames it over it (the old data survives a failure); both pay for freeing the old
file. ``--new-files`` removes
each job's previous output before the clock starts instead: every job, ``cp`` included,
then writes a new file and frees nothing (see docs/checkpoints.md for both).

    python benchmarks/bench_convert.py [--size-mb 1024] [--repeat 3] [--dir /tmp] [--new-files]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def run_measured(cmd: list[str], output: str | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process, started after a ``sync``; the
    ``output`` it writes is removed first (untimed) where given."""
    if output is not None and os.path.exists(output):
        os.unlink(output)
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # the bar's ~6 KB fit in the pipe meanwhile
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err}")
    return wall, usage.ru_maxrss / 1024


# every output: safetensors in each layout that moves data differently, and MegEngine's .pkl
# (layout, suffix, --dtype or None): safetensors in each layout that moves data differently,
# MegEngine's .pkl, and the Keras layout cast to float16 (transposed and cast)
TARGETS = [("torch", ".safetensors", None), ("tensorflow", ".safetensors", None),
           ("jax", ".safetensors", None), ("megengine", ".safetensors", None),
           ("megengine", ".pkl", None), ("tensorflow", ".pkl", None),
           ("tensorflow", ".safetensors", "float16")]  # fmt: skip
TIME_TARGET, RSS_TARGET = 2.0, 1.2  # issue 12: <= 2x the time of cp, <= 1.2x the file in RSS

MAKE = """
import sys, torch
count = max(int(sys.argv[2]) // 4, 1)   # (256, 256, 4, 4) float32 tensors of 4 MiB
torch.save({f"layer{i}.weight": torch.randn(256, 256, 4, 4) for i in range(count)}, sys.argv[1])
"""


def make_checkpoint(path: str, size_mb: int) -> int:
    """Written by a child process, so that this one stays small: a child's peak RSS
    includes what it inherited at fork time."""
    subprocess.run([sys.executable, "-c", MAKE, path, str(size_mb)], check=True)
    return os.path.getsize(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3,
                        help="measured runs per job after the warm-up one (median reported)")  # fmt: skip
    parser.add_argument(
        "--dir", default=None, help="where to write the files (default: a temp dir)"
    )
    parser.add_argument("--new-files", action="store_true",
                        help="remove each job's previous output before the clock starts (default: "
                             "every job replaces the output of its previous run)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.size_mb < 1:
        parser.error(f"--repeat and --size-mb must be >= 1, but got --repeat {args.repeat} "
                     f"--size-mb {args.size_mb}")  # fmt: skip
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        src = os.path.join(root, "model.pt")
        size = make_checkpoint(src, args.size_mb)
        spec = os.path.join(root, "spec.json")  # a bare state dict: say what its tensors are
        with open(spec, "w") as f:
            json.dump({"*": {"kind": "conv", "groups": 1, "ndim": 2}}, f)
        mconv = [sys.executable, "-m", "mconv", "convert", src]  # with its progress bar
        copy = os.path.join(root, "copy.pt")
        jobs = {"cp": (["cp", src, copy], copy),
                "cp + fsync": (["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", src, copy], copy)}  # fmt: skip
        for layout, suffix, dtype in TARGETS:
            name = f"{layout} {dtype} {suffix}" if dtype else f"{layout} {suffix}"
            out = os.path.join(root, f"out-{name.replace(' ', '')}")
            cast = ["--dtype", dtype] if dtype else []
            cmd = mconv + [out, "--to", layout, "--spec", spec, *cast]
            jobs[f"convert -> {name}"] = (cmd, out)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
        for cmd, _ in jobs.values():
            run_measured(cmd)  # warm the page cache; leave an output to replace
        for _ in range(args.repeat):  # round robin: a noisy moment hits every job alike
            for name, (cmd, out) in jobs.items():
                runs[name].append(run_measured(cmd, out if args.new_files else None))
        results = {}
        for name, measured in runs.items():
            wall = statistics.median(w for w, _ in measured)
            rss = max(r for _, r in measured)
            results[name] = {"seconds": round(wall, 2), "peak_rss_mib": round(rss, 1),
                             "rss_over_file_size": round(rss * 2**20 / size, 2),
                             "all_seconds": [round(w, 2) for w, _ in measured]}  # fmt: skip
    cp, synced = results["cp"]["seconds"], results["cp + fsync"]["seconds"]
    print(
        f"checkpoint: {size / 2**20:.0f} MiB; every job "
        f"{'writes a new file' if args.new_files else 'replaces its previous output'}; targets: "
        f"<= {TIME_TARGET}x cp, <= {RSS_TARGET}x the file size in peak RSS"
    )
    print(f"{'job':44s} {'seconds':>8s} {'x cp':>6s} {'x cp+fsync':>11s} {'peak RSS MiB':>13s} "
          f"{'RSS / size':>11s}")  # fmt: skip
    for name, r in results.items():
        ok = name.startswith("cp") or (r["seconds"] <= TIME_TARGET * cp
                                       and r["rss_over_file_size"] <= RSS_TARGET)  # fmt: skip
        print(f"{name:44s} {r['seconds']:8.2f} {r['seconds'] / cp:6.2f} "
              f"{r['seconds'] / synced:11.2f} {r['peak_rss_mib']:13.1f} "
              f"{r['rss_over_file_size']:11.2f}{'' if ok else '  MISSES THE TARGET'}")  # fmt: skip
    print(json.dumps({"size_mib": round(size / 2**20), "new_files": args.new_files, **results}))


if __name__ == "__main__":
    main()
