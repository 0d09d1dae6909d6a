"""Counters as small files in a directory of one host.

Each counter is one file holding one fixed-size record (magic, value, expiry, CRC-32).  An update takes a
per-counter thread lock, then an exclusive ``flock`` on the file, reads the record with ``pread`` and
writes the new one with a single ``pwrite`` at offset 0.  Both locks are needed: a ``flock`` belongs to
the open file description, so threads sharing this process's long-lived descriptor are not excluded by
it; the thread lock excludes them.

A file is only ever unlinked (reset, expiry of a per-client counter) under its ``flock`` and after a
tombstone record has been written into it.  A process still holding a descriptor to the unlinked file
finds the tombstone when it next takes the lock and reopens the path, so a counter is never split
between an orphaned inode and a new file.  Descriptors are per process: after a fork the child drops
those it inherited (their ``flock`` would be shared with the parent's).

The package's modules: ``records`` (the counter file's format), ``values`` (the shared values' files),
``sweep`` (the sweep of expired files) and ``store`` (``FileCounterStore``, with its descriptors).
Every name callers use is importable from the package itself; importing it registers the store.
"""

from __future__ import annotations

from .records import GONE, LIVE, RECORD, TEMP_PREFIX, pack_record, unpack_record
from .store import FileCounterStore
from .sweep import SWEEP_LOCK
from .values import VALUE_HEADER, VALUES_DIR, ValueFiles

__all__ = [
    "GONE",
    "LIVE",
    "RECORD",
    "SWEEP_LOCK",
    "TEMP_PREFIX",
    "VALUES_DIR",
    "VALUE_HEADER",
    "FileCounterStore",
    "ValueFiles",
    "pack_record",
    "unpack_record",
]
