"""Checks of the group-, column- and row-parallel layers against the serial layers.

Reference: the serial ``mconv.nn`` layer built with the same seed, run on
every rank on the full input (the serial layers are tested against PyTorch
float64 elsewhere). Every combination of full/sharded input and output is
compared: forward, dx, dW, db, then several optimizer steps.
"""

from __future__ import annotations

import numpy as np
from mpi_harness import check

import mconv
import parallel
from mconv import nn, optim


def block(array, comm, axis: int):
    """``comm``'s rank's block of ``array`` along ``axis`` (what a sharded tensor holds)."""
    return np.take(array, list(parallel.shard_range(array.shape[axis], comm)), axis=axis)


def build(comm, serial_cls, parallel_cls, args, kwargs, flags, seed=0):
    kwargs = {"dtype": np.float64, **kwargs}
    mconv.manual_seed(seed)
    serial = serial_cls(*args, **kwargs)
    mconv.manual_seed(seed)
    layer = parallel_cls(*args, comm=comm, **flags, **kwargs)
    return serial, layer


def compare_layer(comm, t, serial, layer, x, what, steps=3, output_size=None, device=None):
    """Forward, backward and ``steps`` SGD steps of ``layer`` against ``serial``; with
    ``device`` ('cuda'), ``layer`` and its inputs live there, ``serial`` on the host."""
    call = {} if output_size is None else {"output_size": output_size}
    put = (lambda a: a) if device is None else to_device_of(device)
    if device is not None:
        layer.to(device)
    axis = 1 if x.ndim == len(serial.kernel_size) + 2 else 0
    sharded_in = getattr(layer, "input_is_sharded", False)
    sharded_out = not getattr(layer, "gather_output", True)
    for name, axis_w in layer.shard_axes.items():
        full = getattr(serial, name)
        if full is not None:
            expected = full.data if axis_w is None else block(full.data, comm, axis_w)
            t.equal(
                getattr(layer, name).data, expected, f"{what}: initial {name} is the serial slice"
            )
    opt_s = optim.SGD(serial.parameters(), lr=0.05, momentum=0.9)
    opt_p = optim.SGD(layer.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(7)
    for step in range(steps):
        xs = (x + 0.1 * step).astype(x.dtype)
        y_s = serial(xs, **call)
        y_p = layer(put(block(xs, comm, axis) if sharded_in else xs), **call)
        t.close(y_p, block(y_s, comm, axis) if sharded_out else y_s, f"{what}: y (step {step})")
        dy = rng.standard_normal(y_s.shape).astype(x.dtype)
        opt_s.zero_grad()
        opt_p.zero_grad()
        dx_s = serial.backward(dy)
        dx_p = layer.backward(put(block(dy, comm, axis) if sharded_out else dy))
        t.close(dx_p, block(dx_s, comm, axis) if sharded_in else dx_s, f"{what}: dx (step {step})")
        for name, axis_w in layer.shard_axes.items():
            full = getattr(serial, name)
            if full is not None:
                expected = full.grad if axis_w is None else block(full.grad, comm, axis_w)
                t.close(getattr(layer, name).grad, expected, f"{what}: d{name} (step {step})")
        opt_s.step()
        opt_p.step()
    gathered = parallel.gather_state_dict(nn.Sequential(layer), comm, root=None)
    for name, value in nn.Sequential(serial).state_dict().items():
        t.close(gathered[name], value, f"{what}: {name} after {steps} steps")


def to_device_of(device):
    from mconv.nn.module import check_device, to_device

    return lambda array: to_device(array, check_device(device))


FLAG_COMBOS = [
    dict(input_is_sharded=False, gather_output=True),
    dict(input_is_sharded=True, gather_output=True),
    dict(input_is_sharded=False, gather_output=False),
    dict(input_is_sharded=True, gather_output=False),
]

# serial class, parallel class, args, kwargs, input shape, output_size
GROUP_CASES = [
    (
        nn.Conv1d,
        parallel.GroupParallelConv1d,
        (12, 24, 3),
        dict(stride=2, padding=1, groups=12),
        (2, 12, 9),
        None,
    ),
    (
        nn.Conv2d,
        parallel.GroupParallelConv2d,
        (24, 12, (3, 2)),
        dict(padding="same", dilation=(2, 1), groups=12, bias=False, padding_mode="reflect"),
        (2, 24, 6, 5),
        None,
    ),
    (
        nn.Conv3d,
        parallel.GroupParallelConv3d,
        (12, 12, 2),
        dict(
            stride=(1, 2, 1), padding=1, groups=12, padding_mode="circular", conv_mode="convolution"
        ),
        (12, 3, 4, 3),
        None,
    ),
    (
        nn.ConvTranspose1d,
        parallel.GroupParallelConvTranspose1d,
        (12, 24, 3),
        dict(stride=2, padding=1, output_padding=1, groups=12),
        (2, 12, 5),
        None,
    ),
    (
        nn.ConvTranspose2d,
        parallel.GroupParallelConvTranspose2d,
        (24, 12, 3),
        dict(stride=2, padding=1, groups=12, dilation=(1, 2)),
        (2, 24, 3, 4),
        (6, 10),
    ),
    (
        nn.ConvTranspose3d,
        parallel.GroupParallelConvTranspose3d,
        (12, 12, 2),
        dict(stride=2, groups=12, bias=True),
        (12, 2, 3, 2),
        None,
    ),
]


@check()
def group_parallel_layers_match_serial(comm, t):
    rng = np.random.default_rng(0)
    for serial_cls, parallel_cls, args, kwargs, shape, output_size in GROUP_CASES:
        x = rng.standard_normal(shape)
        for flags in FLAG_COMBOS:
            serial, layer = build(comm, serial_cls, parallel_cls, args, kwargs, flags)
            what = f"{parallel_cls.__name__} {flags}"
            compare_layer(comm, t, serial, layer, x, what, output_size=output_size)


@check()
def group_parallel_fp32_fp16(comm, t):
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float16):
        kwargs = dict(padding=1, groups=12, dtype=dtype)
        for flags in (FLAG_COMBOS[0], FLAG_COMBOS[3]):
            serial, layer = build(
                comm, nn.Conv2d, parallel.GroupParallelConv2d, (12, 24, 3), kwargs, flags
            )
            x = rng.standard_normal((2, 12, 5, 5)).astype(dtype)
            compare_layer(
                comm, t, serial, layer, x, f"GroupParallelConv2d {np.dtype(dtype)} {flags}", steps=2
            )


DENSE_CASES = [
    (nn.Conv1d, parallel.ColumnParallelConv1d, (5, 12, 3), dict(padding=2, dilation=2), (2, 5, 8)),
    (
        nn.Conv2d,
        parallel.ColumnParallelConv2d,
        (3, 12, 3),
        dict(stride=2, padding_mode="replicate", padding=1),
        (3, 7, 6),
    ),
    (nn.Conv3d, parallel.ColumnParallelConv3d, (2, 12, 2), dict(bias=False), (2, 2, 3, 3, 3)),
    (nn.Conv1d, parallel.RowParallelConv1d, (12, 5, 3), dict(padding=1), (2, 12, 7)),
    (
        nn.Conv2d,
        parallel.RowParallelConv2d,
        (12, 7, (2, 3)),
        dict(padding="same", padding_mode="reflect"),
        (2, 12, 5, 6),
    ),
    (
        nn.Conv3d,
        parallel.RowParallelConv3d,
        (12, 3, 2),
        dict(stride=2, conv_mode="convolution"),
        (12, 4, 4, 4),
    ),
]


@check()
def column_and_row_parallel_match_serial(comm, t):
    rng = np.random.default_rng(2)
    for serial_cls, parallel_cls, args, kwargs, shape in DENSE_CASES:
        x = rng.standard_normal(shape)
        flag = "gather_output" if "Column" in parallel_cls.__name__ else "input_is_sharded"
        for value in (False, True):
            serial, layer = build(comm, serial_cls, parallel_cls, args, kwargs, {flag: value})
            compare_layer(comm, t, serial, layer, x, f"{parallel_cls.__name__} {flag}={value}")
    for dtype in (np.float32, np.float16):
        x = rng.standard_normal((2, 12, 5, 5)).astype(dtype)
        for cls in (parallel.ColumnParallelConv2d, parallel.RowParallelConv2d):
            serial, layer = build(
                comm, nn.Conv2d, cls, (12, 12, 3), dict(padding=1, dtype=dtype), {}
            )
            compare_layer(comm, t, serial, layer, x, f"{cls.__name__} {np.dtype(dtype)}", steps=2)


COLLECTIVES = (
    "allreduce",
    "allgather",
    "reduce_scatter",
    "alltoall",
    "broadcast",
    "broadcast_into",
)


def count_collectives(comm):
    """Replace comm's collectives by counting wrappers; returns the counts (restore: ``del``)."""
    counts = {}
    for name in COLLECTIVES:
        method = getattr(comm, name)

        def counted(*args, _name=name, _method=method, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _method(*args, **kwargs)

        setattr(comm, name, counted)
    return counts


def uncount(comm):
    for name in COLLECTIVES:
        del comm.__dict__[name]


@check()
def chained_layers_communicate_only_at_the_ends(comm, t):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 12, 6, 6)).astype(np.float32)
    blocks = {
        "group->group": lambda: [
            parallel.GroupParallelConv2d(
                12, 24, 3, padding=1, groups=4 * 3, comm=comm, gather_output=False
            ),
            nn.ReLU(),
            nn.MaxPool2d(2),
            parallel.GroupParallelConv2d(
                24, 12, 3, padding=1, groups=12, comm=comm, input_is_sharded=True
            ),
        ],
        "column->row": lambda: [
            parallel.ColumnParallelConv2d(12, 24, 3, padding=1, comm=comm, gather_output=False),
            nn.ReLU(),
            parallel.RowParallelConv2d(24, 12, 1, comm=comm, input_is_sharded=True),
        ],
        "column->group->row": lambda: [
            parallel.ColumnParallelConv2d(12, 24, 1, comm=comm, gather_output=False),
            parallel.GroupParallelConv2d(
                24, 24, 3, groups=12, comm=comm, input_is_sharded=True, gather_output=False
            ),
            parallel.RowParallelConv2d(24, 12, 1, comm=comm, input_is_sharded=True),
        ],
    }
    k = int(comm.size > 1)  # forward: + one small allreduce per parallel layer (size check)
    expected = {
        "group->group": ({"allgather": 1, "allreduce": 2 * k} if k else {"allgather": 1},
                         {"allgather": 1}),
        "column->row": ({"allreduce": 1 + 2 * k}, {"allreduce": 1}),
        "column->group->row": ({"allreduce": 1 + 3 * k}, {"allreduce": 1}),
    }  # fmt: skip
    for name, make in blocks.items():
        mconv.manual_seed(4)
        model = nn.Sequential(*make())
        counts = count_collectives(comm)
        y = model(x)
        forward = dict(counts)
        counts.clear()
        model.backward(np.ones_like(y))
        backward = dict(counts)
        uncount(comm)
        t.true(
            (forward, backward) == expected[name],
            f"{name}: collectives (forward, backward) = {(forward, backward)}, expected {expected[name]}",
        )
        serial = nn.Sequential(*[_serial_twin(m) for m in model])
        t.close(y, serial(x), f"{name}: output equals the serial chain")


def _serial_twin(module):
    """The serial layer a parallel layer stands for, with the gathered weights."""
    if not isinstance(module, parallel.ShardedConv):
        return module
    full = parallel.gather_state_dict(nn.Sequential(module), module.comm, root=None)
    twin = module._serial(
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        padding=module.options()["padding"],
        groups=module.groups,
        dtype=module.weight.dtype,
    )
    twin.load_state_dict({k[2:]: v for k, v in full.items()})
    return twin


@check()
def layer_errors(comm, t):
    gp = parallel.GroupParallelConv2d
    t.raises(
        TypeError,
        lambda: gp(4, 4, 3, groups=4, comm=None),
        "comm=None",
        match="Communicator.*got NoneType",
    )
    t.raises(
        TypeError,
        lambda: gp(4, 4, 3, groups=4, comm=comm.mpi),
        "comm=mpi4py comm",
        match="parallel.Communicator",
    )
    t.raises(
        TypeError,
        lambda: gp(4, 4, 3, groups=4, comm=comm, gather_output="no"),
        "flag type",
        match="gather_output='no'",
    )
    t.raises(
        ValueError,
        lambda: gp(4, 4, 0, groups=4, comm=comm),
        "kernel_size=0 (core check)",
        match="kernel_size",
    )
    t.raises(
        ValueError,
        lambda: parallel.ColumnParallelConv2d(4, 4, 3, groups=2, comm=comm),
        "grouped column",
        match="groups=2",
    )
    if comm.size > 1:
        t.raises(
            ValueError, lambda: gp(5, 5, 3, groups=5, comm=comm), "groups % P", match="groups=5"
        )
        t.raises(
            ValueError,
            lambda: parallel.ColumnParallelConv1d(4, 2 * comm.size + 1, 3, comm=comm),
            "out % P",
            match="out_channels",
        )
        t.raises(
            ValueError,
            lambda: parallel.RowParallelConv1d(2 * comm.size + 1, 4, 3, comm=comm),
            "in % P",
            match="in_channels",
        )
        t.raises(
            ValueError,
            lambda: gp(4, 4, 3 + (comm.rank == 1), groups=4, comm=comm),
            "kernel differs across ranks",
            match="configuration must be the same on every rank.*kernel_size",
        )
        t.raises(
            ValueError,
            lambda: gp(4, 4, 3, groups=4, comm=comm, input_is_sharded=comm.rank == 0),
            "flags differ",
            match="input_is_sharded",
        )
    layer = gp(12, 12, 3, groups=12, comm=comm)
    t.raises(
        RuntimeError,
        lambda: layer.backward(np.ones((1, 12, 3, 3), np.float32)),
        "backward first",
        match="before forward",
    )
    t.raises(
        ValueError,
        lambda: layer(np.ones((1, 6, 5, 5), np.float32)),
        "channels",
        match="12 channels",
    )
    t.raises(ValueError, lambda: layer(np.ones((5, 5), np.float32)), "rank", match="3-D .* or 4-D")
    row = parallel.RowParallelConv2d(12, 3, 1, comm=comm, dtype=np.float16)
    t.raises(
        TypeError,
        lambda: row(np.ones((1, 12, 5, 5), np.float32)),
        "dtype mismatch",
        match="input.dtype=float32, weight.dtype=float16",
    )
    y = layer(np.ones((1, 12, 5, 5), np.float32))
    t.raises(
        ValueError,
        lambda: layer.backward(np.ones((1, 12, 5, 5), np.float32)),
        "dy shape",
        match="grad_output",
    )
    t.true(y.shape == (1, 12, 3, 3), "forward after failed calls")
    t.true("rank=" in repr(layer) and "groups=12" in repr(layer), f"repr: {layer!r}")
    t.true(sorted(layer.state_dict()) == ["bias", "weight"], "state_dict holds the local shard")
    t.true(layer.weight.shape[0] == 12 // comm.size, "local shard shape")


@check()
def mappings_are_adjoint_pairs(comm, t):
    """Each communication step's backward is the adjoint of its forward. A replicated array
    (the same on every rank) is one value; per-rank arrays are one value per rank, so their
    inner products add up over ranks: <forward(x), y> = <x, backward(y)>."""
    from parallel import mappings

    mine, shared = np.random.default_rng(comm.rank), np.random.default_rng(99)
    # step: (x replicated?, y replicated?)
    steps = {"NoComm": (False, False), "CopyToShards": (True, False),
             "ReduceFromShards": (False, True), "ScatterToShards": (True, False),
             "GatherFromShards": (False, True)}  # fmt: skip

    def inner(a, b, replicated):
        value = float(np.vdot(a, b))
        return value if replicated else float(comm.allreduce(np.array(value)))

    for step, (x_shared, y_shared) in steps.items():
        mapping = getattr(mappings, step)(comm)
        for axis, shape in [(1, (2, 2 * comm.size, 3)), (0, (comm.size, 5))]:
            x = (shared if x_shared else mine).standard_normal(shape)
            fx = mapping.forward(x.copy(), axis)
            y = (shared if y_shared else mine).standard_normal(fx.shape)
            bty = mapping.backward(y.copy(), axis)
            left, right = inner(fx, y, y_shared), inner(x, bty, x_shared)
            t.true(abs(left - right) <= 1e-12 * max(1.0, abs(left)),
                   f"{step} axis={axis}: <forward(x), y> = {left} but <x, backward(y)> = {right}")  # fmt: skip
