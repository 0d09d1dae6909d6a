"""``GET /api/leaderboard``: the busiest shared counters, a deliberately stale view kept in
Flask-Caching's ``cache`` for at most ``LEADERBOARD_MAX_AGE`` seconds.

This is the job an expiring cache is right for: the list is costly to compute (every counter name is
enumerated and read) and nobody is hurt when it is a few seconds old, as long as it says how old it
is.  Counters themselves never go through the cache: ``/api/counters/<name>`` reads the store on
every request.

Guarantees:
- The answer lists the top ``TOP`` counters by value (ties by name), with values read at or after
  ``computed_at``, which is never more than ``max_age`` seconds before the answer.  That is checked
  on every read of the cached entry, so memcached's whole-second expiry, another app's longer
  setting or a clock running backwards cannot stretch it.  A counter changed while the values are
  read shows either value.
- Only a list computed for this counter store is served: the cache key and the entry name the store
  (backend, directory or servers, key prefix) and the scan limit, so apps sharing a page cache (one
  memcached, one Redis) never see each other's lists; an entry that is malformed, another store's or
  too old is a miss.
- The page cache may fail without harm: every call to it is bounded by ``COUNTER_TIMEOUT``, and an
  error or an overrun is a miss, so the list is computed from the store instead.  Flask-Caching's own
  ``@cache.cached`` gives none of this: its key is the path alone, it trusts the backend's expiry, in
  debug mode it re-raises a backend error (a 500), and nothing bounds a call to a hung backend
  (Flask-Caching's Redis client has no socket timeout, pylibmc waits 5 s).
- A store that cannot be reached answers 503 (``StoreUnavailable``, through the app's error
  handlers), a memory store in a second process 500 (``NotOneProcess``): never an empty or guessed
  list.  A counter that cannot be read (``CorruptCounter``) is left out and logged; its own route
  reports it.
- With more than ``LEADERBOARD_SCAN_LIMIT`` counters only that many are looked at (the store stops
  enumerating there): the list is then the top of an arbitrary subset.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, jsonify
from flask.blueprints import BlueprintSetupState

from common import cache
from settings import ConfigError
from tally.names import NAME_PATTERN
from tally.stores import CounterStore

from .limits import never_limited

log = logging.getLogger(__name__)

bp = Blueprint("leaderboard", __name__, url_prefix="/api")

#: How many counters the leaderboard shows.
TOP = 10
DEFAULT_MAX_AGE = 10
DEFAULT_SCAN_LIMIT = 10_000
#: How far in the future a cached ``computed_at`` may lie (another host's clock) and still be served.
CLOCK_SKEW = 1.0

Rows = list[tuple[str, int]]


@bp.record_once
def _configure(state: BlueprintSetupState) -> None:
    """Defaults and checks of the two settings when the blueprint is registered: a bad value stops
    the app at start-up with one ``ConfigError`` line naming the key."""
    config = state.app.config
    config.setdefault("LEADERBOARD_MAX_AGE", DEFAULT_MAX_AGE)
    config.setdefault("LEADERBOARD_SCAN_LIMIT", DEFAULT_SCAN_LIMIT)
    for key, least in (("LEADERBOARD_MAX_AGE", 0), ("LEADERBOARD_SCAN_LIMIT", 1)):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"setting {key} must be a whole number >= {least}; got {value!r}")


# -- the page cache, every call bounded in time -------------------------------------------------------


class BoundedCalls:
    """Runs each call to a page-cache backend in a helper thread and waits for it at most ``within``
    seconds.  A call that raises or overruns returns ``FAILED`` (and is logged); an overrunning
    call is left to finish on its own, and until it has, further calls to that backend in this
    process return ``FAILED`` at once: a hung backend holds one thread per process, not one per
    request.

    The helper threads are ``RUNNERS`` daemon threads per process, started on first use and kept
    (starting a thread per call cost more than the cached read itself).  When every one of them is
    busy, a call waits in their queue, and that wait counts in ``within``."""

    FAILED = object()
    RUNNERS = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._overdue: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._runners = 0

    def _submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` for a runner (the caller holds ``_lock``)."""
        if self._runners < self.RUNNERS:
            self._runners += 1
            threading.Thread(
                target=self._run_jobs, args=(self._jobs,), name="tally-leaderboard-cache", daemon=True
            ).start()
        self._jobs.put(job)

    @staticmethod
    def _run_jobs(jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            jobs.get()()

    def call(self, backend: Any, method: str, *args: Any, within: float) -> Any:
        """``backend.<method>(*args)``, or ``FAILED``."""
        with self._lock:
            if self._pid != os.getpid():  # a forked child: the parent's threads are not here
                self._pid = os.getpid()
                self._overdue = weakref.WeakKeyDictionary()
                self._jobs, self._runners = queue.SimpleQueue(), 0
            if self._overdue.get(backend):
                return self.FAILED
        if _gevent_patched():
            return self._call_in_real_thread(backend, method, args, within)
        outcome: dict[str, Any] = {}
        state = {"done": False, "overdue": False}
        finished = threading.Event()

        def run() -> None:
            try:
                outcome["value"] = getattr(backend, method)(*args)
            except Exception as error:  # a backend error is a miss, never an answer
                outcome["error"] = error
            finally:
                with self._lock:
                    state["done"] = True
                    if state["overdue"] and self._overdue.get(backend):
                        self._overdue[backend] -= 1
                finished.set()

        with self._lock:
            self._submit(run)
        finished.wait(within)
        with self._lock:
            if not state["done"]:
                state["overdue"] = True
                self._overdue[backend] = self._overdue.get(backend, 0) + 1
                log.warning("leaderboard: page cache %s() gave no answer within %s s", method, within)
                return self.FAILED
        if "error" in outcome:
            error = outcome["error"]
            log.warning("leaderboard: page cache %s() failed: %s: %s", method, type(error).__name__, error)
            return self.FAILED
        return outcome["value"]

    def _call_in_real_thread(self, backend: Any, method: str, args: tuple, within: float) -> Any:
        """Under gevent a ``threading.Thread`` is a greenlet, and a C client (pylibmc) blocks the
        whole worker for its own timeout (measured: 4.7 s, ``/livez`` included).  gevent's pool of
        real threads runs the call instead; the bookkeeping stays in this greenlet and in the hub's
        callback, which gevent never runs concurrently with it."""
        import gevent

        result = gevent.get_hub().threadpool.spawn(getattr(backend, method), *args)
        result.wait(within)
        if not result.ready():
            self._overdue[backend] = self._overdue.get(backend, 0) + 1

            def settled(_: Any) -> None:
                if self._overdue.get(backend):
                    self._overdue[backend] -= 1

            result.rawlink(settled)
            log.warning("leaderboard: page cache %s() gave no answer within %s s", method, within)
            return self.FAILED
        if not result.successful():
            error = result.exception
            log.warning("leaderboard: page cache %s() failed: %s: %s", method, type(error).__name__, error)
            return self.FAILED
        return result.value


def _gevent_patched() -> bool:
    """Whether gevent has patched ``threading`` in this process (gunicorn.conf.py does it for the
    gevent worker)."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    return bool(gevent_monkey and gevent_monkey.is_module_patched("threading"))


bounded = BoundedCalls()


# -- the list -----------------------------------------------------------------------------------------


def store_scope(store: CounterStore, scan_limit: int) -> str:
    """A digest naming what a list is computed from: the store, where it lives (its directory,
    servers, socket or database), its key prefix, and the scan limit."""
    parts = [
        store.backend,
        f"scan_limit={scan_limit}",
        f"where={store.where()!r}",
        f"prefix={store.key_prefix!r}",
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def cache_key(scope: str) -> str:
    """The page-cache key of the list for ``scope`` (Flask-Caching prepends ``CACHE_KEY_PREFIX``)."""
    return f"tally-leaderboard/{scope}"


def _rank(row: tuple[str, int]) -> tuple[int, str]:
    return -row[1], row[0]


def top_counters(store: CounterStore, scan_limit: int) -> Rows:
    """The ``TOP`` counters by value, ties by name, among ``store.counts(scan_limit)`` (each counter
    read once).  ``StoreUnavailable`` propagates; a ``CorruptCounter`` is left out and logged."""
    return heapq.nsmallest(TOP, store.counts(scan_limit), key=_rank)


def encode_entry(scope: str, computed_at: float, rows: Rows) -> str:
    """The cached form of a list: JSON text, which every backend stores as it is."""
    entry = {"scope": scope, "computed_at": computed_at, "counters": [list(row) for row in rows]}
    return json.dumps(entry, separators=(",", ":"))


def _valid_row(row: Any) -> bool:
    return (
        isinstance(row, tuple)
        and isinstance(row[0], str)
        and NAME_PATTERN.fullmatch(row[0]) is not None
        and isinstance(row[1], int)
        and not isinstance(row[1], bool)
    )


def decode_entry(raw: Any, scope: str, max_age: int, now: float) -> tuple[float, Rows] | None:
    """``(computed_at, rows)`` of a cached entry that is well formed, computed for ``scope`` and at
    most ``max_age`` seconds old at ``now``; ``None`` (a miss) for anything else."""
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
        computed_at = entry["computed_at"]
        rows = [(name, value) for name, value in entry["counters"]]
        valid = (
            entry["scope"] == scope
            and isinstance(computed_at, (int, float))
            and not isinstance(computed_at, bool)
            and now - max_age <= computed_at <= now + CLOCK_SKEW
            and len(rows) <= TOP
            and all(_valid_row(row) for row in rows)
            and rows == sorted(rows, key=_rank)
            and len({name for name, _ in rows}) == len(rows)
        )
    except (TypeError, ValueError, KeyError):
        valid = False
    if not valid:
        log.warning("leaderboard: a cached entry that is malformed, another store's or too old was ignored")
        return None
    return float(computed_at), rows


@bp.get("/leaderboard")
@never_limited
def leaderboard() -> Response:
    """``{"counters": [{"name": ..., "value": ...}, ...], "computed_at": <unix time>, "max_age": <s>}``,
    at most ``max_age`` seconds old; ``Cache-Control: public, max-age=<max_age>`` with an ``Age``
    header saying how much of it is used up, so a downstream cache cannot make it older either."""
    config = current_app.config
    max_age: int = config["LEADERBOARD_MAX_AGE"]
    scan_limit: int = config["LEADERBOARD_SCAN_LIMIT"]
    within = float(config.get("COUNTER_TIMEOUT", 0.5))
    store: CounterStore = current_app.extensions["tally"]
    scope = store_scope(store, scan_limit)
    backend = cache.cache  # resolved in the app context; the bounded calls run in a helper thread

    found = None
    if max_age > 0:
        raw = bounded.call(backend, "get", cache_key(scope), within=within)
        if raw is not BoundedCalls.FAILED:
            found = decode_entry(raw, scope, max_age, time.time())
    if found is not None:
        computed_at, rows = found
    else:
        # Taken before the reads, to the millisecond rounded down: every value is at least this new
        # (rounded to nearest, it could lie after the reads began, and after the answer: seen in a test).
        computed_at = math.floor(time.time() * 1000) / 1000
        rows = top_counters(store, scan_limit)
        if max_age > 0:
            entry = encode_entry(scope, computed_at, rows)
            bounded.call(backend, "set", cache_key(scope), entry, max_age, within=within)

    response = jsonify(
        counters=[{"name": name, "value": value} for name, value in rows],
        computed_at=computed_at,
        max_age=max_age,
    )
    response.headers["Cache-Control"] = f"public, max-age={max_age}"
    response.headers["Age"] = str(max(0, int(time.time() - computed_at)))
    return response
