"""Train a small ResNeXt-style net on scikit-learn's digits, on one rank or many.

    mpiexec -n 2 python -m mpi4py examples/train_digits.py                      # groups split over 2 ranks
    mpiexec -n 2 python -m mpi4py examples/train_digits.py --data-parallel      # batch split over 2 ranks
    mpiexec -n 4 python -m mpi4py examples/train_digits.py --group-parallel 2   # 2 replicas x 2 shards
    python examples/train_digits.py                                             # one process
    mpiexec -n 2 python -m mpi4py examples/train_digits.py --data-parallel --sync-bn  # BN over both
    mpiexec -n 2 python -m mpi4py examples/train_digits.py --device cuda        # a GPU per rank (CuPy)

The net: a stem conv, two residual blocks of grouped 3x3 convs (4 groups) with BatchNorm,
a grouped transition conv, global average pooling and a linear head. The ranks form a grid
P = (P/K data replicas) x (K group shards), K = ``--group-parallel`` (default gcd(P, 4)).
Within a replica the stem is column-parallel (its 16 output channels split), every grouped
conv is group-parallel on those shards and every BatchNorm sharded (no communication
between them), the last conv gathers its output, and the head is replicated. DataParallel
averages gradients over the replicas; BatchNorm statistics are each replica's own, or,
with ``--sync-bn``, summed over the replicas (then any grid trains the serial curve; without
it, only grids of one replica do). With ``--device cuda``
each rank trains on its GPU (``parallel.init()`` binds GPU local_rank) and
the collectives go through NCCL where it can. Every rank draws the
same initialisation and the same batches, so any grid trains the same model
as one process (the loss curves agree to rounding; compare with --curve).

At the end the full model is gathered and saved as safetensors (and as
per-rank shards merged into one file), reloaded into a fresh parallel model
and into a plain serial ``mconv.nn`` model, and both are evaluated again.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import layouts
import mconv
import parallel
from mconv import losses, nn, optim


def parse_args(world_size: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--group-parallel",
        type=int,
        default=math.gcd(world_size, 4),
        metavar="K",
        help="ranks that split each layer's groups/channels (1, 2 or 4; default gcd(P, 4))",
    )
    p.add_argument("--data-parallel", action="store_true", help="same as --group-parallel 1")
    p.add_argument("--sync-bn", action="store_true",
                   help="BatchNorm statistics over every data replica (SyncBatchNorm)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=48, help="global batch (split over replicas)")
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda' (this rank's GPU, via CuPy)")
    p.add_argument("--out", help="folder for the safetensors files (default: a temporary one)")
    p.add_argument("--curve", help="write the loss curve and accuracies here as JSON")
    args = p.parse_args()
    if args.data_parallel:
        args.group_parallel = 1
    k = args.group_parallel
    if k < 1 or 4 % k or world_size % k:
        p.error(
            f"--group-parallel must divide both 4 and the number of ranks ({world_size}), but got {k}"
        )
    if args.batch_size % (world_size // k) or args.epochs < 1:
        p.error(
            f"--batch-size must be divisible by the {world_size // k} data replicas and --epochs >= 1"
        )
    return args


def build_model(group_comm, dtype, sync_comm=None) -> nn.Sequential:
    """1x8x8 -> 10 logits; convs and BatchNorms split over ``group_comm`` (size 1: a serial
    model), BatchNorm statistics summed over ``sync_comm`` too when given."""
    g = group_comm

    def conv(cin, cout, gather=False):  # a grouped 3x3 on channel shards
        return parallel.GroupParallelConv2d(cin, cout, 3, padding=1, groups=4, bias=False,
                                            dtype=dtype, comm=g, input_is_sharded=True,
                                            gather_output=gather)  # fmt: skip

    def bn(channels):
        return parallel.ShardedBatchNorm2d(channels, dtype=dtype, comm=g, sync_comm=sync_comm)

    def block(channels):  # relu(x + bn(conv(relu(bn(conv(x))))))
        body = nn.Sequential(conv(channels, channels), bn(channels), nn.ReLU(),
                             conv(channels, channels), bn(channels))  # fmt: skip
        return nn.Sequential(nn.Residual(body), nn.ReLU())

    return nn.Sequential(
        parallel.ColumnParallelConv2d(1, 16, 3, padding=1, bias=False, dtype=dtype, comm=g,
                                      gather_output=False),  # fmt: skip
        bn(16), nn.ReLU(),
        block(16),
        nn.MaxPool2d(2),  # (B, 16/K, 8, 8) -> (B, 16/K, 4, 4)
        conv(16, 32), bn(32), nn.ReLU(),
        block(32),
        conv(32, 32, gather=True), nn.ReLU(),  # gathers: (B, 32, 4, 4)
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),  # (B, 32)
        nn.Linear(32, 10, dtype=dtype),
    )  # fmt: skip


def serial_model(dtype) -> nn.Sequential:
    """The same network from plain ``mconv.nn`` layers (what the saved file loads into)."""

    def conv(cin, cout):
        return nn.Conv2d(cin, cout, 3, padding=1, groups=4, bias=False, dtype=dtype)

    def block(c):
        body = nn.Sequential(conv(c, c), nn.BatchNorm2d(c, dtype=dtype), nn.ReLU(), conv(c, c),
                             nn.BatchNorm2d(c, dtype=dtype))  # fmt: skip
        return nn.Sequential(nn.Residual(body), nn.ReLU())

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False, dtype=dtype),
        nn.BatchNorm2d(16, dtype=dtype), nn.ReLU(),
        block(16),
        nn.MaxPool2d(2),
        conv(16, 32), nn.BatchNorm2d(32, dtype=dtype), nn.ReLU(),
        block(32),
        conv(32, 32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10, dtype=dtype),
    )  # fmt: skip


def on_device(array, device: str):
    """A host array on ``device`` ('cpu': itself)."""
    if device == "cpu":
        return array
    import cupy

    return cupy.asarray(array)


def on_host(array):
    """A NumPy array of a NumPy or CuPy array's values."""
    return array.get() if hasattr(array, "get") else np.asarray(array)


def accuracy(model, x, y, data_comm, device="cpu") -> float:
    """Each replica scores its block of the test set (BatchNorm in eval mode: the running
    statistics); the counts are summed."""
    rows = parallel.shard_range(len(x), data_comm)
    model.eval()
    logits = on_host(model(on_device(x[rows.start : rows.stop], device)))
    model.train()
    correct = np.sum(logits.argmax(axis=1) == y[rows.start : rows.stop])
    total = data_comm.allreduce(np.array([correct, len(rows)], dtype=np.int64))
    return float(total[0] / total[1])


def main() -> int:
    world = parallel.init()
    args = parse_args(world.size)
    dtype = np.dtype(args.dtype)
    data_comm, group_comm = world.grid(group_parallel=args.group_parallel)
    digits = load_digits()
    images = (digits.images / 16.0).astype(dtype)[:, None]  # (1797, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(
        images, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    mconv.manual_seed(args.seed)  # the same draws on every rank: shards of one serial init
    sync_comm = data_comm if args.sync_bn else None
    net = build_model(group_comm, dtype, sync_comm).to(args.device)
    model = parallel.DataParallel(net, data_comm)
    opt = optim.Adam(model.parameters(), lr=args.lr)
    rng = np.random.default_rng(args.seed)  # the same batches on every rank
    batch = args.batch_size
    mine = parallel.shard_range(batch, data_comm)  # this replica's rows of each batch
    steps = len(x_train) // batch
    curve, accuracies = [], []
    if world.rank == 0:
        print(
            f"{world.size} rank(s): {data_comm.size} data replica(s) x {group_comm.size} group shard(s); "
            f"{len(x_train)} train / {len(x_test)} test digits, global batch {batch}, {args.dtype}"
            f" on {args.device}"
        )
    start = time.perf_counter()
    bar = tqdm(total=args.epochs * steps, unit="step", disable=world.rank != 0, file=sys.stdout)
    total_steps = args.epochs * steps
    for epoch in range(args.epochs):
        order = rng.permutation(len(x_train))
        for step in range(steps):  # cosine decay: steady at the end, for BatchNorm's statistics
            opt.lr = args.lr * 0.5 * (1 + math.cos(math.pi * (epoch * steps + step) / total_steps))
            rows = order[step * batch : (step + 1) * batch][mine.start : mine.stop]
            logits = model(on_device(x_train[rows], args.device))
            loss, dlogits = losses.cross_entropy(logits, y_train[rows])
            opt.zero_grad()
            model.backward(dlogits)
            opt.step()
            curve.append(float(data_comm.allreduce(np.array([float(loss)]), "mean")[0]))
            bar.set_postfix(epoch=epoch + 1, loss=f"{curve[-1]:.4f}", refresh=False)
            bar.update()
        accuracies.append(accuracy(model, x_test, y_test, data_comm, args.device))
        if world.rank == 0:
            bar.write(
                f"epoch {epoch + 1:2d}  loss {np.mean(curve[-steps:]):.4f}  test accuracy {accuracies[-1]:.2%}"
            )
    bar.close()
    seconds = time.perf_counter() - start
    if world.rank == 0:
        print(
            f"final test accuracy {accuracies[-1]:.2%} after {args.epochs} epochs in {seconds:.1f} s"
        )
        used = sorted({c.gpu_transport for c in (data_comm, group_comm) if c.gpu_transport})
        if used:
            print(f"collectives on {args.device} arrays went through: {', '.join(used)}")
    ok = check_saved_model(
        world, data_comm, group_comm, net, args, dtype, x_test, y_test, accuracies[-1]
    )
    if world.rank == 0 and args.curve:
        with open(args.curve, "w") as f:
            json.dump(
                {
                    "loss": curve,
                    "accuracy": accuracies,
                    "ranks": world.size,
                    "group_parallel": group_comm.size,
                    "sync_bn": args.sync_bn,
                    "device": args.device,
                    "seconds": seconds,
                },
                f,
            )
    return 0 if ok else 1


def check_saved_model(world, data_comm, group_comm, net, args, dtype, x_test, y_test, expected):
    """Save (gathered, and per-rank shards merged), reload, re-evaluate; True if all agree."""
    temporary = args.out is None
    folder = world.broadcast_object(
        tempfile.mkdtemp(prefix="digits-") if temporary and world.rank == 0 else args.out
    )
    os.makedirs(folder, exist_ok=True)
    full_path = os.path.join(folder, "digits.safetensors")
    state = parallel.gather_state_dict(net, world, root=0)  # full arrays on rank 0 only
    state = {name: on_host(array) for name, array in state.items()}
    if world.rank == 0:
        parallel.save_full(state, full_path, metadata={"model": "examples/train_digits.py"})
    parallel.save_shard(net, os.path.join(folder, "digits-shard"), world)
    world.barrier()
    ok = True
    if world.rank == 0:
        merged = parallel.merge_shards(
            sorted(glob.glob(os.path.join(folder, "digits-shard-rank*")))
        )
        ok = all(np.array_equal(merged[k], v) for k, v in state.items())
        serial = serial_model(dtype)
        layouts.load_into(serial, full_path)  # through layouts: the file's layout is read back
        serial_acc = float(np.mean(serial.eval()(x_test).argmax(axis=1) == y_test))
        ok = ok and serial_acc == expected
        print(
            f"saved {full_path}; merged shards equal it: {ok}; "
            f"a serial mconv.nn model loaded from it scores {serial_acc:.2%}"
        )
    mconv.manual_seed(args.seed + 1)  # a different init, overwritten by the file
    fresh = build_model(group_comm, dtype, data_comm if args.sync_bn else None).to(args.device)
    parallel.scatter_state_dict(fresh, layouts.load_checkpoint(full_path).tensors, world, root=None)
    reloaded = accuracy(fresh, x_test, y_test, data_comm, args.device)
    ok = bool(world.allreduce(np.array([ok and reloaded == expected], np.int64), "min")[0])
    if world.rank == 0:
        print(
            f"reloaded into the {world.size}-rank model: test accuracy {reloaded:.2%} ({'same' if ok else 'DIFFERENT'})"
        )
    world.barrier()
    if temporary and world.rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    return ok


if __name__ == "__main__":
    limit = contextlib.nullcontext()
    if int(os.environ.get("PMI_SIZE", os.environ.get("OMPI_COMM_WORLD_SIZE", "1"))) > 1:
        limit = threadpool_limits(1)  # one BLAS thread per rank
        mconv.set_num_threads(1)  # and no mconv worker threads: a rank per core
    with limit:
        sys.exit(main())
