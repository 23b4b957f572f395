"""Streaming tensors into an output file, fast and in bounded memory (the writers of
safetensors and ``.pkl`` files use it).

Every byte goes through a few reused, page-aligned staging buffers of :data:`CHUNK` bytes:

- bytes, and tensors in memory, are copied in;
- a tensor whose bytes lie, contiguous and already in the written dtype, in a memory-mapped
  checkpoint (:class:`layouts.files.MappedFile`) is read into the buffer from the file
  (``pread``) after the source path is reopened and checked to be the same file. Only the
  array's own bytes are read, and they lie inside the map, which covers the file as it
  was read; the map itself is not touched (no page faults, no RSS);
- other tensors (transposed, cast) are converted block by block into the buffer; the map's
  pages they read are then unmapped (``MADV_DONTNEED``: they stay in the page cache), so
  that RSS holds about one tensor of them, not the whole file.

One writer thread writes each full buffer while the caller fills the next. Once an output
outgrows one buffer it is written with **direct I/O** (``O_DIRECT``, where the system and
the file system take it; else buffered): a conversion writes each byte once and never
reads it back, and buffered writes of a large file first fill the page cache with dirty
pages (a page allocated and copied for each 4 KiB; on virtual machines that hand freed
pages back to their host, that alone varies 5x from run to run) which the final ``fsync``
of :func:`layouts.atomic.atomic_write` then has to write out. Direct writes go from the
buffer to the disk, need file offsets, lengths and addresses that are multiples of
:data:`ALIGN` (a buffer's unaligned end moves to the start of the next one; the file's
last few bytes are written buffered) and leave nothing for the ``fsync``. Buffered writes
start their writeback early (``sync_file_range``, where the C library has it).
"""

from __future__ import annotations

import errno
import functools
import mmap
import os
import queue
import threading
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from .errors import CheckpointError
from .files import MappedFile

if TYPE_CHECKING:
    from concurrent.futures import Executor, ThreadPoolExecutor

CHUNK = 8 << 20  # bytes per staging buffer (a converted tensor: pieces of about this size)
BLOCK = 64 << 10  # source bytes per transposed block: stays in the L2 cache
ALIGN = 4096  # direct I/O: file offsets, lengths and buffer addresses are multiples of this
DEPTH = 3  # staging buffers: being filled, queued or written
_CPUS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
HANDS = min(_CPUS, 4)  # threads converting a tensor (more only compete for memory bandwidth)
_FROM_FILE = True  # tests turn reading from the source file off to compare with the fallback
_DIRECT = True  # tests turn direct I/O off to compare with buffered writes


def mapped_origin(array: np.ndarray) -> MappedFile | None:
    """The :class:`MappedFile` whose memory ``array`` views, if any."""
    obj = array
    for _ in range(64):  # ndarray.base, stride_tricks' DummyArray.base, memoryview.obj
        if isinstance(obj, MappedFile):
            return obj
        obj = obj.obj if isinstance(obj, memoryview) else getattr(obj, "base", None)
        if obj is None:
            return None
    return None


def extent(array: np.ndarray) -> tuple[int, int]:
    """(lowest address, bytes spanned) of ``array``'s elements (not empty)."""
    low = high = array.__array_interface__["data"][0]
    for n, stride in zip(array.shape, array.strides):
        if stride < 0:
            low += stride * (n - 1)
        else:
            high += stride * (n - 1)
    return low, high - low + array.itemsize


def copy_blocked(out: np.ndarray, view: np.ndarray, pool: Executor | None = None) -> None:
    """``out[...] = view`` (any strides, cast unsafely), in blocks along ``view``'s
    slowest axis: far faster than one strided copy of a transposed array. With a
    ``pool`` of ``HANDS - 1`` threads, they and the caller each copy a run of the blocks
    (NumPy's copies release the GIL)."""
    axis = int(np.argmax([abs(s) if n > 1 else 0 for n, s in zip(view.shape, view.strides)]))
    count = view.shape[axis]
    step = max(1, BLOCK * count // max(view.nbytes, 1))
    starts = range(0, count, step)

    def copy(run: range) -> None:
        for start in run:
            index = (slice(None),) * axis + (slice(start, start + step),)
            np.copyto(out[index], view[index], casting="unsafe")

    hands = 1 if pool is None else min(len(starts), HANDS)
    runs = [starts[k * len(starts) // hands : (k + 1) * len(starts) // hands] for k in range(hands)]
    futures = [pool.submit(copy, run) for run in runs[1:]] if hands > 1 else []
    copy(runs[0])
    for future in futures:
        future.result()


def _release(array: np.ndarray) -> None:
    """Unmap the whole pages of a mapped array once it is converted: they stay in the page
    cache, but leave this process's RSS (a later read faults them back in)."""
    mapped = mapped_origin(array)
    if mapped is None or not hasattr(mapped, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    low, nbytes = extent(array)
    offset = low - mapped.address
    start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (offset + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if 0 <= start < end <= len(mapped):  # only ranges inside the map
        try:
            mapped.madvise(mmap.MADV_DONTNEED, start, end - start)
        except OSError:  # only an optimisation
            pass


class ArrayBytes:
    """``array``'s elements as C-ordered ``dtype`` bytes, not made yet: :meth:`Sink.write`
    streams them; :meth:`tobytes` makes them (for small tensors)."""

    def __init__(self, array: np.ndarray, dtype: np.dtype):
        self.array, self.dtype = array, np.dtype(dtype)
        self.nbytes = array.size * self.dtype.itemsize

    def tobytes(self) -> bytes:
        return np.ascontiguousarray(self.array.astype(self.dtype, copy=False)).tobytes()


class _Writeback:
    """``sync_file_range(fd, start, n, SYNC_FILE_RANGE_WRITE)``; a no-op without it."""

    call = None

    @classmethod
    def start(cls, fd: int, offset: int, nbytes: int) -> None:
        if cls.call is None:
            try:
                import ctypes  # noqa: PLC0415 - only when writing a file

                libc = ctypes.CDLL(None, use_errno=True)
                function = libc.sync_file_range
                function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                cls.call = function
            except (OSError, AttributeError):
                cls.call = False
        if cls.call:
            cls.call(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE; errors: fsync reports


def _pwrite(fd: int, data: np.ndarray, offset: int) -> int:
    """``os.pwrite``, or a seek and a write where there is none (Windows: only the writer
    thread writes)."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.write(fd, data)


def _buffer(nbytes: int) -> np.ndarray:
    """A page-aligned uint8 staging buffer of at least ``nbytes`` (a multiple of ALIGN)."""
    return np.frombuffer(mmap.mmap(-1, max(-(-nbytes // ALIGN) * ALIGN, ALIGN)), np.uint8)


class Sink:
    """The writable end of an output file: ``write(bytes)`` and ``write_array(array,
    dtype)``, in order. ``f`` is flushed first; afterwards every byte goes through the
    staging buffers and one writer thread writes them (``pwrite`` at their offsets) while
    the caller fills the next (NumPy and the system calls release the GIL). Memory stays
    bounded: :data:`DEPTH` buffers. Used as a context manager: leaving it writes what is
    left, waits for the writes, leaves the file position at the end and raises the first
    error they met."""

    def __init__(self, f: BinaryIO):
        f.flush()
        self.fd = f.fileno()
        self.pos = os.lseek(self.fd, 0, os.SEEK_CUR)  # file offset after the bytes given so far
        self._base, self._fill = self.pos, 0  # the current buffer: its file offset, bytes in it
        self._direct: bool | None = None  # decided when the first buffer is full
        self._flags = 0  # the descriptor's flags before O_DIRECT
        self._source: tuple[MappedFile, int] | None = None
        self._free: queue.Queue = queue.Queue()
        for _ in range(DEPTH - 1):
            self._free.put(_buffer(CHUNK))
        self._buf = _buffer(CHUNK)
        self._tasks: queue.Queue = queue.Queue(maxsize=DEPTH)
        self._pool: ThreadPoolExecutor | None = None  # converting helpers, made when needed
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="mconv-sink", daemon=True)
        self._thread.start()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(raise_error=kind is None)

    def close(self, raise_error: bool = True) -> None:
        """Write what is left, wait for the writes, close the sources; raise the writer's
        error (if asked)."""
        if self._thread.is_alive():
            if raise_error and self._error is None and self._fill:
                self._tasks.put((functools.partial(self._write_now, self._buf[: self._fill],
                                                   self._base), None))  # fmt: skip
            self._stop = not raise_error  # the caller failed: skip what is still queued
            self._tasks.put(None)
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown()
        if self._direct:
            self._end_direct()
        if self._source is not None:
            os.close(self._source[1])
            self._source = None
        os.lseek(self.fd, self.pos, os.SEEK_SET)
        if raise_error and self._error is not None:
            raise self._error

    # the writer thread

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            action, buffer = task
            try:
                if self._error is None and not self._stop:
                    action()
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                self._error = error
            finally:
                if buffer is not None:
                    self._free.put(buffer)

    def _write_now(self, data: np.ndarray, offset: int) -> None:
        """``pwrite`` all of ``data`` at ``offset``; a direct write the file or the system
        refuses (EINVAL) is done again buffered, and so is everything after it."""
        if self._direct and data.size % ALIGN:  # the file's end: its last bytes buffered
            head = data.size - data.size % ALIGN
            if head:
                self._write_now(data[:head], offset)
            self._end_direct()
            data, offset = data[head:], offset + head
        done = 0
        while done < data.size:
            try:
                done += _pwrite(self.fd, data[done:], offset + done)
            except OSError as error:
                if not (self._direct and error.errno == errno.EINVAL):
                    raise
                self._end_direct()
        if not self._direct:
            _Writeback.start(self.fd, offset, data.size)

    def _start_direct(self) -> bool:
        if not _DIRECT or self._base % ALIGN or not hasattr(os, "O_DIRECT"):
            return False
        try:
            import fcntl  # noqa: PLC0415 - POSIX only

            self._flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self._flags | os.O_DIRECT)
        except (ImportError, OSError):  # EINVAL: this file system has no direct I/O
            return False
        return True

    def _end_direct(self) -> None:
        import fcntl  # noqa: PLC0415 - POSIX only

        fcntl.fcntl(self.fd, fcntl.F_SETFL, self._flags)
        self._direct = False

    # the caller's thread: filling the buffers

    def _submit(self, action, buffer: np.ndarray | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._tasks.put((action, buffer))

    def _flush(self) -> None:
        """Queue the current buffer's write (direct: its aligned part, the rest moves to
        the start of the next buffer) and take a free buffer."""
        if self._direct is None:
            self._direct = self._start_direct()
        count = self._fill - self._fill % ALIGN if self._direct else self._fill
        if count == 0:
            return
        full, carry = self._buf, self._fill - count
        self._submit(functools.partial(self._write_now, full[:count], self._base), full)
        self._buf = self._free.get()
        self._buf[:carry] = full[count : self._fill]
        self._base, self._fill = self._base + count, carry

    def _room(self, nbytes: int) -> np.ndarray:
        """The next ``nbytes`` of the output, contiguous in a buffer, for the caller to fill
        before it asks again."""
        if self._fill + nbytes > self._buf.size:
            self._flush()
            if self._fill + nbytes > self._buf.size:  # one piece larger than a buffer
                bigger = _buffer(self._fill + nbytes)
                bigger[: self._fill] = self._buf[: self._fill]
                self._buf = bigger
        view = self._buf[self._fill : self._fill + nbytes]
        self._fill += nbytes
        self.pos += nbytes
        return view

    def _spans(self, nbytes: int):
        """(offset, view) pieces of buffer that take the next ``nbytes`` of the output, in
        order; each is filled before the next is asked for."""
        done = 0
        while done < nbytes:
            if self._fill == self._buf.size:
                self._flush()
            span = self._room(min(nbytes - done, self._buf.size - self._fill))
            yield done, span
            done += span.size

    def write(self, data) -> int:
        """Write bytes, a contiguous array's bytes or :class:`ArrayBytes`."""
        if isinstance(data, ArrayBytes):
            self.write_array(data.array, data.dtype)
            return data.nbytes
        source = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else (
            data.reshape(-1).view(np.uint8))  # fmt: skip
        for done, span in self._spans(source.size):
            span[:] = source[done : done + span.size]
        return source.size

    def _open_source(self, mapped: MappedFile) -> int | None:
        """A descriptor of the file ``mapped`` maps, or None if its path is now another file."""
        if self._source is not None and self._source[0] is mapped:
            return self._source[1]
        if self._source is not None:
            os.close(self._source[1])
            self._source = None
        try:
            fd = os.open(mapped.path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (OSError, TypeError, ValueError):
            return None
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != mapped.identity:
            os.close(fd)
            return None
        self._source = (mapped, fd)
        return fd

    def _located(self, array: np.ndarray) -> tuple[int, int, MappedFile] | None:
        """(source descriptor, file offset, map) of a contiguous array mapped from a file."""
        mapped = mapped_origin(array) if _FROM_FILE and hasattr(os, "preadv") else None
        if mapped is None:
            return None
        offset = extent(array)[0] - mapped.address
        if offset < 0 or offset + array.nbytes > len(mapped):  # only ranges inside the map
            return None
        fd = self._open_source(mapped)
        return None if fd is None else (fd, offset, mapped)

    def _read_file(self, nbytes: int, src: int, offset: int, mapped: MappedFile) -> None:
        """The next ``nbytes`` of the output read from the source file at ``offset``."""
        for done, span in self._spans(nbytes):
            got = 0
            while got < span.size:
                n = os.preadv(src, [span[got:]], offset + done + got)
                if n == 0:
                    raise CheckpointError(f"{mapped.path}: the file shrank while being read")
                got += n

    def write_array(self, array: np.ndarray, dtype: np.dtype) -> None:
        """Write ``array``'s elements as C-ordered ``dtype`` bytes."""
        dtype = np.dtype(dtype)
        if array.size == 0:
            return
        if array.dtype == dtype and array.flags.c_contiguous:
            where = self._located(array)
            if where is not None:
                self._read_file(array.nbytes, *where)
                return
            self.write(array)
        else:
            self._write_converted(array.reshape(1) if array.ndim == 0 else array, dtype)
        _release(array)

    def _write_converted(self, array: np.ndarray, dtype: np.dtype) -> None:
        """Cast/transpose into the buffers, a piece of rows along the first axis at a time."""
        if self._pool is None and HANDS > 1:
            from concurrent.futures import ThreadPoolExecutor  # noqa: PLC0415 - when converting

            self._pool = ThreadPoolExecutor(HANDS - 1, thread_name_prefix="mconv-convert")
        row = array[0].size * dtype.itemsize
        rows = max(1, CHUNK // max(row, 1))
        for start in range(0, array.shape[0], rows):
            part = array[start : start + rows]
            out = self._room(part.size * dtype.itemsize).view(dtype).reshape(part.shape)
            copy_blocked(out, part, self._pool)
