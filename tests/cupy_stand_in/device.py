"""Devices, streams and allocations of the stand-in: what is current, what is queued."""

from __future__ import annotations

import ctypes
import itertools
import sys
import types
import weakref

import numpy as np

NCCL_VERSION = 21805  # 2.18.5, as ncclGetVersion encodes it
CUDA_DTYPES = {2: np.float16, 0: np.float32, 1: np.float64}  # cudaDataType_t
DISALLOW_REDUCED_PRECISION_REDUCTION = 16  # cublasMath_t flag


class RaceError(AssertionError):
    """An array used on one stream while another stream still has a write to it queued, or
    memory that no live device array holds: undefined behaviour on a real GPU."""


def version_code(major: int, minor: int, patch: int) -> int:
    """NCCL_VERSION_CODE: X*1000+Y*100+Z before 2.9, X*10000+Y*100+Z from 2.9 on."""
    return major * (10000 if (major, minor) >= (2, 9) else 1000) + minor * 100 + patch


# -- state: devices, streams, allocations ------------------------------------------------------
class State:
    def __init__(self, device_count: int):
        self.device_count = device_count
        self.device = 0  # the current device
        self.null = [Stream(null=True, device=d) for d in range(device_count)]
        self.current = list(self.null)  # each device's current stream
        self.buffers: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.host_copies = 0  # ndarray.set() calls


_STATE: State | None = None
_pointers = itertools.count(0x5EED0)


def state() -> State:
    if _STATE is None:
        raise RuntimeError("the CuPy stand-in is not installed")
    return _STATE


class Stream:
    """A CUDA stream: a queue of device writes, run in order when the stream catches up.

    Its writes are *unsynchronised* until the host waits for the stream
    (``synchronize()``, ``Device.synchronize()``, ``ndarray.get()``): until then another
    stream may not use the memory, but for CUDA's one implicit order between the legacy
    null stream and blocking (not ``non_blocking``) streams of a device."""

    def __init__(self, null: bool = False, non_blocking: bool = False, device: int | None = None):
        self.device_id = state().device if device is None else device
        self.ptr = 0 if null else next(_pointers)
        self.null, self.non_blocking = null, non_blocking
        self.pending: list = []  # writes, in stream order
        self.dirty: weakref.WeakSet = weakref.WeakSet()  # written since the host last waited
        self.synchronized = 0  # synchronize() calls, for tests
        self._previous: list = []

    def enqueue(self, buffer: Buffer, write) -> None:
        buffer.writers.add(self)
        self.dirty.add(buffer)
        self.pending.append(write)

    def run(self) -> None:
        """Everything queued so far reaches memory (the stream has caught up)."""
        while self.pending:
            self.pending.pop(0)()

    def catch_up(self) -> None:
        """Before work on this stream: its queue runs, and so does the queue CUDA orders
        before it (the null stream's for a blocking stream, every blocking stream's for the
        null stream)."""
        for other in streams_of(self.device_id):
            if other is not self and self.ordered_after(other):
                other.run()
        self.run()

    def ordered_after(self, other: Stream) -> bool:
        """Whether work issued now on this stream waits for ``other``'s earlier work."""
        return (
            other is self
            or (self.null and not other.non_blocking)
            or (other.null and not self.non_blocking)
        )

    def synchronize(self) -> None:
        self.run()
        for buffer in self.dirty:
            buffer.writers.discard(self)
        self.dirty.clear()
        self.synchronized += 1

    def use(self) -> Stream:
        state().current[self.device_id] = self
        return self

    def __enter__(self):
        self._previous.append(state().current[self.device_id])
        return self.use()

    def __exit__(self, *exc):
        state().current[self.device_id] = self._previous.pop()
        return False

    def __repr__(self):
        return f"<Stream {self.ptr:#x} (device {self.device_id})>"


class Event:
    """``cupy.cuda.Event``: ``record(stream)`` marks the stream's work so far; ``done`` is
    True once that work has run (here, at once: the stream catches up when asked)."""

    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess=False):
        self.stream: Stream | None = None

    def record(self, stream: Stream | None = None) -> None:
        self.stream = current_stream() if stream is None else stream

    @property
    def done(self) -> bool:
        if self.stream is not None:
            self.stream.catch_up()
        return True


def current_stream(device: int | None = None) -> Stream:
    """The current stream of ``device`` (default, or < 0: the current device)."""
    st = state()
    return st.current[st.device if device is None or device < 0 else device]


def reset(device_count: int) -> State:
    """A fresh state: ``device_count`` devices, device 0 current, no allocations."""
    global _STATE
    _STATE = State(device_count)
    return _STATE


def module():
    """The installed ``cupy`` module."""
    return sys.modules["cupy"]


class Buffer:
    """One device allocation: its memory (a NumPy array) and the streams whose writes to it
    the host has not waited for."""

    __slots__ = ("mem", "device", "writers", "__weakref__")

    def __init__(self, mem: np.ndarray, device: int):
        self.mem, self.device, self.writers = mem, device, set()
        state().buffers[id(self)] = self

    @property
    def start(self) -> int:
        return self.mem.ctypes.data

    def check_no_race(self, stream: Stream, what: str) -> None:
        for other in self.writers:
            if not stream.ordered_after(other):
                raise RaceError(
                    f"{what} on {stream} uses device memory written on {other}, which nothing "
                    "orders before it: synchronize that stream first"
                )


def poisoned(shape, dtype, like: np.ndarray | None = None) -> np.ndarray:
    """New host memory with every bit set (NaN, -1): what a device write has not reached."""
    mem = np.empty_like(like) if like is not None else np.empty(shape, dtype=dtype)
    if mem.nbytes:
        ctypes.memset(mem.ctypes.data, 0xFF, mem.nbytes)
    return mem


# -- cupy.cuda ---------------------------------------------------------------------------------
class Device:
    """cupy.cuda.Device: ``use()``, a context manager, ``synchronize()``, PCI bus id."""

    mem_info = (2**30, 2**31)  # (free, total) bytes

    def __init__(self, device=None):
        self.id = state().device if device is None else int(device)

    @property
    def pci_bus_id(self) -> str:
        return f"0000:{self.id + 0x17:02x}:00.0"

    compute_capability = property(lambda self: "90")

    def use(self):
        st = state()
        if not 0 <= self.id < st.device_count:
            raise RuntimeError(f"cudaErrorInvalidDevice: invalid device ordinal {self.id}")
        st.device = self.id

    def synchronize(self):
        for stream in streams_of(self.id):
            stream.synchronize()

    def __enter__(self):
        self._previous = state().device
        self.use()
        return self

    def __exit__(self, *exc):
        state().device = self._previous
        return False

    def __eq__(self, other):
        return isinstance(other, Device) and other.id == self.id

    __hash__ = object.__hash__

    def __repr__(self):
        return f"<CUDA Device {self.id}>"


ALL_STREAMS: weakref.WeakSet = weakref.WeakSet()


def streams_of(device: int):
    st = state()
    return {s for s in (*st.null, *st.current, *ALL_STREAMS) if s.device_id == device}


def stream_by_ptr(device: int, ptr: int) -> Stream | None:
    return next((s for s in streams_of(device) if s.ptr == ptr), None)


class TrackedStream(Stream):
    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False):
        super().__init__(null=null, non_blocking=non_blocking)
        ALL_STREAMS.add(self)


def make_runtime(state: State) -> types.ModuleType:
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.getDeviceCount = lambda: state.device_count
    runtime.getDevice = lambda: state.device
    runtime.setDevice = lambda i: Device(i).use()
    runtime.deviceSynchronize = lambda: Device().synchronize()
    runtime.runtimeGetVersion = lambda: 12080
    runtime.driverGetVersion = lambda: 12080
    runtime.getDeviceProperties = lambda i: {"name": b"CuPy stand-in (CPU)", "major": 9,
                                             "minor": 0, "totalGlobalMem": 2**31}  # fmt: skip
    return runtime


def resolve(ptr: int, nbytes: int, device: int | None, what: str) -> tuple[Buffer, int]:
    """The live allocation holding ``nbytes`` at device pointer ``ptr``, and the byte offset."""
    for buffer in list(state().buffers.values()):
        start = buffer.start
        if start <= ptr and ptr + nbytes <= start + buffer.mem.nbytes:
            if device is not None and buffer.device != device:
                raise RaceError(f"{what}: pointer {ptr:#x} is memory of device {buffer.device}, "
                                f"not of device {device}")  # fmt: skip
            return buffer, ptr - start
    raise RaceError(f"{what}: {nbytes} bytes at {ptr:#x} lie in no live device array")


def flat(buffer: Buffer, dtype) -> np.ndarray:
    raw = np.frombuffer(raw_bytes(buffer), dtype=np.uint8)
    return raw[: raw.size - raw.size % np.dtype(dtype).itemsize].view(dtype)


def raw_bytes(buffer: Buffer):
    return (ctypes.c_char * buffer.mem.nbytes).from_address(buffer.start)
