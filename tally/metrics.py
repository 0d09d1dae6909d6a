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

Steps and requests are counted here, not by prometheus_client's objects, at a quarter of their cost:
floats under one lock, in multiprocess mode written through at once to files of this process in its
format (``counter_tally_<pid>.db``...): a scrape sees every step that returned, a killed worker's stay.

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
from bisect import bisect_left
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
    from prometheus_client.metrics_core import Metric
    from prometheus_client.mmap_dict import MmapedDict, mmap_key
    from prometheus_client.utils import floatToGoString

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
    UPDATE_RETRIES = prometheus_client.Counter(
        "tally_store_update_retries_total",
        "Shared-value updates run again after losing a compare-and-set race (memcached, Redis, manager)",
        ["backend"],
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


class _Series:
    """A counter's label set (values: [total]) or a histogram's ([sum, *buckets]), and their file keys."""

    __slots__ = ("kind", "values", "keys", "created", "file")

    def __init__(self, kind: str, keys: list[str]) -> None:
        self.kind = kind
        self.keys = keys
        self.values = [0.0] * len(keys)
        self.created = time.time()
        self.file: Any = None  # this process's file, once this series is in it


class _Family:
    """What prometheus_client's ``Counter`` or ``Histogram`` of this name and labels would keep."""

    def __init__(self, kind: str, name: str, documentation: str, labelnames: tuple[str, ...]) -> None:
        self.kind = kind  # "counter" or "histogram": the metric's type, and its files' prefix
        self.name = name.removesuffix("_total")  # as prometheus_client names a counter
        self.documentation = documentation
        self.labelnames = labelnames
        self.series: dict[tuple[str, ...], _Series] = {}

    def child(self, *labelvalues: str) -> _Series:
        with _lock:
            if labelvalues not in self.series:
                self.series[labelvalues] = _Series(self.kind, self._keys(labelvalues))
            return self.series[labelvalues]

    def _keys(self, labelvalues: tuple[str, ...]) -> list[str]:
        """The series' keys in the files, as prometheus_client's values of this metric write them."""

        def key(sample: str, names: tuple[str, ...], values: tuple[str, ...]) -> str:
            return mmap_key(self.name, self.name + sample, list(names), list(values), self.documentation)

        if self.kind == "counter":
            return [key("_total", self.labelnames, labelvalues)]
        names = (*self.labelnames, "le")
        return [key("_sum", self.labelnames, labelvalues)] + [
            key("_bucket", names, (*labelvalues, le)) for le in _LE
        ]

    def collect(self) -> Metric:
        """This process's samples, as prometheus_client's ``Counter`` or ``Histogram`` gives them."""
        metric = Metric(self.name, self.documentation, self.kind)
        created = getattr(prometheus_client.metrics, "_use_created", True)  # see disable_created_metrics
        with _lock:
            snapshot = [(labels, list(s.values), s.created) for labels, s in self.series.items()]
        for labelvalues, values, since in snapshot:
            labels = dict(zip(self.labelnames, labelvalues, strict=True))
            if self.kind == "counter":
                metric.add_sample(self.name + "_total", labels, values[0])
            else:
                count = 0.0
                for le, in_bucket in zip(_LE, values[1:], strict=True):
                    count += in_bucket
                    metric.add_sample(self.name + "_bucket", {**labels, "le": le}, count)
                metric.add_sample(self.name + "_count", labels, count)
                metric.add_sample(self.name + "_sum", labels, values[0])
            if created:
                metric.add_sample(self.name + "_created", labels, since)
        return metric


def _write(series: _Series, index: int) -> None:
    """``series.values[index]`` into this process's file (``_lock`` held); first all of them (buckets)."""
    file = series.file
    if file is not None:
        file.write_value(series.keys[index], series.values[index], 0.0)
        return
    file = _files.get(series.kind)
    if file is None:
        path = os.path.join(str(MULTIPROCESS_DIR), f"{series.kind}_tally_{os.getpid()}.db")
        file = _files[series.kind] = MmapedDict(path)  # type: ignore[no-untyped-call]
    for key, value in zip(series.keys, series.values, strict=True):
        file.write_value(key, value, 0.0)
    series.file = file


class _Step:
    """The count and the duration one ``(backend, operation, outcome)`` step records."""

    __slots__ = ("count", "timing")

    def __init__(self, backend: str, operation: str, outcome: str) -> None:
        self.count = _STORE_OPERATIONS.child(backend, operation, outcome)
        self.timing = _STORE_SECONDS.child(backend, operation)

    def record(self, seconds: float) -> None:
        first = seconds <= _FIRST_BOUND  # a local store's steps: no search (+Inf is the last bucket)
        bucket = 1 if first else bisect_left(LATENCY_BUCKETS, seconds) + 1
        _lock.acquire()  # not ``with``: under half its cost here, on every step
        try:
            self.count.values[0] += 1.0
            self.timing.values[0] += seconds
            self.timing.values[bucket] += 1.0
            if MULTIPROCESS_DIR:
                _write(self.count, 0)
                _write(self.timing, 0)
                _write(self.timing, bucket)
        finally:
            _lock.release()


def _forget_inherited_values() -> None:
    """A forked child's own lock (the parent's may be held) and, multiprocess, values from 0 in its files."""
    global _lock
    _lock = threading.Lock()
    if MULTIPROCESS_DIR:
        for file in _files.values():
            file.close()
        _files.clear()
        for family in _families:
            for series in family.series.values():
                series.values[:] = [0.0] * len(series.values)  # in place: closures may hold the list
                series.file = None


_lock = threading.Lock()
_files: dict[str, Any] = {}  # "counter", "histogram" -> this process's MmapedDict, once written
_steps: dict[tuple[str, str, str], _Step] = {}
_http: dict[tuple[str | None, int], _Series] = {}
_families: list[_Family] = []
if ENABLED:
    #: Every bucket's ``le`` label, +Inf last, as prometheus_client writes them.
    _LE = [floatToGoString(b) for b in (*LATENCY_BUCKETS, float("inf"))]  # type: ignore[no-untyped-call]
    _STORE_OPERATIONS = _Family(
        "counter",
        "tally_store_operations_total",
        "Tally store steps by backend, operation and outcome"
        " (ok, overflow, unavailable, conflict, corrupt, error)",
        ("backend", "operation", "outcome"),
    )
    _STORE_SECONDS = _Family(
        "histogram",
        "tally_store_operation_seconds",
        "Duration of Tally store steps, whatever their outcome",
        ("backend", "operation"),
    )
    _HTTP_REQUESTS = _Family(
        "counter",
        "tally_http_requests_total",
        "HTTP requests answered, by endpoint (the route's name, never the path) and status",
        ("endpoint", "status"),
    )
    _families += [_STORE_OPERATIONS, _STORE_SECONDS, _HTTP_REQUESTS]

    class _Collector:
        """Tally's families in prometheus_client's registry: this process's values."""

        def collect(self) -> list[Metric]:
            return [family.collect() for family in _families]

    prometheus_client.REGISTRY.register(_Collector())
    os.register_at_fork(after_in_child=_forget_inherited_values)


_NO_ARG: Any = object()
_FIRST_BOUND = LATENCY_BUCKETS[0]


def _step(backend: str, operation: str, outcome: str) -> _Step:
    labels = (backend, operation, outcome)
    return _steps.get(labels) or _steps.setdefault(labels, _Step(*labels))


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
        seconds = time.perf_counter() - started
        _step(store.backend, operation, "ok").record(seconds)
    if _in_outage:
        store_reachable(store)
    return result


def measured(store: MeasuredStore, operation: str, step: Callable[..., T]) -> Callable[..., T]:
    """``step`` as ``measure`` runs it, for the steps of every request: ``measured(store, operation,
    step)(key[, arg])`` is ``measure(store, operation, key, step[, arg])``, its labels looked up once."""
    perf_counter = time.perf_counter
    ok: _Step | None = None

    def run(key: str, arg: Any = _NO_ARG) -> T:
        nonlocal ok
        started = perf_counter()
        try:
            result = step(key) if arg is _NO_ARG else step(key, arg)
        except Exception as error:
            _failed(store, operation, key, error, perf_counter() - started)
            raise
        if ENABLED:
            seconds = perf_counter() - started
            if ok is None:
                ok = _step(store.backend, operation, "ok")
            ok.record(seconds)
        if _in_outage:
            store_reachable(store)
        return result

    return run


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
        _step(store.backend, operation, _outcome(error)).record(seconds)
    if isinstance(error, StoreUnavailable):
        store_unavailable(store, error)
        return
    if isinstance(error, Overflow):
        _overflowed(store, key, error)
    if _in_outage:
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
    series = _http.get((endpoint, status))
    if series is None:  # child() gives every thread the same series
        series = _http[endpoint, status] = _HTTP_REQUESTS.child(endpoint or "unmatched", str(status))
    _lock.acquire()
    try:
        series.values[0] += 1.0
        if MULTIPROCESS_DIR:
            _write(series, 0)
    finally:
        _lock.release()


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
#: Whether ``_outages`` may hold a store: what each step reads (a flag, not the dict's Python-level len).
_in_outage = False
_overflows_logged: weakref.WeakKeyDictionary[MeasuredStore, set[str]] = weakref.WeakKeyDictionary()
_evictions_seen: dict[str, int] = {}
_restarts_seen: dict[str, int] = {}


def store_unavailable(store: MeasuredStore, error: Exception) -> None:
    """``store`` failed a step: logged (ERROR) when this starts an outage in this process, silent while
    it lasts.  Also for failures outside ``measure`` (a server-side session on the store)."""
    global _in_outage
    now = time.monotonic()
    with _events_lock:
        outage = _outages.get(store)
        if outage is not None:
            outage.last_failure = now
            return
        _outages[store] = _Outage(now, str(error))
        _in_outage = True
    log.error(
        "tally store unreachable: %s: %s (logged once; requests answer 503 until it is back)",
        store_location(store),
        error,
    )


def store_reachable(store: MeasuredStore) -> None:
    """``store`` answered a step: ends its outage (logged once, WARNING) when the last failure is at
    least ``RECOVERY_QUIET_SECONDS`` old."""
    global _in_outage
    now = time.monotonic()
    with _events_lock:
        outage = _outages.get(store)
        if outage is None or now - outage.last_failure < RECOVERY_QUIET_SECONDS:
            _in_outage = bool(_outages)  # False once the only stores in an outage are gone
            return
        del _outages[store]
        _in_outage = bool(_outages)
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
