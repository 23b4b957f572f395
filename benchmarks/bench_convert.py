"""Converting a large checkpoint vs ``cp`` of the same file: wall time and peak RSS.

Writes a PyTorch zip checkpoint of ``--size-mb`` (conv-shaped float32 tensors;
needs the test extra for torch), then runs, each in its own process:
``cp``, ``mconv convert`` to torch-layout safetensors (a streamed copy) and
to Keras-layout safetensors (every tensor transposed). Each is run twice and
the second (warm page cache) run is reported.

    python benchmarks/bench_convert.py [--size-mb 1024] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 1024


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
    parser.add_argument(
        "--dir", default=None, help="where to write the files (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as root:
        src = os.path.join(root, "model.pt")
        size = make_checkpoint(src, args.size_mb)
        mconv = [sys.executable, "-m", "mconv", "convert", src]
        jobs = {
            "cp": ["cp", src, os.path.join(root, "copy.pt")],
            "convert -> torch safetensors": mconv
            + [os.path.join(root, "t.safetensors"), "--to", "torch"],
            "convert -> keras safetensors": mconv
            + [os.path.join(root, "k.safetensors"), "--to", "tensorflow"],
        }
        results = {}
        for name, cmd in jobs.items():
            run_measured(cmd)  # warm the page cache
            wall, rss = run_measured(cmd)
            results[name] = {"seconds": round(wall, 2), "peak_rss_mib": round(rss, 1),
                             "rss_over_file_size": round(rss * 2**20 / size, 2)}  # fmt: skip
    print(f"checkpoint: {size / 2**20:.0f} MiB")
    print(f"{'job':32s} {'seconds':>8s} {'peak RSS MiB':>13s} {'RSS / size':>11s}")
    for name, r in results.items():
        print(
            f"{name:32s} {r['seconds']:8.2f} {r['peak_rss_mib']:13.1f} {r['rss_over_file_size']:11.2f}"
        )
    print(json.dumps({"size_mib": round(size / 2**20), **results}))


if __name__ == "__main__":
    main()
