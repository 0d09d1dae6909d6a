"""``FileCounterStore``: the counters' files and this process's cache of descriptors to them (a
bounded LRU of long-lived descriptors, each with the thread lock that guards its use, dropped after a
fork), every step under the thread lock and the file's ``flock``, the sweep of expired per-client
counters, and the shared values delegated to ``values.ValueFiles``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from ...errors import ConfigError, CorruptCounter, StoreRefused, StoreUnavailable
from ..base import CounterStore, WindowSupport, counter_name, log
from .records import GONE, RECORD, TEMP_PREFIX, open_counter_file, pack_record, unpack_record
from .sweep import sweep_directory
from .values import ValueFiles

T = TypeVar("T")


class _Handle:
    """One long-lived descriptor of this process, with the thread lock that guards its use."""

    __slots__ = ("fd", "lock", "closed")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.closed = False


class FileCounterStore(CounterStore, WindowSupport):
    """Atomic across every process and thread of one host sharing ``directory``.

    A process killed at any instant leaves each file holding either the old or the new record (one
    ``pwrite`` of 28 bytes).  With ``fsync`` each update is flushed to disk before it returns, so a
    power loss keeps every value that was returned.  A truncated or damaged file raises
    ``CorruptCounter`` for that counter; it is never read as 0.  Disk errors raise ``StoreUnavailable``.
    Never-expiring counters are never removed by the store; expired per-client counters are removed by a
    background sweep at most every ``sweep_interval`` seconds.
    """

    backend = "filesystem"
    cache_types = ("FileSystemCache",)
    multi_process = True

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], instance_path: str) -> FileCounterStore:
        return cls(
            settings["COUNTER_DIR"],
            fsync=settings["COUNTER_FSYNC"],
            sweep_interval=settings["COUNTER_SWEEP_INTERVAL"],
        )

    @classmethod
    def check_settings(
        cls, config: Mapping[str, Any], settings: Mapping[str, Any], instance_path: str
    ) -> dict[str, Any]:
        """``COUNTER_DIR`` may be neither the page cache's ``CACHE_DIR`` nor contain it: cachelib
        deletes the plain files at the top of ``CACHE_DIR`` that it did not write (pruning,
        ``clear()``), and nothing below (a directory there fails ``os.remove`` and is skipped)."""
        if settings["CACHE_TYPE"] == "FileSystemCache" and settings.get("CACHE_DIR"):
            counter_dir = settings["COUNTER_DIR"]
            cache_dir = os.path.abspath(os.path.join(instance_path, os.fspath(settings["CACHE_DIR"])))
            if os.path.commonpath([counter_dir, cache_dir]) == counter_dir:
                raise ConfigError(
                    f"COUNTER_DIR {counter_dir} must not be CACHE_DIR {cache_dir} nor contain it:"
                    " cachelib deletes files it did not write in CACHE_DIR"
                )
        return {}

    def where(self) -> str:
        return self.directory

    def __init__(
        self,
        directory: str,
        *,
        fsync: bool = False,
        max_open_files: int = 256,
        sweep_interval: float = 300.0,
    ) -> None:
        self.directory = os.path.abspath(directory)
        self._prefix = os.path.join(self.directory, "")
        os.makedirs(self.directory, exist_ok=True)
        self.fsync = fsync
        self.max_open_files = max_open_files
        self.sweep_interval = sweep_interval
        self._values = ValueFiles(self.directory, fsync)
        self.values_directory = self._values.directory
        self._start_process_state()
        ref = weakref.ref(self)

        def forget_inherited_descriptors() -> None:
            store = ref()
            if store is not None:
                store._after_fork_in_child()

        os.register_at_fork(after_in_child=forget_inherited_descriptors)

    # -- descriptors -------------------------------------------------------------------------------

    def _start_process_state(self) -> None:
        self._handles: OrderedDict[str, _Handle] = OrderedDict()
        self._handles_lock = threading.Lock()
        self._next_sweep = time.monotonic() + self.sweep_interval
        self._sweeping = False
        self._values.forget_locks()

    def _after_fork_in_child(self) -> None:
        for handle in self._handles.values():
            with contextlib.suppress(OSError):
                os.close(handle.fd)
        self._start_process_state()

    def _path(self, key: str) -> str:
        return self._prefix + key  # os.path.join's result: keys are file names (no "/"), never absolute

    def _handle(self, key: str, create: bool) -> _Handle | None:
        with self._handles_lock:
            handle = self._handles.get(key)
            if handle is not None:
                self._handles.move_to_end(key)
                return handle
        fd = self._open(key, create)
        if fd is None:
            return None
        with self._handles_lock:
            handle = self._handles.get(key)
            if handle is not None:
                os.close(fd)
                return handle
            handle = self._handles[key] = _Handle(fd)
            self._evict_idle_handles()
            return handle

    def _evict_idle_handles(self) -> None:
        """Close the least recently used descriptors beyond the bound, taken from the front of the LRU
        one at a time: the work is per descriptor closed, not per descriptor cached (with more counters
        in use than the bound, every step closes one; copying the whole cache to scan it was 40% of
        such a step).  One in use right now is moved to the back instead, as recently used; none is
        looked at twice in a call.  The caller holds ``_handles_lock``; a handle's lock is only tried,
        never waited for (its holder may be waiting for ``_handles_lock`` in ``_discard``)."""
        handles = self._handles
        looked_at = 0
        while len(handles) > self.max_open_files and looked_at < len(handles):
            looked_at += 1
            key, handle = next(iter(handles.items()))
            if not handle.lock.acquire(blocking=False):
                handles.move_to_end(key)
                continue
            try:
                os.close(handle.fd)
                handle.closed = True
                del handles[key]
            finally:
                handle.lock.release()

    def _discard(self, key: str, handle: _Handle) -> None:
        """Close a descriptor whose file was unlinked; the caller holds ``handle.lock``."""
        with self._handles_lock:
            if self._handles.get(key) is handle:
                del self._handles[key]
        os.close(handle.fd)
        handle.closed = True

    def _open(self, key: str, create: bool) -> int | None:
        path = self._path(key)
        while True:
            try:
                return open_counter_file(path, os.O_RDWR)
            except FileNotFoundError:
                if not create:
                    return None
            self._create(path)

    def _create(self, path: str) -> None:
        """Publish a file holding a full zero record, or leave the one another process published."""
        temp = os.path.join(self.directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, pack_record(0))
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, path)
        except FileExistsError:
            pass
        finally:
            os.unlink(temp)
        if self.fsync:
            self._fsync_directory()

    def _fsync_directory(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- records -----------------------------------------------------------------------------------

    def _read(self, fd: int, key: str) -> tuple[int, float] | None:
        """``(value, expires_at)`` of a live record, ``None`` for a tombstone."""
        return unpack_record(os.pread(fd, RECORD.size + 1, 0), key, self._path(key))

    def _read_settled(self, fd: int, key: str) -> tuple[int, float] | None:
        """``_read`` without a lock; a read racing another process's write may see a torn record, so
        a record that fails its checks is read again under a shared lock before it is called
        damaged (``CorruptCounter``)."""
        try:
            return self._read(fd, key)
        except CorruptCounter:
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                return self._read(fd, key)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _write(self, fd: int, value: int, ttl: int | None) -> None:
        self._write_record(fd, value, time.time() + ttl if ttl else 0)

    def _write_record(self, fd: int, value: int, expires_at: float) -> None:
        os.pwrite(fd, pack_record(value, expires_at), 0)
        if self.fsync:
            os.fdatasync(fd)

    @staticmethod
    def _is_expired(record: tuple[int, float]) -> bool:
        return bool(record[1]) and record[1] <= time.time()

    @classmethod
    def _live_value(cls, record: tuple[int, float] | None) -> int:
        return 0 if record is None or cls._is_expired(record) else record[0]

    def _locked(self, key: str, create: bool, step: Callable[[int | None, tuple[int, float] | None], T]) -> T:
        """Run ``step(fd, record)`` holding the thread lock and the ``flock`` of the counter's file.

        ``fd`` and ``record`` are ``None`` when the file does not exist and ``create`` is false.
        """
        try:
            while True:
                handle = self._handle(key, create)
                if handle is None:
                    return step(None, None)
                with handle.lock:
                    if handle.closed:
                        continue
                    fcntl.flock(handle.fd, fcntl.LOCK_EX)
                    try:
                        record = self._read(handle.fd, key)
                        if record is None:
                            self._discard(key, handle)
                            continue
                        return step(handle.fd, record)
                    finally:
                        if not handle.closed:
                            fcntl.flock(handle.fd, fcntl.LOCK_UN)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreRefused(f"counter directory {self.directory}: {error}") from error
            raise StoreUnavailable(f"counter directory {self.directory}: {error}") from error

    # -- the contract ------------------------------------------------------------------------------

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        def step(fd: int | None, record: tuple[int, float] | None) -> int:
            new = self.check_range(self._live_value(record) + delta)
            assert fd is not None
            self._write(fd, new, ttl)
            return new

        result = self._locked(key, True, step)
        if ttl:
            self._maybe_sweep()
        return result

    def add_in_window(self, key: str, delta: int, window: float) -> tuple[int, float]:
        """One record step under the lock, as ``add``: the record's expiry is the window's end, to
        the millisecond; set when the window starts, kept by every later step."""

        def step(fd: int | None, record: tuple[int, float] | None) -> tuple[int, float]:
            assert fd is not None
            if record is None or not record[1] or self._is_expired(record):
                value, ends = 0, time.time() + window
            else:
                value, ends = record
            new = self.check_range(value + delta)
            self._write_record(fd, new, ends)
            return new, ends

        result = self._locked(key, True, step)
        self._maybe_sweep()
        return result

    def read_window(self, key: str) -> tuple[int, float] | None:
        record = self._record(key)
        if record is None or not record[1] or self._is_expired(record):
            return None
        return record[0], record[1]

    def get(self, key: str, ttl: int | None = None) -> int:
        return self._renew(key, ttl) if ttl else self._live_value(self._record(key))

    def _record(self, key: str) -> tuple[int, float] | None:
        """``(value, expires_at)`` of ``key``'s record, read without the lock; ``None`` when missing."""
        try:
            while True:
                handle = self._handle(key, create=False)
                if handle is None:
                    return None
                with handle.lock:
                    if handle.closed:
                        continue  # evicted from the descriptor cache meanwhile: open it again
                    record = self._read_settled(handle.fd, key)
                    if record is None:  # a tombstone: reset meanwhile
                        self._discard(key, handle)
                        continue
                    return record
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreRefused(f"counter directory {self.directory}: {error}") from error
            raise StoreUnavailable(f"counter directory {self.directory}: {error}") from error

    def _renew(self, key: str, ttl: int) -> int:
        """Read under the lock and, if the record is live, write it back with a new expiry."""

        def step(fd: int | None, record: tuple[int, float] | None) -> int:
            if fd is None or record is None or self._is_expired(record):
                return 0
            self._write(fd, record[0], ttl)
            return record[0]

        return self._locked(key, False, step)

    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        self.check_range(value)

        def step(fd: int | None, _record: tuple[int, float] | None) -> None:
            assert fd is not None
            self._write(fd, value, ttl)

        self._locked(key, True, step)

    def delete(self, key: str) -> bool:
        def step(fd: int | None, record: tuple[int, float] | None) -> bool:
            if fd is None or record is None:
                return False
            self._unlink_locked(key, fd)
            return not self._is_expired(record)

        return self._locked(key, False, step)

    def _unlink_locked(self, key: str, fd: int) -> None:
        os.pwrite(fd, pack_record(0, 0, GONE), 0)
        os.unlink(self._path(key))
        if self.fsync:
            os.fdatasync(fd)
            self._fsync_directory()

    # -- shared values -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreRefused(f"counter directory {self.directory}: {error}") from error
            raise StoreUnavailable(f"counter directory {self.directory}: {error}") from error

    def get_value(self, key: str) -> bytes | None:
        with self._disk_errors():
            return self._values.read(key)

    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        with self._disk_errors(), self._values.locked(key):
            self._values.write(key, data, ttl)
        if ttl:
            self._maybe_sweep()

    def delete_value(self, key: str) -> bool:
        with self._disk_errors(), self._values.locked(key):
            existed = self._values.read(key) is not None
            self._values.delete(key)
            return existed

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        """Atomic across the processes and threads of the host: ``change`` runs once, under the lock."""
        with self._disk_errors(), self._values.locked(key):
            data = change(self._values.read(key))
            self._values.write(key, data, ttl)
        if ttl:
            self._maybe_sweep()
        return data

    def names(self, limit: int) -> list[str]:
        """The counter files that hold a live record, at most ``limit``.  Never listed: per-client
        counters (``@...``), temporary files, the sweep lock, the values' directory (no counter name
        starts as they do), a tombstoned file (being reset), a damaged one (logged; its own route
        answers 500).  Disk errors raise ``StoreUnavailable``."""
        return [name for name, _ in self.counts(limit)]

    def counts(self, limit: int) -> list[tuple[str, int]]:
        """``names`` with each counter's value from the same read of its file (one open per counter)."""
        found: list[tuple[str, int]] = []
        try:
            with os.scandir(self.directory) as entries:
                for entry in entries:
                    if len(found) >= limit:
                        break
                    if counter_name(entry.name) and entry.is_file():
                        record = self._live_record(entry.name)
                        if record is not None:
                            found.append((entry.name, record[0]))
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreRefused(f"counter directory {self.directory}: {error}") from error
            raise StoreUnavailable(f"counter directory {self.directory}: {error}") from error
        return found

    def _live_record(self, key: str) -> tuple[int, float] | None:
        """The record of counter file ``key`` when it exists and is live, unexpired and undamaged;
        else ``None``.  Opened read-only and closed again: listing many counters does not churn the
        descriptor cache."""
        try:
            fd = open_counter_file(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            return None  # reset since the directory was listed
        try:
            record = self._read_settled(fd, key)
        except CorruptCounter as error:
            log.warning("counter %r left out of a listing: %s", key, error)
            return None
        finally:
            os.close(fd)
        return None if record is None or self._is_expired(record) else record

    def health(self) -> dict[str, Any]:
        if not os.path.isdir(self.directory) or not os.access(self.directory, os.W_OK):
            raise StoreUnavailable(f"counter directory {self.directory} is missing or not writable")
        return {"directory": self.directory, "fsync": self.fsync}

    def close(self) -> None:
        with self._handles_lock:
            for handle in self._handles.values():
                with handle.lock:
                    os.close(handle.fd)
                    handle.closed = True
            self._handles.clear()

    # -- expiry of per-client counters -------------------------------------------------------------

    def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep:
            return
        with self._handles_lock:
            if self._sweeping or now < self._next_sweep:
                return
            self._sweeping = True
            self._next_sweep = now + self.sweep_interval
        threading.Thread(target=self._sweep_in_background, name="tally-sweep", daemon=True).start()

    def _sweep_in_background(self) -> None:
        try:
            self.sweep_expired()
        except OSError:
            pass  # the next sweep tries again; a counter operation reports disk trouble itself
        finally:
            self._sweeping = False

    def sweep_expired(self) -> int:
        """Remove expired per-client counters, expired shared values (limits' keys, sessions) and stale
        temporary files; return how many (``sweep.sweep_directory``: one process of the host at a
        time; only ``@`` files are ever opened, so a never-expiring counter cannot be removed)."""
        return sweep_directory(self.directory, self._remove_if_expired, self._values.sweep_expired)

    def _remove_if_expired(self, key: str, now: float) -> int:
        try:
            fd = os.open(self._path(key), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                record = self._read(fd, key)
            except CorruptCounter:
                return 0
            if record is None or not record[1] or record[1] > now:
                return 0  # a never-expiring record (no expiry time) is never removed
            self._unlink_locked(key, fd)
            return 1
        finally:
            os.close(fd)
