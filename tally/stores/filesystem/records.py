"""The counter file's format: one fixed-size record of 28 bytes (magic, value, expiry, CRC-32), read
with one ``pread`` and written with one ``pwrite`` at offset 0, so a file always holds a whole old or
new record; ``GONE`` marks a file about to be unlinked (a tombstone), and a record that fails its
checks is ``CorruptCounter``, never 0.
"""

from __future__ import annotations

import struct
import zlib

from ...errors import CorruptCounter

RECORD = struct.Struct("<4sqqI")  # magic, value, expires at (unix seconds, 0 = never), CRC-32
LIVE = b"TLY1"
GONE = b"TLY0"
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
