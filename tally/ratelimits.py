"""Tally as a storage for ``limits`` and so for Flask-Limiter: ``tally://``, on the counters' own store.

::

    Limiter(get_remote_address, app=app, storage_uri="tally://", storage_options={"counters": counters})

Every hit is one atomic step of the store, so no hit over the limit gets through, across threads,
worker processes and hosts that share the store.  That holds for all three of limits' strategies:

- fixed window: ``(count, end of window)``; the window starts at its first hit, as in limits' own
  storages.  On a store with ``WindowSupport`` (filesystem, SQL, Redis and its topologies, memory)
  it is one counter step, a per-client-style key whose lifetime is set by the window's first hit
  (its end rounded up to the whole second on the filesystem and SQL); elsewhere (memcached, the
  manager) a value update as below;
- moving window: the times of the hits in the window, newest first, as runs (a time and how many
  hits it took: a hit of any cost is one entry), never more than the limit;
- sliding window counter: ``(window number, previous count, current count)``, the two windows limits'
  other storages keep under two keys kept here in one value, so the weighted decision and the hit are
  one step.

The moving and sliding windows are one ``update_value``: the read, the decision and the write as one
step (under the store's lock, or a compare-and-set retried on a conflict).

Flask-Limiter asks ``get`` and ``get_expiry`` right after every hit, for its ``X-RateLimit-*``
headers: within ``RECENT`` (50 ms) the same thread is answered from that hit's own result instead of
two more store reads.  No hit is ever decided from it.

Limit keys are shared values under a mark of their own (``@rl.`` and a SHA-256 of limits' key), so
any key (long, unicode, ``/``, ``..``) is safe, and no counter listing, shared value or page cache
``clear()`` ever meets one.  Each key is written with the window's length as its lifetime, so it
expires by itself on every store (the filesystem's and SQL's sweeps remove it).  Each call answers or
fails within ``COUNTER_TIMEOUT``: an unreachable store raises ``StoreUnavailable``, which is this
storage's ``base_exceptions`` (a ``limits.errors.StorageError`` with ``wrap_exceptions``, what
Flask-Limiter's ``swallow_errors`` catches).  ``reset()`` is not supported (limits' own memcached
storage does not support it either): a store cannot list its shared values.

Time is each host's clock (``time.time()``), as in limits' memcached storage; hosts sharing a limit
should run NTP.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

from flask import Flask, current_app, has_app_context
from limits.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

from . import metrics
from .errors import StoreRefused, StoreUnavailable, TallyError
from .names import hashed_key
from .stores.base import CounterStore, WindowSupport

#: Shared values whose key starts with this are limits' (no validated key starts with ``@``).
LIMIT_MARK = "@rl."

#: How long a thread's own last hit or read of a fixed window answers its next get/get_expiry.
RECENT = 0.05
_FIXED = struct.Struct("<qd")  # hits, end of the window (unix seconds)
_SLIDING = struct.Struct("<qqq")  # window number (now // expiry), previous window's hits, current's
_RUNS_MARK = b"TMW2"  # a moving window stored as runs: (time, hits), newest first
_RUN = struct.Struct("<dI")
_RUN_MAX = 2**32 - 1


def limit_key(key: str) -> str:
    """The store key of limits' ``key``: 160 bits of its SHA-256, so any text maps to a safe key."""
    return hashed_key(LIMIT_MARK, key)


def _lifetime(expiry: float) -> int:
    """A store lifetime (whole seconds, at least 1) that outlives a window of ``expiry`` seconds."""
    return max(1, math.ceil(expiry))


class TallyStorage(Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow):
    """limits' ``Storage`` (with moving window and sliding window counter support) on the store of
    ``counters`` (a ``tally.Counters`` or ``tally.SharedValues``).  The store is the current app's,
    or, outside an app context, that of the app ``counters`` was created with (``Counters(app)``).

    ``TimestampedSlidingWindow``: the sliding window counter's windows are aligned on the clock
    (window number ``now // expiry``), as in limits' memory and memcached storages, not on the first
    hit; limits' tests and strategies read the marker to know which."""

    STORAGE_SCHEME = ["tally"]

    def __init__(
        self, uri: str | None = None, wrap_exceptions: bool = False, *, counters: Any = None, **options: Any
    ) -> None:
        if counters is None or not hasattr(counters, "init_app"):
            raise TypeError(
                'the tally:// storage needs the app\'s counters: storage_options={"counters": counters}'
            )
        if options:
            raise TypeError(f"the tally:// storage takes no options but counters; got {sorted(options)}")
        super().__init__(uri, wrap_exceptions=wrap_exceptions)
        self._counters = counters
        self._last = threading.local()  # this thread's last fixed window: see _fixed

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return TallyError

    def _store(self) -> CounterStore:
        if has_app_context():
            app = current_app
        else:
            bound = getattr(self._counters, "app", None)
            if not isinstance(bound, Flask):
                raise RuntimeError(
                    "the tally:// storage needs an app context, or counters created as Counters(app)"
                )
            app = bound
        try:
            store: CounterStore = app.extensions["tally"]
        except KeyError:
            raise RuntimeError("call counters.init_app(app) before using the tally:// storage") from None
        return store

    @staticmethod
    def _update(
        store: CounterStore, operation: str, key: str, change: Callable[[bytes | None], bytes], ttl: int
    ) -> bytes:
        return metrics.measure(store, operation, limit_key(key), store.update_value, change, ttl)

    @staticmethod
    def _read(store: CounterStore, key: str) -> bytes | None:
        return metrics.measure(store, "limit_get", limit_key(key), store.get_value)

    # -- fixed window ------------------------------------------------------------------------------

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """Add ``amount`` hits to the window of ``key`` (a new window of ``expiry`` s when there is
        none or it has ended) and return the window's hits, as one atomic step: a counter step on a
        store with ``WindowSupport``, else a value update."""
        store = self._store()
        if isinstance(store, WindowSupport):
            window = metrics.measure(store, "limit_hit", limit_key(key), store.add_in_window, amount, expiry)
            self._remember(key, window)
            return window[0]

        def change(data: bytes | None) -> bytes:
            now = time.time()
            hits, ends = _FIXED.unpack(data) if data and len(data) == _FIXED.size else (0, 0.0)
            if ends <= now:
                hits, ends = 0, now + expiry
            return _FIXED.pack(hits + amount, ends)

        hits, ends = _FIXED.unpack(self._update(store, "limit_hit", key, change, _lifetime(expiry)))
        self._remember(key, (int(hits), ends))
        return int(hits)

    def _remember(self, key: str, window: tuple[int, float] | None) -> None:
        self._last.window = (key, window, time.monotonic())

    def _fixed(self, key: str) -> tuple[int, float] | None:
        """The live window of ``key``: what this thread's last hit or read of it returned, if that
        was under ``RECENT`` s ago (Flask-Limiter asks ``get`` then ``get_expiry`` right after each
        hit, for its headers), else read from the store.  A hit is never decided from it."""
        last = getattr(self._last, "window", None)
        if last is not None and last[0] == key and time.monotonic() - last[2] < RECENT:
            window: tuple[int, float] | None = last[1]
            return window if window is None or window[1] > time.time() else None
        store = self._store()
        if isinstance(store, WindowSupport):
            window = metrics.measure(store, "limit_get", limit_key(key), store.read_window)
        else:
            data = self._read(store, key)
            window = _FIXED.unpack(data) if data and len(data) == _FIXED.size else None
            if window is not None and window[1] <= time.time():
                window = None
        self._remember(key, window)
        return window

    def get(self, key: str) -> int:
        window = self._fixed(key)
        return window[0] if window else 0

    def get_expiry(self, key: str) -> float:
        window = self._fixed(key)
        return window[1] if window else time.time()

    def clear(self, key: str) -> None:
        """Forget ``key``'s hits, whichever strategy counted them (a window counter or a value)."""
        self._last.window = None
        store = self._store()
        if isinstance(store, WindowSupport):
            metrics.measure(store, "limit_clear", limit_key(key), store.delete)
        metrics.measure(store, "limit_clear", limit_key(key), store.delete_value)

    def check(self) -> bool:
        """Whether the store answers (its health check, within the timeout)."""
        try:
            self._store().health()
        except StoreUnavailable:
            return False
        return True

    def reset(self) -> int | None:
        raise NotImplementedError(
            "the tally:// storage cannot reset every limit at once (a store cannot list its shared"
            " values); clear limits one by one with clear()"
        )

    # -- moving window -----------------------------------------------------------------------------

    def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Take ``amount`` entries if fewer than ``limit - amount + 1`` were taken in the last
        ``expiry`` s; the check and the taking are one atomic step."""
        if amount > limit:
            return False
        acquired = False

        def change(data: bytes | None) -> bytes:
            nonlocal acquired  # the last call's decision is the one written
            now = time.time()
            live = _live_runs(data, now, limit, expiry)
            acquired = sum(count for _, count in live) + amount <= limit
            return _pack_runs([(now, amount), *live] if acquired else live)

        try:
            self._update(self._store(), "limit_hit", key, change, _lifetime(expiry))
        except StoreRefused as error:
            raise StoreRefused(
                f"a moving window of {limit} hits keeps one entry per hit in the window in one item,"
                f" and the store refused it: {error}; use the sliding window counter for a limit this"
                " large, or raise the store's item size"
            ) from error
        return acquired

    def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        now = time.time()
        live = _live_runs(self._read(self._store(), key), now, limit, expiry)
        return (live[-1][0], sum(count for _, count in live)) if live else (now, 0)

    # -- sliding window counter --------------------------------------------------------------------

    def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        """Count ``amount`` hits in the current window if the previous window's hits, weighted by
        the part of it still inside the sliding window, plus the current window's, plus ``amount``
        stay within ``limit`` (limits' rule); the check and the counting are one atomic step."""
        if amount > limit:
            return False
        acquired = False

        def change(data: bytes | None) -> bytes:
            nonlocal acquired
            now = time.time()
            number, previous, current = _windows(data, now, expiry)
            weighted = previous * _previous_ttl(now, expiry) / expiry + current
            acquired = math.floor(weighted) + amount <= limit
            if acquired:
                current += amount
            return _SLIDING.pack(number, previous, current)

        self._update(self._store(), "limit_hit", key, change, _lifetime(2 * expiry))
        return acquired

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        """The windows' hits and how long each still weighs, as of the moment the store answered:
        limits adds these to its own ``time.time()``, taken right after this returns, so a slow
        round trip does not shift the reset time it reports."""
        data = self._read(self._store(), key)
        now = time.time()
        _, previous, current = _windows(data, now, expiry)
        previous_ttl = _previous_ttl(now, expiry) if previous else 0.0
        current_ttl = (1 - (now / expiry) % 1) * expiry + expiry
        return previous, previous_ttl, current, current_ttl

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        self.clear(key)


def _runs(data: bytes | None) -> list[tuple[float, int]]:
    """A moving window's hits, newest first, as ``(time, hits at that time)``: a hit of cost 1,000
    is one entry, not a thousand.  Read from the format before runs too (one 8-byte time per hit)."""
    if not data:
        return []
    if data.startswith(_RUNS_MARK) and (len(data) - len(_RUNS_MARK)) % _RUN.size == 0:
        return [(at, count) for at, count in _RUN.iter_unpack(data[len(_RUNS_MARK) :])]
    if len(data) % 8 == 0:
        return [(at, 1) for at in struct.unpack(f"<{len(data) // 8}d", data)]
    return []


def _live_runs(data: bytes | None, now: float, limit: int, expiry: int) -> list[tuple[float, int]]:
    """The runs of hits still inside the window, newest first, holding at most ``limit`` hits."""
    live: list[tuple[float, int]] = []
    total = 0
    for at, count in _runs(data):
        if at > now - expiry and total < limit:
            live.append((at, min(count, limit - total)))
            total += live[-1][1]
    return live


def _pack_runs(runs: list[tuple[float, int]]) -> bytes:
    packed = bytearray(_RUNS_MARK)
    for at, count in runs:
        while count > 0:  # a run holds at most 2**32 - 1 hits
            packed += _RUN.pack(at, min(count, _RUN_MAX))
            count -= _RUN_MAX
    return bytes(packed)


def _windows(data: bytes | None, now: float, expiry: int) -> tuple[int, int, int]:
    """``(number, previous hits, current hits)`` as of ``now``: windows that ended are moved on."""
    number = int(now // expiry)
    if not data or len(data) != _SLIDING.size:
        return number, 0, 0
    stored, previous, current = _SLIDING.unpack(data)
    if stored == number:
        return number, previous, current
    if stored == number - 1:
        return number, current, 0
    return number, 0, 0


def _previous_ttl(now: float, expiry: int) -> float:
    """How long the previous window still weighs in the sliding window (as limits computes it)."""
    return (1 - ((now - expiry) / expiry) % 1) * expiry
