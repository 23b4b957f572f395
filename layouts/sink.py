"""Streaming tensors into an output file, fast and in bounded memory (the writers of
safetensors and ``.pkl`` files use it).

- A tensor whose bytes lie, contiguous and already in the written dtype, in a memory-mapped
  checkpoint (:class:`layouts.files.MappedFile`) is copied file to file in the kernel
  (``os.copy_file_range``, else ``os.sendfile``) after the source path is reopened and
  checked to be the same file. Only the array's own bytes are copied, and they lie inside
  the map, which covers the file as it was read. Otherwise, or when the kernel refuses,
  the bytes are written from memory.
- Other tensors (transposed, cast) are converted block by block into a reused chunk; the
  map's pages they read are then unmapped (``MADV_DONTNEED``: they stay in the page cache)
  so that RSS holds about one tensor of them, not the whole file.
- One writer thread writes while the caller transposes the next chunk.
- Writeback of what is written starts early (``sync_file_range``, where the C library has
  it), so the final ``fsync`` of :func:`layouts.atomic.atomic_write` has little left.
"""

from __future__ import annotations

import functools
import mmap
import os
import queue
import threading
from typing import BinaryIO

import numpy as np

from .errors import CheckpointError
from .files import MappedFile

CHUNK = 8 << 20  # a converted tensor is written in pieces of about this size
BLOCK = 64 << 10  # source bytes per transposed block: stays in the L2 cache
WRITEBACK = 32 << 20  # start writing back after this much new data
DEPTH = 3  # chunks being filled, queued or written at a time
_PIECE = 1 << 30  # at most this much per system call
_KERNEL_COPY = True  # tests turn the kernel copy off to compare with the fallback


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


def copy_blocked(out: np.ndarray, view: np.ndarray) -> None:
    """``out[...] = view`` (any strides, cast unsafely), in blocks along ``view``'s
    slowest axis: far faster than one strided copy of a transposed array."""
    axis = int(np.argmax([abs(s) if n > 1 else 0 for n, s in zip(view.shape, view.strides)]))
    count = view.shape[axis]
    step = max(1, BLOCK * count // max(view.nbytes, 1))
    for start in range(0, count, step):
        index = (slice(None),) * axis + (slice(start, start + step),)
        np.copyto(out[index], view[index], casting="unsafe")


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


class Sink:
    """The writable end of an output file: ``write(bytes)`` and ``write_array(array,
    dtype)``, in order. ``f`` is flushed first; afterwards one writer thread does every
    write, kernel copy and writeback on its descriptor while the caller prepares the
    next chunk (NumPy and the system calls release the GIL). Memory stays bounded:
    :data:`DEPTH` chunks in flight. Used as a context manager: leaving it waits for the
    writes and raises the first error they met."""

    def __init__(self, f: BinaryIO):
        f.flush()
        self.fd = f.fileno()
        self.pos = self.flushed = os.lseek(self.fd, 0, os.SEEK_CUR)
        self._source: tuple[MappedFile, int] | None = None
        self._chunks: queue.Queue = queue.Queue()
        for _ in range(DEPTH):
            self._chunks.put(np.empty(0, np.uint8))
        self._tasks: queue.Queue = queue.Queue(maxsize=DEPTH)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._work, name="mconv-sink", daemon=True)
        self._thread.start()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(raise_error=kind is None)

    def close(self, raise_error: bool = True) -> None:
        """Wait for the writes; close the sources; raise the writer's error (if asked)."""
        if self._thread.is_alive():
            self._stop = not raise_error  # the caller failed: skip what is still queued
            self._tasks.put(None)
            self._thread.join()
        if self._source is not None:
            os.close(self._source[1])
            self._source = None
        if raise_error and self._error is not None:
            raise self._error

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            action, chunk = task
            try:
                if self._error is None and not self._stop:
                    action()
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                self._error = error
            finally:
                if chunk is not None:
                    self._chunks.put(chunk)

    def _submit(self, action, chunk: np.ndarray | None = None) -> None:
        if self._error is not None:
            raise self._error
        self._tasks.put((action, chunk))

    def _advance(self, nbytes: int) -> None:
        self.pos += nbytes
        if self.pos - self.flushed >= WRITEBACK:
            _Writeback.start(self.fd, self.flushed, self.pos - self.flushed)
            self.flushed = self.pos

    def _write_now(self, data) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.write(self.fd, view[done : done + _PIECE])
        self._advance(len(view))

    def write(self, data) -> int:
        """Write bytes, a contiguous array's bytes or :class:`ArrayBytes`."""
        if isinstance(data, ArrayBytes):
            self.write_array(data.array, data.dtype)
            return data.nbytes
        if isinstance(data, np.ndarray):
            data = data.reshape(-1).view(np.uint8)
        nbytes = memoryview(data).nbytes
        self._submit(lambda: self._write_now(data))
        return nbytes

    def _open_source(self, mapped: MappedFile) -> int | None:
        """A descriptor of the file ``mapped`` maps, or None if its path is now another file."""
        if self._source is not None and self._source[0] is mapped:
            return self._source[1]
        if self._source is not None:  # closed once the copies queued before are done
            self._submit(functools.partial(os.close, self._source[1]))
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

    def _located(self, array: np.ndarray) -> tuple[int, int, int, MappedFile] | None:
        """(source descriptor, file offset, bytes, map) of an array mapped from a file."""
        mapped = mapped_origin(array) if _KERNEL_COPY else None
        if mapped is None:
            return None
        low, nbytes = extent(array)
        offset = low - mapped.address
        if offset < 0 or offset + nbytes > len(mapped):  # only ranges inside the map
            return None
        fd = self._open_source(mapped)
        return None if fd is None else (fd, offset, nbytes, mapped)

    def _copy_now(self, array: np.ndarray, src: int, offset: int, nbytes: int,
                  mapped: MappedFile) -> None:  # fmt: skip
        """Copy in the kernel (copy_file_range, else sendfile); what they refuse to copy is
        written from memory."""
        done = 0
        for call in ("copy_file_range", "sendfile"):
            try:
                while done < nbytes:
                    count = min(nbytes - done, _PIECE)
                    if call == "copy_file_range":
                        n = os.copy_file_range(src, self.fd, count, offset + done)
                    else:
                        n = os.sendfile(self.fd, src, offset + done, count)
                    if n == 0:
                        raise CheckpointError(f"{mapped.path}: the file shrank while being read")
                    done += n
                    self._advance(n)
                return
            except (OSError, AttributeError):
                continue  # not supported here (EXDEV, ENOSYS, EINVAL, ...): next way
        self._write_now(array.reshape(-1).view(np.uint8)[done:])

    def write_array(self, array: np.ndarray, dtype: np.dtype) -> None:
        """Write ``array``'s elements as C-ordered ``dtype`` bytes."""
        dtype = np.dtype(dtype)
        if array.size == 0:
            return
        if array.dtype == dtype and array.flags.c_contiguous:
            where = self._located(array)
            if where is not None:
                self._submit(functools.partial(self._copy_now, array, *where))
            else:
                self.write(array)
            return
        self._write_converted(array.reshape(1) if array.ndim == 0 else array, dtype)
        _release(array)

    def _write_converted(self, array: np.ndarray, dtype: np.dtype) -> None:
        """Cast/transpose into a free chunk along the first axis, queue its write, repeat."""
        row = array[0].size * dtype.itemsize
        rows = max(1, CHUNK // max(row, 1))
        for start in range(0, array.shape[0], rows):
            part = array[start : start + rows]
            nbytes = part.size * dtype.itemsize
            chunk = self._chunks.get()
            if chunk.size < nbytes:
                chunk = np.empty(max(nbytes, CHUNK), np.uint8)
            out = chunk[:nbytes].view(dtype).reshape(part.shape)
            copy_blocked(out, part)
            self._submit(functools.partial(self._write_now, chunk[:nbytes]), chunk)
