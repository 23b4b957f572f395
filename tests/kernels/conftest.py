"""Fixtures for the kernel tests: the host build (compiled once per session and
cached by source hash) and executors that run the kernels through it."""

import os
import shutil

import pytest

from mconv.kernels import host
from mconv.kernels.ops import KernelBackend


@pytest.fixture(scope="session")
def host_lib():
    """The g++ build of mconv/kernels/*.cu; CI must have g++, elsewhere its absence skips."""
    if not (os.environ.get("CXX") or shutil.which("g++")) and not os.environ.get("CI"):
        pytest.skip("the host build of the CUDA kernels needs g++ (or $CXX)")
    return host.load()


@pytest.fixture
def executor(host_lib):
    """Small grids (5 blocks of 32 threads) so that every grid-stride loop wraps."""
    return host.HostExecutor(host_lib)


@pytest.fixture
def kernel_backend(executor):
    return KernelBackend(executor)
