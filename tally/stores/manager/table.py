"""The manager's state, which lives in the manager process only: ``CounterTable`` (counters and shared
values with their versions and expiries, every step one call under one lock), the methods clients may
call on it (``EXPOSED``, served under ``TABLE_IDENT``), and its snapshot file, checked whole when read
and written atomically.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import threading
import time
from typing import Any

from ...errors import ConfigError
from ..base import INT64_MAX, INT64_MIN, counter_name

#: The id the manager serves its one table under (multiprocessing's ``create`` would pick one per
#: server, costing every new connection a second connect and handshake to ask for it).
TABLE_IDENT = "tally-counters"

#: Expired per-client entries are dropped at most this often, on a write.
SWEEP_INTERVAL = 60.0
SNAPSHOT_FORMAT = "tally-manager-snapshot/1"


class CounterTable:
    """The manager's state: counters (``int``), shared values (``bytes``, with a version), each with an
    optional expiry; every method is one step under one lock.  Runs in the manager process only."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self.snapshot_lock = threading.Lock()  # one snapshot write at a time, in the order taken
        self._counters: dict[str, tuple[int, float | None]] = {}
        self._values: dict[str, tuple[bytes, float | None, int]] = {}
        # Versions are unique across runs too: a client may send a version it read before a restart.
        self._version = secrets.randbits(62)
        self._changes = 0
        self._closed = False
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        self.started = time.time()
        self.snapshot_report: dict[str, Any] = {}
        if state:
            self._restore(state)

    # -- helpers, called with the lock held
    def _open(self) -> None:
        if self._closed:  # a built-in error: the client unpickles no other kind
            raise RuntimeError("the counter manager is shutting down")

    def _live_counter(self, key: str, now: float) -> tuple[int, float | None] | None:
        entry = self._counters.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= now:
            return None
        return entry

    def _live_value(self, key: str, now: float) -> tuple[bytes, float | None, int] | None:
        entry = self._values.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= now:
            return None
        return entry

    def _changed(self, ttl: int | None, now: float) -> None:
        self._changes += 1
        if ttl and now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            for table in (self._counters, self._values):
                for key in [k for k, entry in table.items() if entry[1] is not None and entry[1] <= now]:
                    del table[key]

    # -- counters
    def add(self, key: str, delta: int, ttl: int | None) -> int:
        """The new value; a result outside int64 is returned without being stored (the client raises
        ``Overflow`` for it)."""
        with self._lock:
            self._open()
            now = time.monotonic()
            entry = self._live_counter(key, now)
            value = (entry[0] if entry else 0) + delta
            if INT64_MIN <= value <= INT64_MAX:
                self._counters[key] = (value, now + ttl if ttl else None)
                self._changed(ttl, now)
            return value

    def get(self, key: str, ttl: int | None) -> int:
        with self._lock:
            self._open()
            now = time.monotonic()
            entry = self._live_counter(key, now)
            if entry is None:
                return 0
            if ttl:
                self._counters[key] = (entry[0], now + ttl)
                self._changed(ttl, now)
            return entry[0]

    def set(self, key: str, value: int, ttl: int | None) -> None:
        if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"counter values are int64; got {value!r:.40}")
        with self._lock:
            self._open()
            now = time.monotonic()
            self._counters[key] = (value, now + ttl if ttl else None)
            self._changed(ttl, now)

    def delete(self, key: str) -> bool:
        with self._lock:
            self._open()
            now = time.monotonic()
            existed = self._live_counter(key, now) is not None
            if self._counters.pop(key, None) is not None:
                self._changed(None, now)
            return existed

    # -- shared values
    def get_value(self, key: str) -> bytes | None:
        with self._lock:
            self._open()
            entry = self._live_value(key, time.monotonic())
            return None if entry is None else entry[0]

    def _store_value(self, key: str, data: bytes, ttl: int | None, now: float) -> None:
        if type(data) is not bytes:
            raise TypeError(f"shared values are bytes; got {type(data).__name__}")
        self._version += 1
        self._values[key] = (data, now + ttl if ttl else None, self._version)
        self._changed(ttl, now)

    def set_value(self, key: str, data: bytes, ttl: int | None) -> None:
        with self._lock:
            self._open()
            self._store_value(key, data, ttl, time.monotonic())

    def delete_value(self, key: str) -> bool:
        with self._lock:
            self._open()
            now = time.monotonic()
            existed = self._live_value(key, now) is not None
            if self._values.pop(key, None) is not None:
                self._changed(None, now)
            return existed

    def read_value(self, key: str) -> tuple[bytes | None, int]:
        """The bytes and their version (0: missing), for ``replace_value``."""
        with self._lock:
            self._open()
            entry = self._live_value(key, time.monotonic())
            return (None, 0) if entry is None else (entry[0], entry[2])

    def replace_value(self, key: str, version: int, data: bytes, ttl: int | None) -> bool:
        """Store ``data`` only if ``key`` still has ``version`` (0: still missing); return whether."""
        with self._lock:
            self._open()
            now = time.monotonic()
            entry = self._live_value(key, now)
            if (0 if entry is None else entry[2]) != version:
                return False
            self._store_value(key, data, ttl, now)
            return True

    # -- enumeration and facts
    def names(self, prefix: str, limit: int) -> list[str]:
        """Live shared counters under ``prefix``, without it: never per-client keys."""
        found: list[str] = []
        with self._lock:
            self._open()
            now = time.monotonic()
            for key, (_, expires) in self._counters.items():
                if len(found) >= limit:
                    break
                if key.startswith(prefix) and (expires is None or expires > now):
                    name = counter_name(key[len(prefix) :])
                    if name:
                        found.append(name)
        return found

    def health(self) -> dict[str, Any]:
        with self._lock:
            self._open()
            return {
                "pid": os.getpid(),
                "started": self.started,
                "uptime": round(time.time() - self.started, 3),
                "counters": len(self._counters),
                "values": len(self._values),
                **self.snapshot_report,
            }

    # -- snapshots
    def state(self, closing: bool = False) -> tuple[dict[str, Any], int]:
        """A consistent copy of the live entries, expiries as wall-clock times, and the number of
        changes it includes.  ``closing``: no step is accepted after this copy."""
        with self._lock:
            if closing:
                self._closed = True
            mono, wall = time.monotonic(), time.time()

            def wall_time(expires: float | None) -> float | None:
                return None if expires is None else wall + (expires - mono)

            counters = {
                key: [value, wall_time(expires)]
                for key, (value, expires) in self._counters.items()
                if expires is None or expires > mono
            }
            values = {
                key: [base64.b64encode(data).decode("ascii"), wall_time(expires)]
                for key, (data, expires, _) in self._values.items()
                if expires is None or expires > mono
            }
            return {"format": SNAPSHOT_FORMAT, "saved": wall, "counters": counters, "values": values}, (
                self._changes
            )

    def changes(self) -> int:
        return self._changes

    def close(self) -> None:
        """Accept no more steps (they answer an error: 503 for the client)."""
        with self._lock:
            self._closed = True

    def _restore(self, state: dict[str, Any]) -> None:
        mono, wall = time.monotonic(), time.time()
        for key, (value, expires) in state["counters"].items():
            if expires is None or expires > wall:
                self._counters[key] = (value, None if expires is None else mono + (expires - wall))
        for key, (encoded, expires) in state["values"].items():
            if expires is None or expires > wall:
                self._version += 1
                data = base64.b64decode(encoded, validate=True)
                self._values[key] = (
                    data,
                    None if expires is None else mono + (expires - wall),
                    self._version,
                )


#: The table's methods clients may call.
EXPOSED = (
    "add",
    "get",
    "set",
    "delete",
    "get_value",
    "set_value",
    "delete_value",
    "read_value",
    "replace_value",
    "names",
    "health",
)


def read_snapshot(path: str) -> dict[str, Any] | None:
    """The state saved at ``path`` (``None``: no file yet).  A file that is not a complete snapshot
    raises ``ConfigError``: starting empty would silently lose every counter in it."""
    try:
        with open(path, encoding="utf-8") as file:
            state = json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ConfigError(f"snapshot {path} cannot be read: {error}") from None

    def number_or_none(x: Any) -> bool:
        return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))

    try:
        valid = (
            state["format"] == SNAPSHOT_FORMAT
            and all(
                isinstance(k, str) and type(v) is int and INT64_MIN <= v <= INT64_MAX and number_or_none(e)
                for k, (v, e) in state["counters"].items()
            )
            and all(
                isinstance(k, str) and isinstance(d, str) and number_or_none(e)
                for k, (d, e) in state["values"].items()
            )
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        valid = False
    if not valid or not isinstance(state, dict):
        raise ConfigError(f"{path} is not a Tally manager snapshot; move it away to start empty")
    return state


def write_snapshot(table: CounterTable, path: str, closing: bool = False) -> int:
    """Write the table's state to ``path`` atomically (a complete temporary file, fsynced, then
    ``os.replace``): a crash leaves the previous snapshot or the new one, never a mix.  Returns the
    number of changes it includes."""
    with table.snapshot_lock:
        return _write_snapshot(table, path, closing)


def _write_snapshot(table: CounterTable, path: str, closing: bool) -> int:
    state, changes = table.state(closing)
    directory = os.path.dirname(path) or "."
    temp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(state, file, separators=(",", ":"))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    table.snapshot_report = {"snapshot": path, "snapshot_saved": state["saved"]}
    return changes
