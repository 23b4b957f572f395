"""Zip records read from a memory map, never trusting the archive's sizes.

``zipfile`` parses the central directory (names, offsets, sizes, CRCs); the data is
then taken from the map here: each record's local header must be its own and lie
inside the file, a compressed record is inflated at most to its declared size (plus
one byte, to notice a lie), the result must have exactly that size and CRC, and
encrypted records and compression methods other than stored and deflate are
refused. ``zipfile``'s own reader is never used: it inflates bzip2 and lzma records
in one unbounded call (a 326-byte bzip2 record took 508 MiB).
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from typing import BinaryIO

import numpy as np

from .errors import CheckpointError

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")
_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate",
            zipfile.ZIP_BZIP2: "bzip2", zipfile.ZIP_LZMA: "lzma"}  # fmt: skip


def directory(f: BinaryIO, source: str) -> dict[str, zipfile.ZipInfo]:
    """name -> ZipInfo from the central directory (a damaged one is a CheckpointError)."""
    try:
        with zipfile.ZipFile(f) as archive:
            return {info.filename: info for info in archive.infolist()}
    except Exception as error:  # zipfile reports a damaged archive in many ways
        raise CheckpointError(
            f"{source}: not a readable zip archive ({type(error).__name__}: {error})"
        ) from None


def data_offset(mm: np.ndarray, info: zipfile.ZipInfo, source: str) -> int:
    """Byte offset of a record's (possibly compressed) data, from its local header."""
    start = info.header_offset
    if info.flag_bits & 0x1:
        raise CheckpointError(f"{source}: zip record {info.filename!r} is encrypted")
    if start < 0 or start + _LOCAL_HEADER.size > mm.size:
        raise CheckpointError(f"{source}: zip record {info.filename!r} starts outside the file")
    header = _LOCAL_HEADER.unpack(mm[start : start + _LOCAL_HEADER.size].tobytes())
    if header[0] != b"PK\x03\x04":
        raise CheckpointError(
            f"{source}: zip record {info.filename!r} has a corrupted local header"
        )
    name_start = start + _LOCAL_HEADER.size
    if mm[name_start : name_start + header[9]].tobytes() != info.filename.encode():
        raise CheckpointError(f"{source}: zip record {info.filename!r} points at the local header of "
                              "another record")  # fmt: skip
    data = name_start + header[9] + header[10]
    if data + info.compress_size > mm.size:
        raise CheckpointError(
            f"{source}: zip record {info.filename!r} claims {info.compress_size} bytes at offset "
            f"{data}, beyond the end of the {mm.size}-byte file"
        )
    return data


def stored_record(mm: np.ndarray, info: zipfile.ZipInfo, source: str) -> np.ndarray:
    """An uncompressed record as a view of the map (zero copy; its CRC is not checked,
    which would read every byte of every storage at load time)."""
    if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
        raise CheckpointError(f"{source}: record {info.filename!r} is compressed; torch.save "
                              "writes its storages uncompressed")  # fmt: skip
    start = data_offset(mm, info, source)
    return mm[start : start + info.file_size]


def read_record(mm: np.ndarray, info: zipfile.ZipInfo, source: str, limit: int) -> bytes:
    """A small record's bytes (at most ``limit``), inflated with a bound, size and CRC checked."""
    if info.file_size > limit:
        raise CheckpointError(f"{source}: record {info.filename!r} claims {info.file_size} "
                              f"bytes, more than the {limit} allowed for it")  # fmt: skip
    start = data_offset(mm, info, source)
    raw = mm[start : start + info.compress_size].tobytes()
    if info.compress_type == zipfile.ZIP_STORED:
        data = raw
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            data = inflate.decompress(raw, info.file_size + 1)
        except zlib.error as error:
            raise CheckpointError(f"{source}: record {info.filename!r} is corrupted "
                                  f"({error})") from None  # fmt: skip
    else:
        method = _METHODS.get(info.compress_type, f"method {info.compress_type}")
        raise CheckpointError(f"{source}: record {info.filename!r} uses {method} compression; "
                              "only stored and deflate records are read")  # fmt: skip
    if len(data) != info.file_size:
        raise CheckpointError(f"{source}: record {info.filename!r} holds {len(data)}"
                              f"{'+' if len(data) > info.file_size else ''} bytes, but its "
                              f"header declares {info.file_size}")  # fmt: skip
    if zlib.crc32(data) != info.CRC:
        raise CheckpointError(f"{source}: record {info.filename!r} fails its CRC check")
    return data
