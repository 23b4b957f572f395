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
    python benchmarks/bench_parallel.py --faults   # what the fault checks cost, 2 ranks

``--faults`` times, at 2 ranks, each collective without and with a timeout
(``parallel.timeout``: non-blocking MPI polled with ``Test``) and the batch
and spatial size check of parallel layers per forward call: the median of
blocks of calls, the two settings interleaved block by block.

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


def per_call(fn, calls: int, blocks: int = 15) -> list[float]:
    """Seconds per call of each block of ``calls`` calls (every rank in step)."""
    from mpi4py import MPI

    times = []
    for _ in range(blocks):
        MPI.COMM_WORLD.Barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return times


def fault_costs() -> None:
    """Rank 0 prints the microseconds per call of each collective with no timeout and with
    one, and of the parallel layers' size check."""
    import parallel
    from parallel import timeout

    comm = parallel.init()
    cases = {
        f"allreduce {n * 4} B": (lambda x: lambda: comm.allreduce(x))(np.ones(n, np.float32))
        for n in (1, 2**16, 2**20)
    }
    cases["check_same (pickled object)"] = lambda: comm.check_same(("conv", 3, 64), "a config")
    cases["barrier"] = comm.barrier
    rows = {}
    for name, fn in cases.items():
        calls = 20 if "4194304" in name else 400
        per_call(fn, calls, blocks=2)  # warm-up
        plain, bounded = [], []
        for _ in range(9):  # interleaved: the machine's load hits both alike
            timeout.configure(None)
            plain += per_call(fn, calls, blocks=1)
            timeout.configure(600)
            bounded += per_call(fn, calls, blocks=1)
        timeout.configure(None)
        rows[name] = (statistics.median(plain) * 1e6, statistics.median(bounded) * 1e6)
    layer = parallel.GroupParallelConv2d(32, 32, 3, padding=1, groups=8, comm=comm)
    x = np.ones((8, 32, 16, 16), np.float32)
    check = statistics.median(per_call(lambda: layer._check_ranks_agree(x, 1), 400)) * 1e6
    forward = statistics.median(per_call(lambda: layer(x), 20)) * 1e6
    if comm.rank == 0:
        print("| call (2 ranks) | no timeout, us | timeout set, us | overhead |")
        print("|---|---:|---:|---:|")
        for name, (a, b) in rows.items():
            print(f"| {name} | {a:.1f} | {b:.1f} | {b / a - 1:+.0%} |")
        print(f"\nsize check per forward call: {check:.1f} us (GroupParallelConv2d 32->32, "
              f"groups=8, input 8x32x16x16: forward {forward:.0f} us, check {check / forward:.1%})")


def launch(ranks: int, model_name: str, mode: str, steps: int, raw: bool = False):
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
    if raw and done.returncode == 0:
        return done.stdout.strip()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--faults", action="store_true", help="the fault checks' cost, 2 ranks")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == ["faults", "-"]:
        fault_costs()
        return 0
    if args.worker:
        worker(*args.worker, args.steps)
        return 0
    if args.faults:
        print(launch(2, "faults", "-", 0, raw=True))
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
