"""Checks of DataParallel, the hybrid data x group grid, sharded state and the doctests.

Reference: the serial model (same seed, same layers as ``mconv.nn``)
trained on the whole global batch on every rank.
"""

from __future__ import annotations

import doctest
import glob
import importlib
import os
import shutil
import tempfile

import numpy as np
from mpi_harness import check

import mconv
import parallel
from mconv import losses, nn, optim

BATCH = 12  # divisible by 1, 2, 3 and 4 ranks


def batch_data(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((BATCH, 2, 6, 6)).astype(dtype), rng.integers(0, 5, BATCH)


def serial_model(dtype):
    return nn.Sequential(
        nn.Conv2d(2, 12, 3, padding=1, dtype=dtype),
        nn.ReLU(),
        nn.Conv2d(12, 12, 3, padding=1, groups=12, dtype=dtype),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(12, 8, 1, dtype=dtype),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(72, 5, dtype=dtype),
    )


def sharded_model(dtype, group_comm):
    """``serial_model`` with its convs split over ``group_comm`` (column -> group -> row)."""
    g = group_comm
    return nn.Sequential(
        parallel.ColumnParallelConv2d(
            2, 12, 3, padding=1, dtype=dtype, comm=g, gather_output=False
        ),
        nn.ReLU(),
        parallel.GroupParallelConv2d(
            12,
            12,
            3,
            padding=1,
            groups=12,
            dtype=dtype,
            comm=g,
            input_is_sharded=True,
            gather_output=False,
        ),
        nn.ReLU(),
        nn.MaxPool2d(2),
        parallel.RowParallelConv2d(12, 8, 1, dtype=dtype, comm=g, input_is_sharded=True),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(72, 5, dtype=dtype),
    )


def train(model, x, y, opt, steps, dp_rows=None):
    """``steps`` steps of mean cross-entropy on (x, y) or on its rows ``dp_rows``."""
    for step in range(steps):
        xs, ys = (x, y) if dp_rows is None else (x[dp_rows], y[dp_rows])
        xs = (xs * (1.0 + 0.1 * step)).astype(x.dtype)
        _, dlogits = losses.cross_entropy(model(xs), ys)
        opt.zero_grad()
        model.backward(dlogits)
        opt.step()


def rows(comm):
    block = parallel.shard_range(BATCH, comm)
    return slice(block.start, block.stop)


@check()
def data_parallel_equals_serial_training(comm, t):
    cases = [
        (np.float64, 25, optim.Adam, 1e-12),
        (np.float64, 1e-4, optim.Adam, 1e-12),
        (np.float32, 25, optim.SGD, 2e-5),
        (np.float16, 1e-3, optim.SGD, 3e-2),
    ]
    for dtype, bucket_mb, opt_cls, tol in cases:
        x, y = batch_data(dtype)
        kw = {"lr": 0.01} if opt_cls is optim.Adam else {"lr": 0.1, "momentum": 0.9}
        mconv.manual_seed(0)
        serial = serial_model(dtype)
        train(serial, x, y, opt_cls(serial.parameters(), **kw), steps=3)
        mconv.manual_seed(0 if comm.rank == 0 else 100 + comm.rank)  # rank 0's init must win
        model = parallel.DataParallel(serial_model(dtype), comm, bucket_mb=bucket_mb)
        t.true(
            len(model.bucket_sizes) >= (1 if bucket_mb == 25 else 2),
            f"buckets: {model.bucket_sizes}",
        )
        train(model, x, y, opt_cls(model.parameters(), **kw), steps=3, dp_rows=rows(comm))
        for (name, p), (_, q) in zip(model.module.named_parameters(), serial.named_parameters()):
            t.close(
                p.data, q.data, f"DataParallel {np.dtype(dtype)} bucket_mb={bucket_mb}: {name}", tol
            )


@check()
def data_parallel_no_sync_and_errors(comm, t):
    x, y = batch_data(np.float64, seed=1)
    mconv.manual_seed(1)
    serial = serial_model(np.float64)
    mconv.manual_seed(1)
    model = parallel.DataParallel(serial_model(np.float64), comm)
    micro = [x, 1.5 * x]  # two micro-batches, grads accumulated
    for xs in micro:
        _, d = losses.cross_entropy(serial(xs), y)
        serial.backward(d)
    with model.no_sync():
        _, d = losses.cross_entropy(model(micro[0][rows(comm)]), y[rows(comm)])
        model.backward(d)
    _, d = losses.cross_entropy(model(micro[1][rows(comm)]), y[rows(comm)])
    model.backward(d)
    for (name, p), (_, q) in zip(model.module.named_parameters(), serial.named_parameters()):
        t.close(p.grad, q.grad, f"accumulated grad {name}")
    t.true(sorted(model.state_dict())[0].startswith("module."), "state_dict keys as PyTorch's DDP")
    t.raises(
        TypeError,
        lambda: parallel.DataParallel(serial, comm.mpi),
        "mpi4py comm",
        match="parallel.Communicator",
    )
    t.raises(
        TypeError,
        lambda: parallel.DataParallel(serial, comm, bucket_mb="1"),
        "bucket_mb str",
        match="bucket_mb='1'",
    )
    t.raises(
        ValueError,
        lambda: parallel.DataParallel(serial, comm, bucket_mb=0),
        "bucket_mb=0",
        match="bucket_mb=0",
    )
    if comm.size > 1:
        extra = nn.Sequential(nn.Linear(3, 3), *([nn.Linear(3, 2)] if comm.rank == 1 else []))
        t.raises(
            ValueError,
            lambda: parallel.DataParallel(extra, comm),
            "extra layer on rank 1",
            match="parameters .* rank 1",
        )
        typed = nn.Sequential(nn.Linear(3, 3, dtype=np.float64 if comm.rank else np.float32))
        t.raises(
            ValueError,
            lambda: parallel.DataParallel(typed, comm),
            "dtype differs",
            match="float32.*float64",
        )
        t.raises(
            ValueError,
            lambda: parallel.DataParallel(serial, comm, bucket_mb=1 + comm.rank),
            "bucket_mb differs",
            match="bucket_mb",
        )


@check()
def hybrid_grid_equals_serial_training(comm, t):
    """Every grid P = (P/k) x k: DataParallel over data_comm, column/group/row over group_comm."""
    x, y = batch_data(np.float64, seed=2)
    mconv.manual_seed(3)
    serial = serial_model(np.float64)
    train(serial, x, y, optim.Adam(serial.parameters(), lr=0.01), steps=3)
    expected = serial.state_dict()
    for k in [k for k in range(1, comm.size + 1) if comm.size % k == 0]:
        data_comm, group_comm = comm.grid(group_parallel=k)
        mconv.manual_seed(3)
        model = parallel.DataParallel(sharded_model(np.float64, group_comm), data_comm)
        train(
            model, x, y, optim.Adam(model.parameters(), lr=0.01), steps=3, dp_rows=rows(data_comm)
        )
        full = parallel.gather_state_dict(model, comm, root=None)
        t.true(list(full) == ["module." + n for n in expected], f"grid k={k}: names {list(full)}")
        for name, value in expected.items():
            t.close(
                full["module." + name],
                value,
                f"grid {comm.size // k}x{k}: {name} after 3 Adam steps",
            )
        on_root = parallel.gather_state_dict(model, comm, root=0)
        t.true(bool(on_root) == (comm.rank == 0), f"grid k={k}: the full dict only on root")


@check()
def scatter_state_dict_loads_shards(comm, t):
    k = comm.size if comm.size < 4 else 2
    _, group_comm = comm.grid(group_parallel=k)
    mconv.manual_seed(5)
    serial = serial_model(np.float64)
    full = serial.state_dict()
    x, _ = batch_data(np.float64, seed=3)
    for root in (0, comm.size - 1, None):
        mconv.manual_seed(50 + comm.rank)
        model = sharded_model(np.float64, group_comm)
        given = full if root is None or comm.rank == root else None
        parallel.scatter_state_dict(model, given, comm, root=root)
        t.close(model(x), serial(x), f"root={root}: forward after scatter_state_dict")
        back = parallel.gather_state_dict(model, comm, root=None)
        for name, value in full.items():
            t.equal(back[name], value, f"root={root}: gather(scatter({name}))")
    bad = dict(full)
    bad.pop("0.weight")
    bad_shape = {**full, "8.bias": np.zeros(6)}
    model = sharded_model(np.float64, group_comm)
    t.raises(
        ValueError,
        lambda: parallel.scatter_state_dict(model, bad if comm.rank == 0 else None, comm),
        "missing key",
        match='Missing key.*"0.weight"',
    )
    t.raises(
        ValueError,
        lambda: parallel.scatter_state_dict(model, bad_shape if comm.rank == 0 else None, comm),
        "bad shape",
        match="size mismatch for 8.bias",
    )
    t.raises(
        TypeError,
        lambda: parallel.scatter_state_dict(model, [1] if comm.rank == 0 else None, comm),
        "not a mapping",
        match="got list",
    )
    t.raises(
        ValueError,
        lambda: parallel.gather_state_dict(model, comm, root=comm.size),
        "bad root",
        match="root",
    )


@check()
def safetensors_shards_merge_into_the_full_file(comm, t):
    from safetensors.numpy import load_file

    k = comm.size if comm.size < 4 else 2  # on 4 ranks shards repeat over 2 replicas
    data_comm, group_comm = comm.grid(group_parallel=k)
    folder = comm.broadcast_object(
        tempfile.mkdtemp(prefix="mconv-shards-") if comm.rank == 0 else None
    )
    mconv.manual_seed(7)
    model = parallel.DataParallel(sharded_model(np.float32, group_comm), data_comm)
    expected = parallel.gather_state_dict(model, comm, root=None)
    path = parallel.save_shard(model, os.path.join(folder, "ckpt"), comm)
    t.true(path.endswith(f"ckpt-rank{comm.rank:05d}-of-{comm.size:05d}.safetensors"), path)
    comm.barrier()
    if comm.rank == 0:
        files = sorted(glob.glob(os.path.join(folder, "ckpt-rank*.safetensors")))
        merged = parallel.merge_shards(files, os.path.join(folder, "full.safetensors"))
        reloaded = load_file(os.path.join(folder, "full.safetensors"))
        for name, value in expected.items():
            t.equal(merged[name], value, f"merge_shards {name}")
            t.equal(reloaded[name], value, f"full.safetensors {name}")
        if comm.size > 1 and k > 1:
            t.raises(
                ValueError,
                lambda: parallel.merge_shards(files[:1]),
                "a missing shard",
                match="needs shards",
            )
        t.raises(TypeError, lambda: parallel.merge_shards(files[0]), "one path string")
    for param in model.parameters():
        param.data[...] = 0
    parallel.load_shard(model, os.path.join(folder, "ckpt"), comm)
    again = parallel.gather_state_dict(model, comm, root=None)
    for name, value in expected.items():
        t.equal(again[name], value, f"load_shard {name}")
    comm.barrier()
    if comm.rank == 0:
        shutil.rmtree(folder)


@check()
def doctests_of_the_parallel_package(comm, t):
    names = [
        "parallel",
        "parallel.comm",
        "parallel.sharding",
        "parallel.gpu",
        "parallel.group_parallel",
        "parallel.tensor_parallel",
        "parallel.data_parallel",
        "parallel.state",
        "parallel.world",
    ]
    for name in names:
        result = doctest.testmod(importlib.import_module(name), report=False)
        t.true(
            result.failed == 0, f"doctests of {name}: {result.failed} of {result.attempted} failed"
        )
        t.true(result.attempted > 0, f"{name} has doctests")


@check()
def data_parallel_unused_parameters_and_changed_dtype(comm, t):
    """A parameter no rank used keeps grad None (weight decay and momentum leave it, as
    serially); after ``model.to(float64)`` the buckets follow the parameters."""
    x, y = batch_data(np.float32, seed=2)

    def body_and_unused_head():
        mconv.manual_seed(3)
        return nn.Sequential(serial_model(np.float32), nn.Linear(72, 5))

    serial = body_and_unused_head()
    model = parallel.DataParallel(body_and_unused_head(), comm)
    for net, xs, ys, sync in [
        (serial, x, y, None),
        (model.module, x[rows(comm)], y[rows(comm)], model),
    ]:
        opt = optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
        for _ in range(2):
            _, d = losses.cross_entropy(net[0](xs), ys)
            opt.zero_grad()
            net[0].backward(d)
            if sync is not None:
                sync.allreduce_gradients()
            opt.step()
    for (name, p), (_, q) in zip(model.module.named_parameters(), serial.named_parameters()):
        t.close(p.data, q.data, f"unused head, weight decay: {name}", 1e-5)
    t.true(model.module[1].weight.grad is None, "the unused head's grad stays None")
    model.to(np.float64)
    x64, y64 = batch_data(np.float64, seed=4)
    _, d = losses.cross_entropy(model.module[0](x64[rows(comm)]), y64[rows(comm)])
    model.module[0].backward(d)
    model.allreduce_gradients()
    grads = {p.grad.dtype for p in model.module[0].parameters()}
    t.true(grads == {np.dtype(np.float64)}, f"grads after to(float64): {grads}")
    t.raises(
        ValueError,
        lambda: parallel.DataParallel(serial, comm, bucket_mb=float("inf")),
        "bucket_mb=inf",
        match="bucket_mb=inf",
    )


@check()
def state_of_a_shared_layer_and_unexpected_keys(comm, t):
    """A parallel layer used twice (one set of Parameters under two names) gathers and
    scatters as the serial model would; strict=False reports root's unexpected keys."""
    mconv.manual_seed(5)
    layer = parallel.GroupParallelConv2d(12, 12, 1, groups=12, comm=comm)
    model = nn.Sequential(layer, nn.ReLU(), layer)
    mconv.manual_seed(5)
    serial_layer = nn.Conv2d(12, 12, 1, groups=12)
    full = parallel.gather_state_dict(model, comm, root=None)
    for name in ("0.weight", "2.weight", "0.bias", "2.bias"):
        expected = getattr(serial_layer, name.split(".")[1]).data
        t.close(full[name], expected, f"gathered {name} of the shared layer", 0.0)
    scaled = {name: 2 * value for name, value in full.items()}
    scaled["0.extra"] = np.ones(1)
    missing, unexpected = parallel.scatter_state_dict(
        model, scaled if comm.rank == 0 else None, comm, strict=False
    )
    t.true((missing, unexpected) == ([], ["0.extra"]), f"keys: {(missing, unexpected)}")
    block = list(parallel.shard_range(12, comm))
    t.close(layer.weight.data, 2 * serial_layer.weight.data[block], "scattered shard", 0.0)
