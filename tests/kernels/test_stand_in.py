"""The CuPy stand-in is as strict as CuPy where mconv could go wrong: NumPy operands,
implicit conversion, devices, streams. Each test is a bug of the kind it must catch."""

import numpy as np
import pytest

import cupy_stand_in
from mconv import nn


def test_device_arrays_are_not_numpy_arrays(stand_in):
    x = stand_in.asarray(np.arange(3.0))
    assert not isinstance(x, np.ndarray) and type(x).__module__ == "cupy._core.core"
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(x)
    np.testing.assert_array_equal(x.get(), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(stand_in.asnumpy(x * 2 + np.float32(1)), [1.0, 3.0, 5.0])


@pytest.mark.parametrize(
    "mix",
    [
        lambda x: np.where(x > 0, x, np.zeros((), dtype=x.dtype)),  # the nn.ReLU bug
        lambda x: x + np.ones(3),
        lambda x: np.ones(3) * x,
        lambda x: np.maximum(x, np.zeros(3)),
        lambda x: np.concatenate([x, np.ones(3)]),
        lambda x: x.__setitem__(slice(None), np.ones(3)),
        lambda x: np.add(x, 1.0, out=np.empty(3)),
        lambda x: x + [1.0, 2.0, 3.0],
    ],
)
def test_numpy_operands_are_refused_as_cupy_refuses_them(stand_in, mix):
    with pytest.raises(TypeError, match="Unsupported type <class '(numpy.ndarray|list)'>"):
        mix(stand_in.asarray(np.arange(3.0)))


def test_the_relu_of_before_fails_and_the_relu_of_now_runs(stand_in):
    x = stand_in.asarray(np.array([-1.0, 0.5]))
    with pytest.raises(TypeError, match="Unsupported type"):
        np.where(x > 0, x, np.zeros((), dtype=x.dtype))
    relu = nn.ReLU()
    np.testing.assert_array_equal(relu(x).get(), [0.0, 0.5])
    np.testing.assert_array_equal(relu.backward(stand_in.ones(2)).get(), [0.0, 1.0])


def test_work_on_another_device_is_refused_but_views_and_no_op_casts_are_not(stand_in):
    with stand_in.cuda.Device(1):
        x = stand_in.arange(4.0)
    assert x.device.id == 1
    view, same = x[1:], x.astype(x.dtype, copy=False)  # no kernel: allowed, as in CuPy
    assert same is x and view.shape == (3,)
    with pytest.raises(ValueError, match=r"resides \(1\) is different from the current device"):
        x + 1
    with stand_in.cuda.Device(1):
        np.testing.assert_array_equal((x + 1).get(), [1.0, 2.0, 3.0, 4.0])


def test_a_write_reaches_memory_when_its_stream_runs(stand_in):
    cuda = stand_in.cuda
    x = stand_in.asarray(np.arange(4.0))
    cuda.get_current_stream().synchronize()
    side = cuda.Stream(non_blocking=True)  # not ordered with the null stream
    with side:
        y = x * 10  # queued on `side`
    raw = np.frombuffer(
        (np.ctypeslib.ctypes.c_char * 32).from_address(y.__cuda_array_interface__["data"][0]),
        dtype=np.float64,
    )
    assert np.isnan(raw).all()  # a reader outside the stream order (MPI) sees poison
    with pytest.raises(cupy_stand_in.RaceError, match="which nothing orders before it"):
        y + 1  # the null stream uses what `side` wrote, unordered
    side.synchronize()
    np.testing.assert_array_equal(raw, [0.0, 10.0, 20.0, 30.0])
    np.testing.assert_array_equal((y + 1).get(), [1.0, 11.0, 21.0, 31.0])


def test_blocking_streams_are_ordered_with_the_null_stream_only(stand_in):
    cuda = stand_in.cuda
    x = stand_in.arange(3.0)  # on the null stream
    first, second = cuda.Stream(), cuda.Stream()
    with first:
        y = x + 1  # waits for the null stream's work: fine
    np.testing.assert_array_equal((y * 2).get(), [2.0, 4.0, 6.0])  # null waits for `first`
    with first:
        z = x + 2
    with second, pytest.raises(cupy_stand_in.RaceError, match="written on <Stream"):
        z + 1  # two blocking streams: nothing orders `first` before `second`
    first.synchronize()
    with second:
        np.testing.assert_array_equal((z + 1).get(), [3.0, 4.0, 5.0])


def test_new_memory_is_poison(stand_in):
    assert np.isnan(stand_in.empty(3).get()).all()
    assert (stand_in.empty(2, dtype=np.int32).get() == -1).all()


def test_kernels_and_gemms_refuse_what_a_gpu_would_not_run(stand_in):
    from mconv.backends.cupy_backend import CupyExecutor

    executor = CupyExecutor(0)
    launch = executor._function(*_im2col())  # the module is loaded on device 0
    args = (
        stand_in.zeros(3),
        stand_in.empty(3),
        executor.params([0] * 9),
        np.int64(0),
        np.int64(0),
    )
    with (
        stand_in.cuda.Device(1),
        pytest.raises(cupy_stand_in.RaceError, match="loaded on device 0"),
    ):
        launch((1,), (1,), args)
    cublas = stand_in.cublas
    handle = stand_in.cuda.device.get_cublas_handle()
    a = stand_in.ones(4, dtype=np.float16)
    one = np.ones((), np.float32)
    with pytest.raises(cupy_stand_in.RaceError, match="DISALLOW_REDUCED_PRECISION_REDUCTION"):
        cublas.gemmStridedBatchedEx(handle, 0, 0, 2, 2, 1, one.ctypes.data, a.data.ptr, 2, 2, 0,
                                    a.data.ptr, 2, 1, 0, one.ctypes.data, a.data.ptr, 2, 2, 0, 1,
                                    68, -1)  # fmt: skip


def _im2col():
    from mconv import kernels

    return kernels.KERNELS_BY_NAME["im2col"], ("double",)


def test_nccl_versions_are_encoded_as_nccl_does():
    assert cupy_stand_in.version_code(2, 7, 8) == 2708
    assert cupy_stand_in.version_code(2, 18, 5) == 21805
