"""Shared values on disk, beside the counters of a ``FileCounterStore``: under ``.values`` (no counter
name starts with a dot), each value's bytes in ``data/<key>`` behind a header (expiry, CRC-32 of the
bytes), replaced whole by ``os.replace`` so a reader sees the old bytes or the new, never a mix; and a
lock file per key in ``locks/``, never replaced, whose ``flock`` (with a thread lock stripe) is held
by every write, so that an update reads, changes and writes the value as one step on the host.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import time
import uuid
import zlib
from collections.abc import Iterator

from ...errors import CorruptValue
from ..base import KeyLocks
from .records import TEMP_PREFIX

#: The shared values' directory, inside the counter directory.
VALUES_DIR = ".values"
VALUE_HEADER = struct.Struct("<qI")  # expires at (unix seconds, 0 = never), CRC-32 of the bytes


class ValueFiles:
    """The shared values of one counter directory; ``fsync``: every write is flushed to disk, the
    bytes and the directory entry that ``os.replace`` changed, before it returns."""

    def __init__(self, counter_directory: str, fsync: bool) -> None:
        self.directory = os.path.join(counter_directory, VALUES_DIR)
        self.fsync = fsync
        os.makedirs(os.path.join(self.directory, "data"), exist_ok=True)
        os.makedirs(os.path.join(self.directory, "locks"), exist_ok=True)
        self._locks = KeyLocks()

    def forget_locks(self) -> None:
        """New thread locks, in a forked child (one held by a parent's thread would never be let go)."""
        self._locks = KeyLocks()

    def path(self, key: str) -> str:
        return os.path.join(self.directory, "data", key)

    def _lock_path(self, key: str) -> str:
        return os.path.join(self.directory, "locks", key)

    @contextlib.contextmanager
    def locked(self, key: str) -> Iterator[None]:
        """Hold this key's thread lock stripe and the ``flock`` of its lock file."""
        with self._locks(key):
            fd = self._lock_file(key)
            try:
                yield
            finally:
                os.close(fd)

    def _lock_file(self, key: str) -> int:
        """The key's lock file, opened and ``flock``ed.  The sweep removes the lock file of an expired
        value while holding its lock: a process that got the lock of a file already unlinked holds a
        lock nobody else can see, so it lets go and locks the file now at the path."""
        path = self._lock_path(key)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_ino == os.stat(path).st_ino:
                    return fd
            except FileNotFoundError:
                pass  # unlinked by the sweep between our open and stat: lock the new one
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)

    def sweep_expired(self, now: float) -> int:
        """Remove the files of values that expired before ``now`` (limits' keys, sessions and any
        value given a timeout), each under its lock, and their lock files; return how many.  A value
        without expiry is never removed."""
        removed = 0
        with os.scandir(os.path.join(self.directory, "data")) as entries:
            names = [entry.name for entry in entries if not entry.name.startswith(TEMP_PREFIX)]
        for key in names:
            if not self._expires_before(key, now):
                continue  # cheap check without the lock; checked again under it
            with self.locked(key):
                if not self._expires_before(key, now):
                    continue  # written again meanwhile
                self.delete(key)
                os.unlink(self._lock_path(key))  # still held: the next locker sees it is gone
                removed += 1
        return removed

    def _expires_before(self, key: str, now: float) -> bool:
        try:
            with open(self.path(key), "rb") as file:
                header = file.read(VALUE_HEADER.size)
        except FileNotFoundError:
            return False
        if len(header) < VALUE_HEADER.size:
            return False  # damaged: left for its reader to report
        expires_at, _ = VALUE_HEADER.unpack(header)
        return bool(expires_at) and expires_at <= now

    def read(self, key: str) -> bytes | None:
        try:
            with open(self.path(key), "rb") as file:
                blob = file.read()
        except FileNotFoundError:
            return None
        if len(blob) < VALUE_HEADER.size:
            raise CorruptValue(f"shared value {key!r}: file is {len(blob)} bytes, too short")
        expires_at, crc = VALUE_HEADER.unpack_from(blob)
        data = blob[VALUE_HEADER.size :]
        if zlib.crc32(data) != crc:
            raise CorruptValue(f"shared value {key!r}: file {self.path(key)} fails its checksum")
        if expires_at and expires_at <= time.time():
            return None
        return data

    def write(self, key: str, data: bytes, ttl: int | None) -> None:
        expires_at = int(time.time()) + ttl + 1 if ttl else 0
        temp = os.path.join(self.directory, "data", f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(VALUE_HEADER.pack(expires_at, zlib.crc32(data)) + data)
                if self.fsync:
                    file.flush()
                    os.fsync(file.fileno())
            os.replace(temp, self.path(key))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        if self.fsync:
            self._fsync_data_directory()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path(key))

    def _fsync_data_directory(self) -> None:
        """Flush the directory that holds the values' files: the entry ``os.replace`` changed."""
        fd = os.open(os.path.join(self.directory, "data"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
