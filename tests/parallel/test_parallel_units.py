"""What can be tested without MPI: the GPU transport choice (with fakes), device
binding without CuPy, the sharding arithmetic, and the launcher's failure message.

The GPU transports themselves run in MPI jobs on a CPU stand-in for CuPy and
NCCL (test_parallel_gpu_fake.py), and on real GPUs in tests/gpu.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types

import mpi_launch
import pytest

from parallel import gpu, sharding

BOTH = {"nccl": True, "cuda-aware-mpi": True}
NCCL_ONLY = {"nccl": True, "cuda-aware-mpi": False}
MPI_ONLY = {"nccl": False, "cuda-aware-mpi": True}
NONE = {"nccl": False, "cuda-aware-mpi": False}


def one_gpu_each(*flags):
    """The flags of each rank, every rank on its own GPU of one host."""
    return [dict(f, gpu=("host-a", i)) for i, f in enumerate(flags)]


@pytest.mark.parametrize(
    "flags,expected",
    [
        (one_gpu_each(BOTH, BOTH), "nccl"),
        (one_gpu_each(NCCL_ONLY, NCCL_ONLY, NCCL_ONLY), "nccl"),
        (one_gpu_each(BOTH, MPI_ONLY), "cuda-aware-mpi"),  # every rank must be able to use it
        (one_gpu_each(BOTH, NCCL_ONLY, MPI_ONLY), "host"),
        ([dict(BOTH, gpu=("host-a", 0)), dict(BOTH, gpu=("host-a", 0))], "cuda-aware-mpi"),
        ([dict(NCCL_ONLY, gpu=("host-a", 0)), dict(NCCL_ONLY, gpu=("host-a", 0))], "host"),
        ([dict(NCCL_ONLY, gpu=("host-a", 0)), dict(NCCL_ONLY, gpu=("host-b", 0))], "nccl"),
        ([dict(NCCL_ONLY, gpu=None)] * 2, "host"),  # GPU unknown: NCCL is not risked
        (one_gpu_each(NONE), "host"),
        ([{}], "host"),
    ],
)
def test_choose_transport_takes_the_first_every_rank_can_use(flags, expected):
    assert gpu.choose_transport(flags) == expected


def test_choose_transport_forced_and_bad_force():
    assert gpu.choose_transport([NONE], forced="nccl") == "nccl"
    with pytest.raises(ValueError, match="MCONV_PARALLEL_GPU_TRANSPORT.*got 'gloo'"):
        gpu.choose_transport([BOTH], forced="gloo")


class FakeMpiComm:
    """allgather answers with the flags the ranks would report."""

    def __init__(self, flags_per_rank):
        self.flags_per_rank = flags_per_rank

    def allgather(self, mine):
        return self.flags_per_rank


@pytest.mark.parametrize(
    "flags,env,expected",
    [
        (one_gpu_each(BOTH, BOTH), None, "NcclTransport"),
        (one_gpu_each(BOTH, MPI_ONLY), None, "MpiTransport"),
        (one_gpu_each(NONE, BOTH), None, "HostStagingTransport"),
        (one_gpu_each(BOTH, BOTH), "host", "HostStagingTransport"),
    ],
)
def test_make_transport_builds_the_chosen_one(monkeypatch, flags, env, expected):
    built = []
    for name in ("NcclTransport", "MpiTransport", "HostStagingTransport"):
        monkeypatch.setattr(gpu, name, lambda *a, _n=name, **k: built.append((_n, k)) or _n)
    monkeypatch.setattr(gpu, "local_flags", lambda: flags[0])
    monkeypatch.setattr(gpu.timeout, "allgather_object", lambda comm, obj, what: comm.allgather(obj))
    if env is None:
        monkeypatch.delenv("MCONV_PARALLEL_GPU_TRANSPORT", raising=False)
    else:
        monkeypatch.setenv("MCONV_PARALLEL_GPU_TRANSPORT", env)
    assert gpu.make_transport(FakeMpiComm(flags)) == expected
    if expected == "MpiTransport":
        assert built == [("MpiTransport", {"synchronize": True})]


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"MCONV_CUDA_AWARE_MPI": "1"}, True),
        ({"MCONV_CUDA_AWARE_MPI": "0", "MV2_USE_CUDA": "1"}, False),
        ({"MV2_USE_CUDA": "1"}, True),
        ({"MPICH_GPU_SUPPORT_ENABLED": "1"}, True),
    ],
)
def test_cuda_aware_mpi_detection_from_the_environment(monkeypatch, env, expected):
    for name in ("MCONV_CUDA_AWARE_MPI", "MV2_USE_CUDA", "MPICH_GPU_SUPPORT_ENABLED"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert gpu.cuda_aware_mpi() is expected


def test_without_cupy_nothing_binds_and_there_is_no_nccl(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.setenv("MCONV_CUDA_AWARE_MPI", "0")
    assert gpu.bind_device(0) is None
    assert gpu.local_flags() == dict(NONE, gpu=None)


def fake_cupy(count):
    used = []

    def get_count():
        if isinstance(count, Exception):
            raise count
        return count

    runtime = types.SimpleNamespace(getDeviceCount=get_count)
    device = lambda i: types.SimpleNamespace(use=lambda: used.append(i))  # noqa: E731
    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(runtime=runtime, Device=device)
    return module, used


@pytest.mark.parametrize(
    "count,local_rank,expected",
    [(2, 3, 1), (4, 2, 2), (0, 0, None), (RuntimeError("no driver"), 0, None)],
)
def test_bind_device_uses_gpu_local_rank_modulo_count(monkeypatch, count, local_rank, expected):
    module, used = fake_cupy(count)
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert gpu.bind_device(local_rank) == expected
    assert used == ([] if expected is None else [expected])


def test_is_cupy_by_module_name():
    fake = type("ndarray", (), {"__module__": "cupy._core.core"})
    assert gpu.is_cupy(fake()) and not gpu.is_cupy(sharding)


def test_shard_arithmetic():
    assert sharding.shard_sizes(7, 3) == [3, 2, 2]
    assert sharding.shard_sizes(2, 4) == [1, 1, 0, 0]
    assert [sharding.shard_range(10, rank=r, size=4) for r in range(4)] == [
        range(0, 3),
        range(3, 6),
        range(6, 8),
        range(8, 10),
    ]
    with pytest.raises(ValueError, match="parts must be >= 1, but got parts=0"):
        sharding.shard_sizes(3, 0)
    with pytest.raises(TypeError, match="n must be an int"):
        sharding.shard_sizes(3.0, 2)


def test_importing_parallel_starts_no_mpi():
    code = (
        "import parallel, sys; assert 'mpi4py.MPI' not in sys.modules and 'cupy' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_missing_mpiexec_is_a_failure_not_a_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="mpiexec not found .* pip install"):
        mpi_launch.mpiexec.__wrapped__()


@pytest.mark.parametrize(
    "kwargs,kind,match",
    [
        (dict(rank=-1, size=4), ValueError, "rank"),
        (dict(rank=4, size=4), ValueError, r"rank must lie in \[0, 4\), but got rank=4"),
        (dict(rank=True, size=4), TypeError, "rank"),
        (dict(rank=0, size=0), ValueError, "size"),
    ],
)
def test_shard_range_refuses_bad_ranks(kwargs, kind, match):
    with pytest.raises(kind, match=match):
        sharding.shard_range(8, **kwargs)
