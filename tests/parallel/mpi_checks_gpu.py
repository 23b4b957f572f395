"""The GPU side of ``parallel``: device binding, the transport choice, every collective
through each transport (NCCL, CUDA-aware MPI, host staging) on each dtype, odd
and uneven sizes and strided inputs, DataParallel's buckets on device arrays,
NCCL communicators of a 2x2 grid, and the group-, column- and row-parallel
layers on device arrays.

Run under mpiexec by ``mpi_main_gpu.py``: in CI on the CPU stand-in for CuPy
and NCCL (tests/cupy_stand_in, 4 GPUs per host), which runs ``parallel`` unchanged
and checks every pointer, count and stream it is handed; on a machine with
CuPy and GPUs (``MCONV_TEST_REAL_GPU=1``, tests/gpu/test_gpu_parallel.py) on
the real ones, with the transports that machine can use. The reference, as
in ``mpi_checks_comm``, is every rank's input regenerated from its seed and
reduced with plain NumPy.
"""

from __future__ import annotations

import os

import numpy as np
from mpi_checks_comm import REDUCE_TOL, data, reference_reduce
from mpi_checks_layers import DENSE_CASES, FLAG_COMBOS, GROUP_CASES, build, compare_layer
from mpi_harness import check, stand_in

import parallel
from mconv import nn
from parallel import gpu

GPU_CHECKS: dict[str, tuple] = {}
DTYPES = (np.float16, np.float32, np.float64, np.int32, np.int64, np.uint8, np.complex64)


def gpu_check(sizes=(1, 2, 3, 4)):
    return check(sizes, registry=GPU_CHECKS)


def cupy():
    import cupy as module  # the fake unless mpi_main_gpu runs on real GPUs

    return module


def is_fake() -> bool:
    return isinstance(cupy(), stand_in().FakeCupy)


def one_gpu_per_rank(comm) -> bool:
    """Whether init() bound every rank of this host to a GPU of its own."""
    return comm.local_size <= cupy().cuda.runtime.getDeviceCount()


def transports(comm) -> list[str]:
    """The transports this machine can run: all three on the fake; on real GPUs NCCL needs a
    GPU per rank, CUDA-aware MPI an MPI library that is."""
    if is_fake():
        return list(gpu.TRANSPORTS)
    usable = {"nccl": one_gpu_per_rank(comm), "cuda-aware-mpi": gpu.cuda_aware_mpi()}
    return [name for name in gpu.TRANSPORTS if usable.get(name, True)]


def device(array):
    return cupy().asarray(array)


def value(rank, shape, dtype, seed):
    """``data`` for every dtype; complex values have both parts."""
    if np.dtype(dtype).kind == "c":
        real = data(rank, shape, np.float32, seed)
        return (real + 1j * data(rank, shape, np.float32, seed + 100)).astype(dtype)
    return data(rank, shape, dtype, seed)


def tolerance(dtype):
    return REDUCE_TOL.get(np.dtype(dtype).type, 1e-6 if np.dtype(dtype).kind == "c" else 0.0)


def on_device(t, result, dtype, what) -> bool:
    return t.true(
        gpu.is_cupy(result) and result.dtype == np.dtype(dtype),
        f"{what}: got {type(result).__name__} {getattr(result, 'dtype', None)}, expected a "
        f"device array of {np.dtype(dtype)}",
    )


def with_transport(comm, name: str | None, **env: str):
    """A fresh communicator over comm's ranks whose GPU transport is built now (collectively),
    forced to ``name`` (None: chosen), with ``env`` set while it is chosen."""
    if name is not None:
        env["MCONV_PARALLEL_GPU_TRANSPORT"] = name
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        sub = comm.split(0)
        sub.allreduce(cupy().zeros(1))
    finally:
        for key, old in saved.items():
            if old is None:
                del os.environ[key]
            else:
                os.environ[key] = old
    return sub


def traffic(name: str) -> int:
    """How much the fake saw of transport ``name`` so far (calls, syncs, host copies); 0 on
    real GPUs."""
    if not is_fake():
        return 0
    cuda = cupy().cuda
    return {
        "nccl": len(cuda.nccl.calls),
        "cuda-aware-mpi": cuda.get_current_stream().synchronized,
        "host": cupy().state.host_copies,
    }[name]


@gpu_check()
def binding_and_transport_choice(comm, t):
    cuda = cupy().cuda
    count = cuda.runtime.getDeviceCount()
    t.true(comm.device == comm.local_rank % count, f"bound device {comm.device} of {count}")
    t.true(cuda.runtime.getDevice() == comm.device, "the bound device is current")
    if one_gpu_per_rank(comm):
        got = with_transport(comm, None).gpu_transport
        t.true(got == "nccl", f"one GPU per rank: {got}, expected nccl")
    cuda.Device(0).use()  # every rank on GPU 0 of this host: NCCL refuses that
    shared = "nccl" if comm.size == 1 else "host"
    got = with_transport(comm, None, MCONV_CUDA_AWARE_MPI="0").gpu_transport
    t.true(got == shared, f"ranks sharing a GPU: {got}, expected {shared}")
    if is_fake() or gpu.cuda_aware_mpi():  # a real MPI must be CUDA-aware to be told it is
        got = with_transport(comm, None, MCONV_CUDA_AWARE_MPI="1").gpu_transport
        expected = "nccl" if comm.size == 1 else "cuda-aware-mpi"
        t.true(got == expected, f"shared GPU, CUDA-aware MPI: {got}, expected {expected}")
    cuda.Device(comm.device).use()
    if not is_fake():
        return
    cuda.nccl.available = comm.rank != comm.size - 1  # the last rank has no NCCL
    try:
        got = with_transport(comm, None, MCONV_CUDA_AWARE_MPI="0").gpu_transport
        t.true(got == "host", f"NCCL missing on one rank: {got}")
    finally:
        cuda.nccl.available = True
    version = cuda.nccl.get_version
    for release, expected in [((2, 6, 4), "host"), ((2, 7, 8), "nccl"), ((2, 8, 4), "nccl")]:
        cuda.nccl.get_version = lambda: stand_in().version_code(*release)  # noqa: B023
        try:  # no send/recv before NCCL 2.7; 2.7 and 2.8 count in thousands
            got = with_transport(comm, None, MCONV_CUDA_AWARE_MPI="0").gpu_transport
            t.true(got == expected, f"NCCL {release} ({cuda.nccl.get_version()}): {got}")
        finally:
            cuda.nccl.get_version = version


@gpu_check()
def allreduce_on_every_transport(comm, t):
    for name in transports(comm):
        sub = with_transport(comm, name)
        t.true(sub.gpu_transport == name, f"forced {name}: got {sub.gpu_transport}")
        before = traffic(name)
        for dtype in DTYPES:
            kind = np.dtype(dtype).kind
            ops = ("sum", "mean") if kind == "c" else parallel.REDUCE_OPS
            for op in ops if kind in "fc" else ("sum", "max", "min"):
                for shape in [(7,), (3, 5), (), (0, 3)]:
                    arrays = [value(r, shape, dtype, 0) for r in range(comm.size)]
                    got = sub.allreduce(device(arrays[comm.rank]), op)
                    what = f"{name}: allreduce {op} {np.dtype(dtype)} {shape}"
                    if on_device(t, got, dtype, what):
                        t.close(got.get(), reference_reduce(arrays, op), what, tolerance(dtype))
        for dtype in (np.float16, np.float32, np.float64):
            bases = [value(r, (6, 10), dtype, 1) for r in range(comm.size)]
            expected = reference_reduce([b[::2, 1::3] for b in bases], "sum")
            mine = device(bases[comm.rank])[::2, 1::3]
            what = f"{name}: strided allreduce {np.dtype(dtype)}"
            got = sub.allreduce(mine)
            if on_device(t, got, dtype, what):
                t.close(got.get(), expected, what, tolerance(dtype))
            copy = mine.copy()
            back = sub.allreduce(copy, "mean", out=copy)
            t.true(back is copy, f"{name}: allreduce(out=x) returns x")
            t.close(copy.get(), expected / comm.size, f"{name}: in place", tolerance(dtype))
        got = sub.allreduce(device(np.full(5, 40000, dtype=np.float16)), "mean")
        t.equal(got.get(), np.full(5, 40000, np.float16), f"{name}: fp16 mean of 40000 (fp32 wire)")
        if comm.size > 1 and is_fake():
            t.true(traffic(name) > before, f"{name}: the fake saw no traffic")


@gpu_check()
def allgather_and_broadcast_on_every_transport(comm, t):
    root = comm.size - 1
    for name in transports(comm):
        sub = with_transport(comm, name)
        for dtype in (np.float16, np.float64, np.int64, np.uint8, np.bool_, np.complex64):
            for axis in (0, 1, -1):
                shapes = []
                for r in range(comm.size):
                    shape = [2, 3, 4]
                    shape[axis] = r % 3  # uneven blocks; rank 0 (and 3) send nothing
                    shapes.append(tuple(shape))
                arrays = [value(r, shapes[r], dtype, 2) for r in range(comm.size)]
                got = sub.allgather(device(arrays[comm.rank]), axis=axis)
                what = f"{name}: allgather {np.dtype(dtype)} axis={axis}"
                if on_device(t, got, dtype, what):
                    t.equal(got.get(), np.concatenate(arrays, axis=axis), what)
            bases = [value(r, (5, 8), dtype, 3) for r in range(comm.size)]
            got = sub.allgather(device(bases[comm.rank])[1::2, ::-3], axis=1)
            expected = np.concatenate([b[1::2, ::-3] for b in bases], axis=1)
            t.equal(got.get(), expected, f"{name}: strided allgather {np.dtype(dtype)}")
            source = value(root, (5, 7), dtype, 6)
            mine = device(source)[::2, 1::2] if comm.rank == root else None
            got = sub.broadcast(mine, root=root)
            what = f"{name}: broadcast {np.dtype(dtype)}"
            if on_device(t, got, dtype, what):
                t.equal(got.get(), source[::2, 1::2], what)
            buf = device(source if comm.rank == root else np.zeros_like(source))
            sub.broadcast_into(buf, root=root)
            t.equal(buf.get(), source, f"{name}: broadcast_into {np.dtype(dtype)}")


@gpu_check()
def reduce_scatter_and_alltoall_on_every_transport(comm, t):
    n = 2 * comm.size + 1  # never divisible: NCCL's padded path
    for name in transports(comm):
        sub = with_transport(comm, name)
        for dtype in (np.float16, np.float32, np.float64, np.int32, np.complex64):
            kind = np.dtype(dtype).kind
            for op in {"f": ("sum", "mean", "max"), "i": ("sum", "min"), "c": ("sum",)}[kind]:
                for axis, shape in [(0, (n, 3)), (1, (2, n, 3)), (-1, (3, 2 * comm.size))]:
                    arrays = [value(r, shape, dtype, 4) for r in range(comm.size)]
                    block = list(parallel.shard_range(shape[axis], sub))
                    expected = np.take(reference_reduce(arrays, op), block, axis=axis)
                    got = sub.reduce_scatter(device(arrays[comm.rank]), axis=axis, op=op)
                    what = f"{name}: reduce_scatter {op} {np.dtype(dtype)} {shape} axis={axis}"
                    if on_device(t, got, dtype, what):
                        t.close(got.get(), expected, what, tolerance(dtype))
        explicit = [n] if comm.size == 1 else [0] + [1] * (comm.size - 2) + [n - comm.size + 2]
        arrays = [value(r, (3, n), np.float64, 5) for r in range(comm.size)]
        start = sum(explicit[: comm.rank])
        expected = reference_reduce(arrays, "sum")[:, start : start + explicit[comm.rank]]
        got = sub.reduce_scatter(device(arrays[comm.rank]), axis=1, sizes=explicit)
        t.close(got.get(), expected, f"{name}: reduce_scatter with an empty block")
        for dtype in (np.float16, np.int64, np.bool_):
            for split_axis, concat_axis, m in [(0, 0, n), (0, 1, n), (2, 0, n), (1, 1, 1)]:
                shape = [3, 4, 5]  # m = 1: every rank but rank 0 gets an empty block
                shape[split_axis] = m
                cuts = np.cumsum(parallel.shard_sizes(m, comm.size))[:-1]
                arrays = [value(r, tuple(shape), dtype, 7) for r in range(comm.size)]
                blocks = [np.split(a, cuts, axis=split_axis)[comm.rank] for a in arrays]
                strided = device(arrays[comm.rank].T).T  # a transposed view of the same values
                got = sub.alltoall(strided, split_axis, concat_axis)
                what = f"{name}: alltoall {np.dtype(dtype)} {split_axis}->{concat_axis} of {m}"
                if on_device(t, got, dtype, what):
                    t.equal(got.get(), np.concatenate(blocks, axis=concat_axis), what)


def small_model():
    """Parameters of three dtypes (fp16, fp32, fp64) and one tensor that is None on rank 0."""
    import mconv

    mconv.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 1, groups=2), nn.Linear(3, 2))
    for param in model[0].parameters():
        param.data = param.data.astype(np.float16)
    for param in model[2].parameters():
        param.data = param.data.astype(np.float64)
    return model


@gpu_check()
def data_parallel_on_device_arrays(comm, t):
    expected_params = {name: p.data for name, p in small_model().named_parameters()}
    for name in transports(comm):
        sub = with_transport(comm, name)
        model = small_model()
        for param in model.parameters():  # every replica starts elsewhere ...
            param.data = device(param.data + comm.rank)
        dp = parallel.DataParallel(model, sub, bucket_mb=64 / 2**20)  # 64-byte buckets
        t.true(len(dp.bucket_sizes) > 3, f"{name}: several buckets {dp.bucket_sizes}")
        grads = {}
        for k, (pname, param) in enumerate(sorted(model.named_parameters())):
            per_rank = [value(r, param.shape, param.dtype, 10 + k) for r in range(comm.size)]
            if pname == "1.bias":  # None on rank 0: counts as zeros there
                per_rank[0] = np.zeros_like(per_rank[0])
            grads[pname] = np.mean([g.astype(np.float64) for g in per_rank], axis=0)
            param.grad = (
                None if (pname == "1.bias" and comm.rank == 0) else device(per_rank[comm.rank])
            )
            on_device(t, param.data, param.dtype, f"{name}: {pname} stays on the device")
            t.equal(param.data.get(), expected_params[pname], f"{name}: {pname} is rank 0's")
        dp.allreduce_gradients()
        for pname, param in model.named_parameters():
            what = f"{name}: averaged {pname}.grad"
            if pname == "1.bias" and comm.size == 1:  # None on every rank: stays None
                t.true(param.grad is None, f"{what}: {type(param.grad).__name__}, expected None")
            elif on_device(t, param.grad, param.dtype, what):
                t.close(param.grad.get(), grads[pname], what, tolerance(param.dtype))


@gpu_check(sizes=(4,))
def grid_communicators_on_nccl(comm, t):
    if not one_gpu_per_rank(comm):
        return
    data_comm, group_comm = comm.grid(group_parallel=2)
    replica, shard = divmod(comm.rank, 2)
    got = group_comm.allgather(device(np.array([comm.rank])))
    t.equal(got.get(), np.array([2 * replica, 2 * replica + 1]), "group_comm members")
    got = data_comm.allreduce(device(np.array([comm.rank], np.float32)))
    t.equal(got.get(), np.array([shard + shard + 2], np.float32), "data_comm sum")
    t.true(
        (group_comm.gpu_transport, data_comm.gpu_transport) == ("nccl", "nccl"),
        f"grid transports {group_comm.gpu_transport}, {data_comm.gpu_transport}",
    )


def has_kernels() -> bool:
    """Real CuPy, or the fake with the host build of the kernels behind RawModule."""
    return not is_fake() or cupy().lib is not None


@gpu_check()
def parallel_layers_on_device(comm, t):
    """Group-, column- and row-parallel layers on device arrays (mconv's CuPy backend, the
    chosen transport) against the serial layers on the host: forward, dx, dW, db, SGD."""
    if not t.true(has_kernels(), "the GPU job has no kernels"):
        return
    rng = np.random.default_rng(5)
    cases = [(case, flags) for case in GROUP_CASES for flags in (FLAG_COMBOS[0], FLAG_COMBOS[3])]
    for case, flags in cases:
        serial_cls, parallel_cls, args, kwargs, shape, output_size = case
        serial, layer = build(comm, serial_cls, parallel_cls, args, kwargs, flags)
        what = f"on device: {parallel_cls.__name__} {flags}"
        x = rng.standard_normal(shape)
        compare_layer(comm, t, serial, layer, x, what, 2, output_size, device="cuda")
    for serial_cls, parallel_cls, args, kwargs, shape in DENSE_CASES:
        flag = "gather_output" if "Column" in parallel_cls.__name__ else "input_is_sharded"
        for value in (False, True):
            serial, layer = build(comm, serial_cls, parallel_cls, args, kwargs, {flag: value})
            what = f"on device: {parallel_cls.__name__} {flag}={value}"
            compare_layer(
                comm, t, serial, layer, rng.standard_normal(shape), what, 2, device="cuda"
            )
    for dtype in (np.float32, np.float16):
        for cls, channels, groups in [
            (parallel.GroupParallelConv2d, 24, 12),  # 2 channels a group: the GEMM path
            (parallel.RowParallelConv2d, 12, 1),
        ]:
            kwargs = dict(padding=1, groups=groups, dtype=dtype)
            serial, layer = build(comm, nn.Conv2d, cls, (channels, 12, 3), kwargs, {})
            x = rng.standard_normal((2, channels, 5, 5)).astype(dtype)
            what = f"on device: {cls.__name__} {np.dtype(dtype)}"
            compare_layer(comm, t, serial, layer, x, what, 2, device="cuda")


@gpu_check()
def each_rank_builds_on_its_own_gpu(comm, t):
    """device='cuda:<this rank's GPU>' differs between ranks and is still one configuration."""
    if not t.true(has_kernels(), "the GPU job has no kernels"):
        return
    mine = f"cuda:{comm.device}"
    layer = parallel.GroupParallelConv2d(12, 12, 1, groups=12, comm=comm, device=mine)
    t.true(layer.weight.data.device.id == comm.device, f"weight on GPU {layer.weight.data.device}")
    y = layer(device(np.ones((2, 12, 3, 3), np.float32)))  # on the current GPU: this rank's
    t.true(gpu.is_cupy(y) and y.shape == (2, 12, 3, 3), f"output {type(y).__name__}{y.shape}")


@gpu_check()
def nccl_refuses_buffers_of_another_gpu(comm, t):
    """NCCL would read and write another GPU's memory as its own: refused on every rank."""
    cuda = cupy().cuda
    if not one_gpu_per_rank(comm) or cuda.runtime.getDeviceCount() < 2:
        return
    sub = with_transport(comm, "nccl")
    other = (comm.device + 1) % cuda.runtime.getDeviceCount()
    with cuda.Device(other):
        x = cupy().ones(4)
        t.raises(ValueError, lambda: sub.allreduce(x), "allreduce of another GPU's array",
                 match=rf"communicator is on cuda:{comm.device}, but got an array on "
                       rf"cuda:{other}")  # fmt: skip
    got = sub.allreduce(device(np.ones(4)))  # and the communicator still works
    t.equal(got.get(), np.full(4, float(comm.size)), "allreduce after the refusal")


@gpu_check()
def cuda_aware_mpi_waits_for_the_buffers_gpu(comm, t):
    """MPI reads device memory outside CUDA's stream order: before each call the transport
    waits for the current stream of the buffers' GPU, which need not be the current GPU."""
    from parallel.transport import MpiTransport

    cuda = cupy().cuda
    if not (is_fake() or gpu.cuda_aware_mpi()) or cuda.runtime.getDeviceCount() < 2:
        return
    transport = MpiTransport(comm.mpi, synchronize=True)
    other = (comm.device + 1) % cuda.runtime.getDeviceCount()
    with cuda.Device(other):
        send = cupy().arange(5, dtype=np.float64) * (comm.rank + 1)  # queued on its stream
        recv = cupy().zeros(5)
        cuda.get_current_stream().synchronize()  # recv's zeros are written
        send = send + 0  # and send is written again, not waited for
    transport.allreduce(send, recv, "sum")  # the current GPU is comm.device
    with cuda.Device(other):
        expected = np.arange(5.0) * sum(range(1, comm.size + 1))
        t.equal(recv.get(), expected, "CUDA-aware MPI on another GPU's arrays")
