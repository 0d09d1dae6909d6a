"""The counter file's format: one fixed-size record of 28 bytes (magic, value, expiry, CRC-32), read
with one ``pread`` and written with one ``pwrite`` at offset 0, so a file always holds a whole old or
new record; ``GONE`` marks a file about to be unlinked (a tombstone), and a record that fails its
checks is ``CorruptCounter``, never 0; and how a counter file is opened.
"""

from __future__ import annotations

import os
import struct
import zlib

from ...errors import CorruptCounter

RECORD = struct.Struct("<4sqqI")  # magic, value, expires at (unix seconds, 0 = never), CRC-32
LIVE = b"TLY1"
GONE = b"TLY0"
#: Linux's flag; elsewhere nothing (the access time is then recorded as the system does).
NOATIME = getattr(os, "O_NOATIME", 0)
#: Files being created (a counter's first record, a shared value's new bytes) start with this.
TEMP_PREFIX = ".new-"


def pack_record(value: int, expires_at: int = 0, magic: bytes = LIVE) -> bytes:
    body = struct.pack("<4sqq", magic, value, expires_at)
    return body + struct.pack("<I", zlib.crc32(body))


def unpack_record(data: bytes, key: str, path: str) -> tuple[int, int] | None:
    """``(value, expires_at)`` of a live record, ``None`` for a tombstone; ``CorruptCounter`` for
    bytes (read from ``path``, the file of counter ``key``) that are no whole, intact record."""
    if len(data) != RECORD.size:
        raise CorruptCounter(
            f"counter {key!r}: file {path} holds {len(data)} bytes,"
            f" expected {RECORD.size}; fix or delete it by hand"
        )
    magic, value, expires_at, crc = RECORD.unpack(data)
    if magic not in (LIVE, GONE) or zlib.crc32(data[:-4]) != crc:
        raise CorruptCounter(f"counter {key!r}: file {path} fails its checksum; fix or delete it by hand")
    return None if magic == GONE else (value, expires_at)


def open_counter_file(path: str, mode: int) -> int:
    """A descriptor to an existing counter file (``FileNotFoundError`` if there is none), opened with
    ``O_NOATIME`` where the kernel lets this process (the file's owner, or privileged; ``EPERM``
    otherwise, then it is opened without): reading a record then does not dirty the file's inode to
    record the access time, a journal write of its own on every first read after a write (about a
    tenth of a step on a file not touched lately; nothing reads a counter file's access time)."""
    try:
        return os.open(path, mode | os.O_CLOEXEC | NOATIME)
    except PermissionError:
        return os.open(path, mode | os.O_CLOEXEC)
