"""Parallel benchmark: training-step time at 1 and 2 ranks, and the share spent communicating.

Runs itself under ``mpiexec`` (one job per row), with one BLAS thread per
rank, so 1 rank uses one core and 2 ranks use two. For each model the same
global batch is trained serially, data-parallel and group-parallel over 2
ranks (strong scaling):

    speedup     = t(1 rank) / t(2 ranks)
    efficiency  = speedup / 2
    comm share  = time inside collectives / step time (rank mean; waiting
                  for a slower rank counts as communication)

    python benchmarks/bench_parallel.py [--steps 30] [--markdown]

Needs mpi4py and mpiexec (``pip install mpi4py mpich``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "alltoall", "broadcast_into")

# name: (input (C, H, W), global batch, layer list of (kind, in, out, groups), classes)
MODELS = {
    "digits CNN (example)": ((1, 8, 8), 48, [("dense", 1, 16, 1), ("group", 16, 32, 4), ("pool",), ("group", 32, 32, 4)], 10),
    "grouped CNN 32x32": ((16, 32, 32), 32, [("dense", 16, 64, 1), ("group", 64, 128, 8), ("pool",), ("group", 128, 128, 8)], 10),
}  # fmt: skip


def build(spec, mode: str, world, dtype=np.float32):
    """The model of ``spec``; group mode splits convs over ``world``, data mode wraps it."""
    import parallel
    from mconv import nn

    (channels, height, width), _, layers, classes = spec
    split = mode == "group" and world.size > 1
    modules, sharded = [], False
    for index, layer in enumerate(layers):
        if layer[0] == "pool":
            modules.append(nn.MaxPool2d(2))
            height, width = height // 2, width // 2
            continue
        kind, c_in, c_out, groups = layer
        last = index == len(layers) - 1
        if not split:
            modules.append(nn.Conv2d(c_in, c_out, 3, padding=1, groups=groups, dtype=dtype))
        elif kind == "dense":
            modules.append(parallel.ColumnParallelConv2d(c_in, c_out, 3, padding=1, dtype=dtype, comm=world, gather_output=False))  # fmt: skip
            sharded = True
        else:
            modules.append(parallel.GroupParallelConv2d(c_in, c_out, 3, padding=1, groups=groups, dtype=dtype, comm=world, input_is_sharded=sharded, gather_output=last))  # fmt: skip
        modules.append(nn.ReLU())
    modules += [nn.Flatten(), nn.Linear(layers[-1][2] * height * width, classes, dtype=dtype)]
    model = nn.Sequential(*modules)
    return parallel.DataParallel(model, world) if mode == "data" and world.size > 1 else model


def time_collectives(comm, totals: dict) -> None:
    """Wrap ``comm``'s collectives so that their wall time adds up in ``totals['comm']``."""
    for name in COLLECTIVES:
        method = getattr(comm, name)

        def timed(*args, _method=method, **kwargs):
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                totals["comm"] += time.perf_counter() - start

        setattr(comm, name, timed)


def worker(model_name: str, mode: str, steps: int) -> None:
    import mconv
    import parallel
    from mconv import losses, optim

    world = parallel.init()
    spec = MODELS[model_name]
    (channels, height, width), batch, _, classes = spec
    mconv.manual_seed(0)
    model = build(spec, mode, world)
    opt = optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, channels, height, width)).astype(np.float32)
    y = rng.integers(0, classes, batch)
    if mode == "data":
        rows = parallel.shard_range(batch, world)
        x, y = x[rows.start : rows.stop], y[rows.start : rows.stop]
    totals = {"comm": 0.0}
    time_collectives(world, totals)
    step_times, comm_times = [], []
    for step in range(steps + 3):  # 3 warm-up steps
        world.barrier()
        totals["comm"] = 0.0
        start = time.perf_counter()
        _, dlogits = losses.cross_entropy(model(x), y)
        opt.zero_grad()
        model.backward(dlogits)
        opt.step()
        if step >= 3:
            step_times.append(time.perf_counter() - start)
            comm_times.append(totals["comm"])
    mine = (statistics.median(step_times), sum(comm_times) / sum(step_times))
    everyone = world.allgather_object(mine)
    if world.rank == 0:
        result = {
            "step_s": max(s for s, _ in everyone),  # the step ends when the slowest rank is done
            "comm_share": statistics.mean(c for _, c in everyone),
        }
        print("RESULT " + json.dumps(result), flush=True)


def launch(ranks: int, model_name: str, mode: str, steps: int) -> dict:
    beside = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(beside) if beside.exists() else "mpiexec"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MCONV_NUM_THREADS="1",
    )
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "mpi4py", __file__,
               "--worker", model_name, mode, "--steps", str(steps)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.steps)
        return 0
    rows = []
    for name in MODELS:
        serial = launch(1, name, "serial", args.steps)
        rows.append((name, 1, "serial", serial, 1.0))
        for mode in ("data", "group"):
            found = launch(2, name, mode, args.steps)
            rows.append((name, 2, mode + "-parallel", found, serial["step_s"] / found["step_s"]))
    header = "| model | ranks | mode | step ms | speedup | efficiency | comm share |"
    print(header if args.markdown else header.replace("|", " "))
    if args.markdown:
        print("|---|---:|---|---:|---:|---:|---:|")
    for name, ranks, mode, found, speedup in rows:
        cells = [name, str(ranks), mode, f"{found['step_s'] * 1e3:.1f}", f"{speedup:.2f}",
                 f"{speedup / ranks:.0%}", f"{found['comm_share']:.0%}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |" if args.markdown else "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
