"""Prometheus metrics of Tally's store steps, and the log lines an operator acts on.

Metrics are optional: without ``prometheus_client`` installed nothing is recorded, every call here costs
a flag check, and counters work exactly the same.  With it, each store step is counted by backend,
operation and outcome (``tally_store_operations_total``) and timed (``tally_store_operation_seconds``);
counter names are never labels (users choose them, so their number is unbounded).

Several processes (gunicorn workers): prometheus_client decides *when it is imported* whether values
live in this process's memory or in per-process files under ``PROMETHEUS_MULTIPROC_DIR``, summed when
scraped.  That variable must be set before the process first imports ``tally``; the demo's
``gunicorn.conf.py`` sets it in the master, before it loads the app.  Without it, each process reports
only its own steps.

Operator events (store unreachable, recovered, overflow, memcached restarted, evictions) are logged
once per event per process, never once per request: an outage under load is one line when it starts and
one when it ends, however many requests failed in between.  Logs do not depend on prometheus_client.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from .errors import ConfigError, Conflict, CorruptCounter, CorruptValue, Overflow, StoreUnavailable

log = logging.getLogger(__name__)


class MeasuredStore(Protocol):
    """What the metrics and the operator's log lines read of a store (every ``CounterStore`` has both):
    its name, the ``backend`` label, and where it lives (``where``, never with a password)."""

    @property
    def backend(self) -> str: ...

    def where(self) -> str: ...


#: Whether metrics are recorded (prometheus_client is installed).
ENABLED: bool
try:
    import prometheus_client
    from prometheus_client import multiprocess

    ENABLED = True
except ImportError:  # metrics are an extra: the library works without them
    ENABLED = False
#: prometheus_client's multiprocess directory, as it saw it when imported (None: one process).
MULTIPROCESS_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if ENABLED and MULTIPROCESS_DIR is not None and not os.path.isdir(MULTIPROCESS_DIR):
    # prometheus_client would fail at the first step of every request instead (or, set but empty,
    # write its files into the working directory).
    raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR={MULTIPROCESS_DIR!r} is not a directory")

#: Store steps take microseconds (filesystem, memory) to a timeout (0.5 s by default).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
#: A store counts as recovered at its first good step this long after its last failure, so that a
#: store failing for some requests only (one memcached server of several) is not logged as flapping.
RECOVERY_QUIET_SECONDS = 2.0
#: At most this many counters get their own overflow line per process (the metric counts them all).
OVERFLOW_LOG_LIMIT = 1000

if ENABLED:
    STORE_OPERATIONS = prometheus_client.Counter(
        "tally_store_operations_total",
        "Tally store steps by backend, operation and outcome"
        " (ok, overflow, unavailable, conflict, corrupt, error)",
        ["backend", "operation", "outcome"],
    )
    STORE_SECONDS = prometheus_client.Histogram(
        "tally_store_operation_seconds",
        "Duration of Tally store steps, whatever their outcome",
        ["backend", "operation"],
        buckets=LATENCY_BUCKETS,
    )
    UPDATE_RETRIES = prometheus_client.Counter(
        "tally_store_update_retries_total",
        "Shared-value updates run again after losing a compare-and-set race (memcached, Redis, manager)",
        ["backend"],
    )
    HTTP_REQUESTS = prometheus_client.Counter(
        "tally_http_requests_total",
        "HTTP requests answered, by endpoint (the route's name, never the path) and status",
        ["endpoint", "status"],
    )
    REPLICA_WAITS_SHORT = prometheus_client.Counter(
        "tally_store_replica_waits_short_total",
        "Steps acknowledged by fewer replicas than COUNTER_MIN_REPLICAS asked for (stores that wait)",
        ["backend"],
    )
    MEMCACHED_RESTARTS = prometheus_client.Gauge(
        "tally_memcached_restarts_seen",
        "memcached server starts after the app's own start that health checks noticed (each loses the"
        " counters the server held); the most any worker noticed",
        ["server"],
        multiprocess_mode="max",
    )
    MEMCACHED_EVICTIONS = prometheus_client.Gauge(
        "tally_memcached_evictions",
        "Items the memcached server reported evicted at the latest health check (counters may be lost)",
        ["server"],
        multiprocess_mode="mostrecent",
    )

T = TypeVar("T")

#: (backend, operation, outcome) -> (the counter child's inc, the histogram child's observe): labels
#: resolved once per process.
_step_children: dict[tuple[str, str, str], tuple[Callable[[], None], Callable[[float], None]]] = {}
_http_children: dict[tuple[str | None, int], Any] = {}


def measure(store: MeasuredStore, operation: str, key: str, step: Callable[..., T], *args: Any) -> T:
    """``step(key, *args)``, counted and timed as one ``operation`` of ``store``; its result or its
    exception, unchanged.

    ``operation`` must come from a fixed set (it is a label); ``key`` is never recorded as one.  A
    ``StoreUnavailable`` starts an outage of ``store`` (logged once), the next good step after
    ``RECOVERY_QUIET_SECONDS`` ends it (logged once); an ``Overflow`` is logged once per counter.
    """
    started = time.perf_counter()
    try:
        result = step(key, *args)
    except Exception as error:
        _failed(store, operation, key, error, time.perf_counter() - started)
        raise
    if ENABLED:
        _record(store.backend, operation, "ok", time.perf_counter() - started)
    if _outages:
        store_reachable(store)
    return result


def _record(backend: str, operation: str, outcome: str, seconds: float) -> None:
    children = _step_children.get((backend, operation, outcome))
    if children is None:
        children = _step_children.setdefault(
            (backend, operation, outcome),
            (
                STORE_OPERATIONS.labels(backend, operation, outcome).inc,
                STORE_SECONDS.labels(backend, operation).observe,
            ),
        )
    count, observe = children
    count()
    observe(seconds)


def _outcome(error: Exception) -> str:
    if isinstance(error, StoreUnavailable):
        return "unavailable"
    if isinstance(error, Overflow):
        return "overflow"
    if isinstance(error, Conflict):
        return "conflict"
    if isinstance(error, (CorruptCounter, CorruptValue)):
        return "corrupt"
    return "error"


def _failed(store: MeasuredStore, operation: str, key: str, error: Exception, seconds: float) -> None:
    if ENABLED:
        _record(store.backend, operation, _outcome(error), seconds)
    if isinstance(error, StoreUnavailable):
        store_unavailable(store, error)
        return
    if isinstance(error, Overflow):
        _overflowed(store, key, error)
    if _outages:
        store_reachable(store)  # the store answered, if with a refusal


def update_retried(backend: str) -> None:
    """One more attempt of a shared-value update after a lost optimistic race (a compare-and-set
    that failed because another process wrote first).  Cheap; never raises."""
    if ENABLED:
        UPDATE_RETRIES.labels(backend).inc()


def replica_wait_short(backend: str) -> None:
    """A store that waits for replicas after each step (``WAIT``, synchronous commit) got fewer
    acknowledgements than it asked for.  Cheap; never raises."""
    if ENABLED:
        REPLICA_WAITS_SHORT.labels(backend).inc()


def http_request(endpoint: str | None, status: int) -> None:
    """One HTTP request answered.  ``endpoint`` is the route's name (``None``: no route matched), so
    the label's values are bounded by the app's routes, whatever paths clients send."""
    if not ENABLED:
        return
    child = _http_children.get((endpoint, status))
    if child is None:
        child = _http_children.setdefault(
            (endpoint, status), HTTP_REQUESTS.labels(endpoint or "unmatched", str(status))
        )
    child.inc()


def exposition() -> tuple[bytes, str]:
    """The Prometheus text of every metric and its content type: all processes' values summed in
    multiprocess mode, else this process's.  Raises ``RuntimeError`` without prometheus_client."""
    if not ENABLED:
        raise RuntimeError("metrics need prometheus_client: pip install prometheus_client")
    if MULTIPROCESS_DIR:
        registry = prometheus_client.CollectorRegistry()
        # prometheus_client leaves its multiprocess functions unannotated
        multiprocess.MultiProcessCollector(registry, path=MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]
    else:
        registry = prometheus_client.REGISTRY
    return prometheus_client.generate_latest(registry), prometheus_client.CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Multiprocess bookkeeping for a worker that ended (gunicorn's ``child_exit``): its live gauges
    leave the scrape; its counters stay counted, so totals never go back."""
    if ENABLED and MULTIPROCESS_DIR:
        multiprocess.mark_process_dead(pid, MULTIPROCESS_DIR)  # type: ignore[no-untyped-call]  # unannotated


# -- operator events: once per event per process ---------------------------------------------------


def store_location(store: MeasuredStore) -> str:
    """The store's name and where it lives (``CounterStore.where``: never a password), for log lines."""
    return f"{store.backend} {store.where()}".rstrip()


class _Outage:
    __slots__ = ("began", "detail", "last_failure")

    def __init__(self, now: float, detail: str) -> None:
        self.began = now
        self.last_failure = now
        self.detail = detail


_events_lock = threading.Lock()
_outages: weakref.WeakKeyDictionary[MeasuredStore, _Outage] = weakref.WeakKeyDictionary()
_overflows_logged: weakref.WeakKeyDictionary[MeasuredStore, set[str]] = weakref.WeakKeyDictionary()
_evictions_seen: dict[str, int] = {}
_restarts_seen: dict[str, int] = {}


def store_unavailable(store: MeasuredStore, error: Exception) -> None:
    """``store`` failed a step: logged (ERROR) when this starts an outage in this process, silent while
    it lasts.  Also for failures outside ``measure`` (a server-side session on the store)."""
    now = time.monotonic()
    with _events_lock:
        outage = _outages.get(store)
        if outage is not None:
            outage.last_failure = now
            return
        _outages[store] = _Outage(now, str(error))
    log.error(
        "tally store unreachable: %s: %s (logged once; requests answer 503 until it is back)",
        store_location(store),
        error,
    )


def store_reachable(store: MeasuredStore) -> None:
    """``store`` answered a step: ends its outage (logged once, WARNING) when the last failure is at
    least ``RECOVERY_QUIET_SECONDS`` old."""
    now = time.monotonic()
    with _events_lock:
        outage = _outages.get(store)
        if outage is None or now - outage.last_failure < RECOVERY_QUIET_SECONDS:
            return
        del _outages[store]
    log.warning(
        "tally store recovered: %s answers again after %.1f s (first failure: %s)",
        store_location(store),
        now - outage.began,
        outage.detail,
    )


def _overflowed(store: MeasuredStore, key: str, error: Exception) -> None:
    # A per-client key holds the browser's id: never logged.
    shown = "a per-client counter" if key.startswith("@") else f"counter {key!r}"
    with _events_lock:
        logged = _overflows_logged.setdefault(store, set())
        if shown in logged or len(logged) >= OVERFLOW_LOG_LIMIT:
            return
        logged.add(shown)
    log.warning(
        "tally overflow: %s on %s: %s (logged once per counter and process)",
        shown,
        store_location(store),
        error,
    )


def memcached_restarted(address: str, uptime: int) -> None:
    """A health check found memcached ``address`` started after the app (its counters are gone); call
    once per start seen.  Logged (WARNING) and counted here."""
    with _events_lock:
        seen = _restarts_seen[address] = _restarts_seen.get(address, 0) + 1
    log.warning("memcached %s restarted (uptime %d s): the counters it held were lost", address, uptime)
    if ENABLED:
        MEMCACHED_RESTARTS.labels(address).set(seen)


def memcached_evictions(address: str, evictions: int) -> None:
    """memcached ``address`` reports ``evictions`` items evicted so far (a health check).  Logged
    (WARNING) when the number grew since this process last saw it, not at every check."""
    with _events_lock:
        before = _evictions_seen.get(address, 0)
        _evictions_seen[address] = evictions
    if evictions > before:
        log.warning(
            "memcached %s evicted %d more items (%d in all): counters may have been lost; run it with -M",
            address,
            evictions - before,
            evictions,
        )
    if ENABLED:
        MEMCACHED_EVICTIONS.labels(address).set(evictions)
