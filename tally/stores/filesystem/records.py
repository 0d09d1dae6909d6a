"""The counter file's format: one fixed-size record of 28 bytes (magic, value, expiry, CRC-32), read
with one ``pread`` and written with one ``pwrite`` at offset 0, so a file always holds a whole old or
new record; ``GONE`` marks a file about to be unlinked (a tombstone), and a record that fails its
checks is ``CorruptCounter``, never 0; and how a counter file is opened.
"""

from __future__ import annotations

import math
import os
import struct
import zlib

from ...errors import CorruptCounter

RECORD = struct.Struct("<4sqqI")  # magic, value, expires at (0 = never), CRC-32
#: A record that never expires (a shared counter), or one whose expiry is in whole unix seconds (as
#: written before sub-second expiries).
LIVE = b"TLY1"
#: A record whose expiry is in unix milliseconds (a per-client counter, a fixed window).
LIVE_MS = b"TLY2"
GONE = b"TLY0"
#: Linux's flag; elsewhere nothing (the access time is then recorded as the system does).
NOATIME = getattr(os, "O_NOATIME", 0)
#: Files being created (a counter's first record, a shared value's new bytes) start with this.
TEMP_PREFIX = ".new-"


def pack_record(value: int, expires_at: float = 0, magic: bytes = LIVE) -> bytes:
    """The record of ``value``, expiring at unix time ``expires_at`` (0: never) to the millisecond,
    rounded up; a record that never expires keeps the first format, which every version reads."""
    if expires_at and magic == LIVE:
        magic, stored = LIVE_MS, math.ceil(expires_at * 1000)
    else:
        stored = int(expires_at)
    body = struct.pack("<4sqq", magic, value, stored)
    return body + struct.pack("<I", zlib.crc32(body))


def unpack_record(data: bytes, key: str, path: str) -> tuple[int, float] | None:
    """``(value, expires_at)`` of a live record (``expires_at``: unix seconds, 0 = never), ``None`` for
    a tombstone; ``CorruptCounter`` for bytes (read from ``path``, the file of counter ``key``) that
    are no whole, intact record."""
    if len(data) != RECORD.size:
        raise CorruptCounter(
            f"counter {key!r}: file {path} holds {len(data)} bytes,"
            f" expected {RECORD.size}; fix or delete it by hand"
        )
    magic, value, expires_at, crc = RECORD.unpack(data)
    if magic not in (LIVE, LIVE_MS, GONE) or zlib.crc32(data[:-4]) != crc:
        raise CorruptCounter(f"counter {key!r}: file {path} fails its checksum; fix or delete it by hand")
    if magic == GONE:
        return None
    return value, expires_at / 1000 if magic == LIVE_MS else float(expires_at)


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
