"""Opening checkpoint files: regular files only, never a FIFO, a device or a socket.

A path is opened without blocking (``O_NONBLOCK``: opening a FIFO would otherwise wait
for a writer forever) and the *open descriptor* is checked to be a regular file, so a
path swapped between a check and the open cannot slip through. Symlinks are followed by
the open; files a checkpoint names itself (OneFlow variables, ONNX external data) are
resolved first and must stay inside the checkpoint's folder (:func:`inside`).
"""

from __future__ import annotations

import mmap
import os
import stat
from typing import BinaryIO

import numpy as np

from .errors import CheckpointError

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory"}  # fmt: skip


def open_regular(path: str, what: str = "the checkpoint") -> tuple[BinaryIO, int]:
    """(binary file, size) of the regular file at ``path``; anything else is a CheckpointError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what})") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot be opened ({error.strerror})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "something else")
        raise CheckpointError(f"{path}: not a regular file but {kind} ({what})")
    return os.fdopen(fd, "rb"), info.st_size


class MappedFile(mmap.mmap):
    """A read-only map that remembers which file it maps (``path``, ``identity``: device
    and inode) and its ``address`` (its length is ``len``), so that a writer can read a tensor's
    bytes from the file (:mod:`layouts.sink`) after reopening the path and checking that
    it is still the same file."""

    path: str
    identity: tuple[int, int]
    address: int


def map_bytes(f: BinaryIO, size: int, source: str) -> tuple[mmap.mmap | bytes, np.ndarray]:
    """The whole file, memory-mapped read-only: (the map, for scanning; a uint8 array view).
    ``source`` is the file's path."""
    if size == 0:
        return b"", np.zeros(0, np.uint8)
    try:
        mapped = MappedFile(f.fileno(), size, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{source}: cannot be memory-mapped ({error})") from None
    info = os.fstat(f.fileno())
    array = np.frombuffer(mapped, np.uint8)
    mapped.path, mapped.identity = source, (info.st_dev, info.st_ino)
    mapped.address = array.__array_interface__["data"][0]
    return mapped, array


def inside(real_root: str, path: str) -> bool:
    """True when ``path``, symlinks resolved, lies inside the resolved folder ``real_root``."""
    return os.path.commonpath([real_root, os.path.realpath(path)]) == real_root
