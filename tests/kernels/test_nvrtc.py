"""Every kernel instantiation compiled for the real GPU targets by NVRTC.

NVRTC (the nvidia-cuda-nvrtc-cu12 wheel) needs no GPU or driver. -arch=sm_XX
makes it emit SASS, so ptxas runs too. cuda_fp16.h comes from the CUDA
runtime headers (nvidia-cuda-runtime-cu12, or a CUDA toolkit). In CI both
must be installed (the test extra): there a missing NVRTC fails instead of
skipping.
"""

import os

import pytest

from mconv import kernels
from mconv.kernels import nvrtc


@pytest.fixture(scope="module")
def library():
    path = nvrtc.find_library()
    missing = []
    if path is None:
        missing.append("libnvrtc (pip install nvidia-cuda-nvrtc-cu12)")
    if not kernels.cuda_include_dirs():
        missing.append("cuda_fp16.h (pip install nvidia-cuda-runtime-cu12)")
    if missing:
        if os.environ.get("CI"):
            pytest.fail("CI must compile the kernels with NVRTC; missing " + ", ".join(missing))
        pytest.skip("NVRTC build not checked: missing " + ", ".join(missing))
    return path


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_every_instantiation_compiles_without_warnings(library, arch):
    compiled = nvrtc.compile_kernels(arch, library=library)
    assert compiled.log == "", compiled.log  # NVRTC's log holds its warnings
    assert set(compiled.lowered) == set(kernels.name_expressions())
    for expression, lowered in compiled.lowered.items():
        name = expression.split("<")[0].split("::")[1]
        assert lowered.startswith("_ZN5mconv") and name in lowered, (expression, lowered)
    assert compiled.cubin_bytes > 0


def test_cuda_only_errors_are_reported(library):
    """What g++ accepts but the CUDA compiler refuses: a __device__ function calling
    a host function. The harness must surface NVRTC's log."""
    code = kernels.source() + (
        "\nint host_only(int v) { return v + 1; }\n"
        "namespace mconv { template <typename T> __global__ void broken(T* y) "
        "{ y[0] = static_cast<T>(host_only(1)); } }\n"
    )
    with pytest.raises(nvrtc.NvrtcError, match="host_only"):
        nvrtc.compile_kernels("sm_90", code=code, names=["mconv::broken<float>"], library=library)


def test_nvrtc_version(library):
    assert nvrtc.version(library) >= (12, 0)


def test_the_command_line_tool(library, capsys):
    assert nvrtc.main(["sm_80"]) == 0
    assert f"sm_80: {len(kernels.name_expressions())} kernels compiled" in capsys.readouterr().out
    assert nvrtc.main(["sm_1"]) == 1  # an architecture NVRTC does not know
    assert "sm_1" in capsys.readouterr().err
