"""Counters in a dict of this process: for development with one process only."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import NotOneProcess
from .base import REGISTRY, CounterStore, ForkAdoption, WindowSupport, counter_name

#: Lock files this process holds, by path: one open descriptor per file, whatever the number of stores.
_HELD_LOCKS: dict[str, int] = {}
_HELD_LOCKS_GUARD = threading.Lock()


def fix() -> str:
    """What to do instead, naming every store that several processes can share."""
    shared = ", ".join(name for name, cls in REGISTRY.items() if cls.multi_process)
    return (
        f"use a shared store ({shared}) or serve from one process with threads"
        " (gunicorn -w 1 --threads N, app.run(threaded=True), flask run)"
    )


class MemoryCounterStore(CounterStore, ForkAdoption, WindowSupport):
    """Atomic across the threads of one process (one lock); nothing is shared between processes.

    It never hands out a number another process could hand out too.  Every operation raises
    ``NotOneProcess`` (HTTP 500, naming the fix) when it runs:
    - in a process forked from the one that built the store (``app.run(processes=N)``, a pre-forking
      server), whose counts would be thrown away with the child, unless that process ``adopt``ed the
      store (gunicorn's single worker does, in ``post_fork``); or
    - while another live process of the same app (the same ``lock_path``, in the instance folder) uses
      a memory store: several workers that each built the app (gunicorn without Tally's config,
      uWSGI or mod_wsgi with several processes).  The first process to count holds an ``flock`` until
      it exits.
    Values are lost when the process ends.
    """

    backend = "memory"
    cache_types = ("SimpleCache",)
    multi_process = False
    #: Expired per-client entries are dropped at most this often, on a write.
    sweep_interval = 60.0

    def __init__(self, lock_path: str | None = None) -> None:
        self._owner = os.getpid()
        self._lock_path = lock_path
        self._lock = threading.Lock()
        self._values: dict[str, tuple[int, float | None]] = {}
        self._shared: dict[str, tuple[bytes, float | None]] = {}
        self._next_sweep = time.monotonic() + self.sweep_interval

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], instance_path: str) -> MemoryCounterStore:
        return cls(lock_path=os.path.join(instance_path, "memory-store.lock"))

    def adopt(self) -> None:
        """Make the calling process (a fork of the builder that will be the only one to count) the
        owner.  Only a store that holds nothing may be adopted."""
        with self._lock:
            if self._values or self._shared:
                raise NotOneProcess("a memory store that already holds counts cannot move to another process")
            self._owner = os.getpid()

    def _check_process(self) -> None:
        pid = os.getpid()
        if pid != self._owner:
            raise NotOneProcess(
                f"the memory store keeps counts inside process {self._owner}, but this request runs in"
                f" process {pid}, forked from it, whose counts would be lost: {fix()}"
            )
        if self._lock_path is not None:
            _hold_lock(self._lock_path)

    def _current(self, key: str, now: float) -> int:
        value, expires = self._values.get(key, (0, None))
        if expires is not None and expires <= now:
            return 0
        return value

    def _store(self, key: str, value: int, ttl: int | None, now: float) -> None:
        self._values[key] = (value, now + ttl if ttl else None)
        if ttl:
            self._maybe_sweep(now)

    def _maybe_sweep(self, now: float) -> None:
        """Drop expired per-client counters and expired shared values (limits' keys, sessions), at
        most every ``sweep_interval`` s; called under the lock after a write with a lifetime."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_interval
        for table in (self._values, self._shared):
            for k in [k for k, entry in table.items() if entry[1] is not None and entry[1] <= now]:
                del table[k]

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        self._check_process()
        with self._lock:
            now = time.monotonic()
            value = self.check_range(self._current(key, now) + delta)
            self._store(key, value, ttl, now)
            return value

    def add_in_window(self, key: str, delta: int, window: float) -> tuple[int, float]:
        self._check_process()
        with self._lock:
            now = time.monotonic()
            value, ends = self._values.get(key, (0, None))
            if ends is None or ends <= now:
                value, ends = 0, now + window
            new = self.check_range(value + delta)
            self._values[key] = (new, ends)
            self._maybe_sweep(now)
            return new, time.time() + (ends - now)

    def read_window(self, key: str) -> tuple[int, float] | None:
        self._check_process()
        with self._lock:
            now = time.monotonic()
            value, ends = self._values.get(key, (0, None))
            if ends is None or ends <= now:
                return None
            return value, time.time() + (ends - now)

    def get(self, key: str, ttl: int | None = None) -> int:
        self._check_process()
        with self._lock:
            now = time.monotonic()
            value = self._current(key, now)
            entry = self._values.get(key)
            if ttl and entry is not None and (entry[1] is None or entry[1] > now):
                self._values[key] = (value, now + ttl)
            return value

    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        self.check_range(value)
        self._check_process()
        with self._lock:
            self._store(key, value, ttl, time.monotonic())

    def delete(self, key: str) -> bool:
        self._check_process()
        with self._lock:
            entry = self._values.pop(key, None)
            return entry is not None and (entry[1] is None or entry[1] > time.monotonic())

    def _live_shared(self, key: str, now: float) -> bytes | None:
        data, expires = self._shared.get(key, (None, None))
        return None if expires is not None and expires <= now else data

    def get_value(self, key: str) -> bytes | None:
        self._check_process()
        with self._lock:
            return self._live_shared(key, time.monotonic())

    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        self._check_process()
        with self._lock:
            now = time.monotonic()
            self._shared[key] = (data, now + ttl if ttl else None)
            if ttl:
                self._maybe_sweep(now)

    def delete_value(self, key: str) -> bool:
        self._check_process()
        with self._lock:
            existed = self._live_shared(key, time.monotonic()) is not None
            self._shared.pop(key, None)
            return existed

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        self._check_process()
        with self._lock:
            now = time.monotonic()
            data = change(self._live_shared(key, now))
            self._shared[key] = (data, now + ttl if ttl else None)
            if ttl:
                self._maybe_sweep(now)
            return data

    def names(self, limit: int) -> list[str]:
        """The live shared counters in the dict (per-client keys and shared values are never listed),
        at most ``limit``: a partial list when there are more.  ``NotOneProcess`` as for every call."""
        self._check_process()
        found: list[str] = []
        with self._lock:
            now = time.monotonic()
            for key, (_, expires) in self._values.items():
                if len(found) >= limit:
                    break
                if (expires is None or expires > now) and counter_name(key):  # not "@..." keys
                    found.append(key)
        return found

    def health(self) -> dict[str, Any]:
        self._check_process()
        with self._lock:
            return {"keys": len(self._values)}


def _hold_lock(path: str) -> None:
    """Hold an exclusive ``flock`` on ``path`` for the rest of this process's life, or raise
    ``NotOneProcess`` when another live process holds it."""
    if path in _HELD_LOCKS:
        return
    with _HELD_LOCKS_GUARD:
        if path in _HELD_LOCKS:
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)  # the instance folder, which apps may lack
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NotOneProcess(
                f"another process of this app is counting in its own memory store ({path} is locked):"
                f" each process would count on its own; {fix()}"
            ) from None
        _HELD_LOCKS[path] = fd
