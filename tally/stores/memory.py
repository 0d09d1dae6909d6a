"""Counters in a dict of this process: for development with one process only."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .base import CounterStore


class MemoryCounterStore(CounterStore):
    """Atomic across the threads of one process (one lock); nothing is shared between processes.

    Gunicorn refuses to start this store with more than one worker (``gunicorn.conf.py``), since every
    worker would count on its own.  Values are lost when the process ends.
    """

    backend = "memory"
    multi_process = False
    #: Expired per-client entries are dropped at most this often, on a write.
    sweep_interval = 60.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, tuple[int, float | None]] = {}
        self._shared: dict[str, tuple[bytes, float | None]] = {}
        self._next_sweep = time.monotonic() + self.sweep_interval

    def _current(self, key: str, now: float) -> int:
        value, expires = self._values.get(key, (0, None))
        if expires is not None and expires <= now:
            return 0
        return value

    def _store(self, key: str, value: int, ttl: int | None, now: float) -> None:
        self._values[key] = (value, now + ttl if ttl else None)
        if ttl and now >= self._next_sweep:
            self._next_sweep = now + self.sweep_interval
            expired = [k for k, (_, exp) in self._values.items() if exp is not None and exp <= now]
            for k in expired:
                del self._values[k]

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        with self._lock:
            now = time.monotonic()
            value = self.check_range(self._current(key, now) + delta)
            self._store(key, value, ttl, now)
            return value

    def get(self, key: str, ttl: int | None = None) -> int:
        with self._lock:
            now = time.monotonic()
            value = self._current(key, now)
            entry = self._values.get(key)
            if ttl and entry is not None and (entry[1] is None or entry[1] > now):
                self._values[key] = (value, now + ttl)
            return value

    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        self.check_range(value)
        with self._lock:
            self._store(key, value, ttl, time.monotonic())

    def delete(self, key: str) -> bool:
        with self._lock:
            entry = self._values.pop(key, None)
            return entry is not None and (entry[1] is None or entry[1] > time.monotonic())

    def _live_shared(self, key: str, now: float) -> bytes | None:
        data, expires = self._shared.get(key, (None, None))
        return None if expires is not None and expires <= now else data

    def get_value(self, key: str) -> bytes | None:
        with self._lock:
            return self._live_shared(key, time.monotonic())

    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        with self._lock:
            now = time.monotonic()
            self._shared[key] = (data, now + ttl if ttl else None)

    def delete_value(self, key: str) -> bool:
        with self._lock:
            existed = self._live_shared(key, time.monotonic()) is not None
            self._shared.pop(key, None)
            return existed

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        with self._lock:
            now = time.monotonic()
            data = change(self._live_shared(key, now))
            self._shared[key] = (data, now + ttl if ttl else None)
            return data

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"keys": len(self._values)}
