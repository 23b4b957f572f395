"""mconv.backends.cupy_backend itself, unchanged, on the strict CPU stand-in for CuPy
(tests/cupy_stand_in: host-built kernels behind RawModule, NumPy behind cuBLAS, writes
queued on streams), against the NumPy backend; plus device placement and the errors
without CuPy or a GPU.
"""

import subprocess
import sys

import numpy as np
import pytest

import cupy_stand_in
from mconv import functional as F
from mconv import nn
from mconv.backends import cupy_backend, get_backend
from mconv.geometry import conv_geometry


@pytest.fixture
def fake(stand_in):
    return stand_in


def _close(got, want, tol):
    got = got.get() if isinstance(got, cupy_stand_in.ndarray) else np.asarray(got)
    scale = max(float(np.abs(want).max(initial=0)), 1e-300)
    assert got.shape == want.shape
    assert float(np.abs(got.astype(np.float64) - want).max(initial=0)) <= tol * scale


CASES = [
    dict(groups=2, stride=2, padding=1, dilation=2),
    dict(groups=4, padding="same", padding_mode="reflect"),  # depthwise, multiplier 2
    dict(groups=1, padding=((1, 0), (2, 1)), padding_mode="circular", conv_mode="convolution"),
]


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("dtype,mode", [(np.float64, "default"), (np.float32, "default"),
                                        (np.float16, "default"), (np.float16, "float32")])  # fmt: skip
def test_conv_on_the_cupy_backend_matches_numpy(fake, monkeypatch, kw, dtype, mode):
    monkeypatch.setenv("MCONV_WORKSPACE_MB", "0")  # one image per chunk
    rng = np.random.default_rng(0)
    groups = kw["groups"]
    x = rng.standard_normal((3, 4, 7, 6))
    w = rng.standard_normal((8, 4 // groups, 3, 2))
    b = rng.standard_normal(8)
    y64 = F.conv(x, w, b, **kw)
    dy = rng.standard_normal(y64.shape)
    xd, wd, bd, dyd = (fake.asarray(a.astype(dtype)) for a in (x, w, b, dy))
    assert get_backend(xd) is cupy_backend
    got = (F.conv(xd, wd, bd, compute_mode=mode, **kw),
           *F.conv_backward(dyd, xd, wd, has_bias=True, compute_mode=mode, **kw))  # fmt: skip
    # the reference on the same rounded inputs
    ref = (F.conv(*(a.astype(dtype).astype(np.float64) for a in (x, w, b)), **kw),
           *F.conv_backward(*(a.astype(dtype).astype(np.float64) for a in (dy, x, w)),
                            has_bias=True, **kw))  # fmt: skip
    for mine, theirs in zip(got, ref):
        assert isinstance(mine, cupy_stand_in.ndarray) and mine.dtype == dtype  # stays on the GPU
        _close(mine, theirs, {np.float64: 1e-12, np.float32: 1e-5, np.float16: 2e-3}[dtype])
    assert len(fake.compiled) == 1  # one RawModule per device, compiled once
    options = fake.compiled[0]["options"]
    assert "--std=c++17" in options and any(o.startswith("-I") for o in options)
    gemms = [c for c in fake.cublas.calls if c[0] == "gemm"]
    if groups != 4:
        assert gemms, "the GEMM path goes through cublasGemmStridedBatchedEx"
        if dtype == np.float16:  # fp16 operands; fp32 results under compute_mode='float32'
            assert {(a, b_) for _, _, a, b_, _, _ in gemms} == {(2, 2)}
            results = {c for *_, c, _ in gemms}  # default: fp16, but dW sums its chunks in fp32
            assert results == ({0} if mode == "float32" else {0, 2})
    else:
        assert not gemms and {n for n, *_ in fake.launched} >= {"depthwise_forward"}


def test_launch_geometry(fake):
    x = fake.asarray(np.ones((2, 3, 5, 5)))
    F.conv(x, fake.asarray(np.ones((4, 3, 3, 3))))
    name, types, grid, block = fake.launched[0]
    assert (name, types, block) == ("im2col", ("double",), 256)
    assert grid == -(-2 * 27 * 9 // 256)


def test_arrays_on_two_devices_are_refused(fake):
    geom, _ = conv_geometry((1, 1, 4), (1, 1, 2))
    with pytest.raises(ValueError, match="must be on one device, but got arrays on cuda:0 and cpu"):
        cupy_backend.forward(fake.asarray(np.ones((1, 1, 4))), np.ones((1, 1, 2)), geom)


def test_module_to_cuda_and_back(fake):
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, groups=2))
    cpu = {k: v.copy() for k, v in net.state_dict().items()}
    x = np.random.default_rng(1).standard_normal((2, 2, 6, 6)).astype(np.float32)
    want = net(x)
    want_dx = net.backward(np.ones_like(want))
    assert net.to("cuda") is net
    assert all(isinstance(p.data, cupy_stand_in.ndarray) for p in net.parameters())
    assert all(isinstance(p.grad, cupy_stand_in.ndarray) for p in net.parameters())
    assert net[0].device == "cuda:0"
    net.zero_grad()
    y = net(fake.asarray(x))
    dx = net.backward(fake.asarray(np.ones_like(want)))
    _close(y, want, 1e-5)
    _close(dx, want_dx, 1e-5)
    net.load_state_dict(cpu)  # NumPy values copied onto the device
    assert isinstance(net[0].weight.data, cupy_stand_in.ndarray)
    net.to("cpu")
    assert all(type(p.data) is np.ndarray for p in net.parameters())
    np.testing.assert_array_equal(net[0].weight.data, cpu["0.weight"])


def test_layers_created_on_a_device(fake):
    conv = nn.ConvTranspose2d(2, 4, 3, stride=2, device="cuda:0")
    linear = nn.Linear(3, 2, device="cuda")
    for p in (*conv.parameters(), *linear.parameters()):
        assert isinstance(p.data, cupy_stand_in.ndarray)
    conv.reset_parameters()
    assert isinstance(conv.weight.data, cupy_stand_in.ndarray)
    with pytest.raises(ValueError, match=r"device 'cuda:2' does not exist: CuPy sees 2 CUDA"):
        nn.Conv2d(1, 1, 3, device="cuda:2")
    with pytest.raises(ValueError, match=r"'cpu', 'cuda' or 'cuda:<index>', but got device='gpu'"):
        nn.Conv2d(1, 1, 3, device="gpu")


def test_without_cupy_cuda_devices_are_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    with pytest.raises(ValueError, match=r"device must be 'cpu' on this machine: .*mconv\[cuda12\]"
                       r".* but got device='cuda'"):  # fmt: skip
        nn.Conv2d(1, 1, 3, device="cuda")
    with pytest.raises(ValueError, match="device must be 'cpu'"):
        nn.Linear(1, 1).to("cuda:0")


def test_cupy_without_a_gpu(stand_in):
    fake = stand_in

    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    fake.cuda.runtime.getDeviceCount = no_device
    with pytest.raises(ValueError, match=r"on this machine: cudaErrorNoDevice.* got device='cuda'"):
        nn.Conv1d(1, 1, 3).to("cuda")


def test_mconv_works_without_cupy():
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import numpy as np, mconv\n"
        "from mconv import functional as F, nn\n"
        "y = F.conv(np.ones((1, 1, 4)), np.ones((1, 1, 2)))\n"
        "nn.Conv2d(1, 2, 3).to('cpu')\n"
        "assert 'mconv.backends.cupy_backend' not in sys.modules, 'imported eagerly'\n"
        "print(y.tolist())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[[[2.0, 2.0, 2.0]]]"


@pytest.mark.parametrize("mode", ["default", "float32"])
def test_gemms_disallow_reduced_precision_reductions_and_restore_the_mode(fake, mode):
    """cuBLAS may reduce split-K partial sums in an fp16 output type unless told not to; the
    handle is CuPy's (shared), so its math mode is put back after each GEMM."""
    cublas = fake.cublas
    handle = fake.cuda.device.get_cublas_handle()
    cublas.setMathMode(handle, cublas.CUBLAS_TENSOR_OP_MATH)  # another library's choice
    x = fake.asarray(np.ones((2, 3, 6, 6), dtype=np.float16))
    w = fake.asarray(np.ones((4, 3, 3, 3), dtype=np.float16))
    F.conv_backward(F.conv(x, w, compute_mode=mode), x, w, has_bias=True, compute_mode=mode)
    gemms = [c for c in cublas.calls if c[0] == "gemm"]
    assert gemms and all(math == 1 | 16 for *_, math in gemms)
    assert cublas.getMathMode(handle) == cublas.CUBLAS_TENSOR_OP_MATH


def test_cached_parameters_are_ready_for_any_stream(fake):
    """Kernel parameters are copied to the device once and cached: a kernel on another
    stream must not read them before that copy is done."""
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((1, 2, 5, 5)), rng.standard_normal((3, 2, 3, 3))
    xd, wd = fake.asarray(x), fake.asarray(w)
    fake.cuda.Device().synchronize()
    first, second = fake.cuda.Stream(), fake.cuda.Stream()
    with first:  # first use: the parameters are copied on this stream
        F.conv(xd, wd, padding=1)
    with second:
        y = F.conv(xd, wd, padding=1)
    second.synchronize()
    _close(y.get(), F.conv(x, w, padding=1), 1e-12)


def test_kernels_compile_without_headers_of_our_own(fake, monkeypatch):
    """Where mconv finds no cuda_fp16.h, CuPy may (its RawModule adds the toolkit's include
    path): the options go without -I; NVRTC alone needs them."""
    from mconv import kernels

    monkeypatch.setattr(kernels, "cuda_include_dirs", lambda: [])
    assert kernels.nvrtc_options() == ["--std=c++17"]
    with pytest.raises(RuntimeError, match="need cuda_fp16.h"):
        kernels.nvrtc_options("sm_90", require_headers=True)
    y = F.conv(fake.asarray(np.ones((1, 1, 4))), fake.asarray(np.ones((1, 1, 2))))
    assert y.get().tolist() == [[[2.0, 2.0, 2.0]]]
    assert not any(o.startswith("-I") for o in fake.compiled[-1]["options"])


def test_a_compile_failure_for_want_of_headers_says_how_to_install_them(fake, monkeypatch):
    from mconv import kernels

    monkeypatch.setattr(kernels, "cuda_include_dirs", lambda: [])

    def fail(self, expression):
        raise RuntimeError('catastrophic error: cannot open source file "cuda_fp16.h"')

    monkeypatch.setattr(fake.RawModule, "get_function", fail)
    with pytest.raises(RuntimeError, match=r"pip install nvidia-cuda-runtime-cu12.*cuda_fp16"):
        F.conv(fake.asarray(np.ones((1, 1, 4))), fake.asarray(np.ones((1, 1, 2))))
