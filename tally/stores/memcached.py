"""Counters in memcached through pylibmc: one or many servers, shared by every app host.

memcached's ``incr``/``decr`` are atomic but unsigned: ``decr`` stops at 0 and ``incr`` wraps past
2**64-1.  Worse, memcached refuses to ``incr``/``decr`` a stored number of 2**63 or more whenever a
"-" byte happens to lie in the slab memory after the item (its ``safe_strtoull`` scans with
``strchr``), so such numbers fail at random, depending on earlier traffic.  Values are therefore
stored with an offset of 2**62, and the range is limited to +-4.6e18: every encoded value lies
between 1.1e16 and 2**63 - 1.1e16, so no step (at most 2**31-1 here, pylibmc's limit for ``incr``)
can clamp, wrap or reach 2**63, and a step that leaves the range is undone by the opposite step and
reported as ``Overflow``.  Larger steps go through ``gets``/``cas``.

Failed servers are never taken out of the ring (that would send their keys to another server, where
the counter would start again from 0): while a server is down its counters answer
``StoreUnavailable``, and after ``retry_timeout`` (1 s) the client tries it again.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pylibmc

from ..errors import Conflict, CorruptCounter, StoreUnavailable
from .base import VALUE_RETRIES, CounterStore, KeyLocks, pause_after_conflict

log = logging.getLogger(__name__)

OFFSET = 2**62
LIMIT = 4_600_000_000_000_000_000
#: pylibmc passes the step of incr/decr as a C int.
FAST_STEP_MAX = 2**31 - 1
#: memcached reads an expiry above 30 days as a unix timestamp, not a duration.
RELATIVE_EXPIRY_MAX = 30 * 24 * 3600
CAS_RETRIES = 50
#: Errors after which a probe tells a damaged value from a transport failure.
_AMBIGUOUS = (pylibmc.ClientError, pylibmc.ProtocolError, pylibmc.UnknownReadFailure)


def memcached_expiry(ttl: int | None) -> int:
    """memcached's exptime for a lifetime of ``ttl`` seconds (0: never expires)."""
    if not ttl:
        return 0
    return ttl if ttl <= RELATIVE_EXPIRY_MAX else int(time.time()) + ttl


class MemcachedCounterStore(CounterStore):
    """Atomic across every process and host sharing the servers; one round trip per step.

    Values live only in memcached's memory: a restart of a server, ``flush_all`` (Flask-Caching's
    ``cache.clear()`` on this backend), or an eviction loses the counters on that server (run memcached
    with ``-M`` so that it refuses writes rather than evict).  ``health`` reports each server's uptime
    and evictions, and flags (and logs once) a server that started after the app did.  An unreachable
    server raises ``StoreUnavailable`` within ``timeout`` seconds.
    """

    backend = "memcached"
    multi_process = True
    min_value = -LIMIT
    max_value = LIMIT

    def __init__(
        self,
        servers: list[str],
        *,
        key_prefix: str = "tally:",
        timeout: float = 0.5,
        pool_size: int = 16,
        binary: bool = False,
    ) -> None:
        self.servers = list(servers)
        self.key_prefix = key_prefix
        self.timeout = timeout
        timeout_ms = max(1, int(timeout * 1000))
        self._behaviors = {
            "tcp_nodelay": True,
            "ketama": True,
            "cas": True,
            "connect_timeout": timeout_ms,
            "_poll_timeout": timeout_ms,
            "retry_timeout": 1,
            "dead_timeout": 1,
        }
        self._binary = binary
        client = pylibmc.Client(self.servers, binary=binary, behaviors=self._behaviors)
        self._pool = pylibmc.ClientPool(client, pool_size)
        self._pool_size = pool_size
        self._built_at = time.time()
        self._logged_starts: dict[str, float] = {}
        self._update_locks = KeyLocks()

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    @contextmanager
    def _client(self) -> Iterator[Any]:
        """A client of the pool, waited for at most ``timeout`` s when all are in use (more threads
        than ``COUNTER_POOL_SIZE``): then ``StoreUnavailable``, never an error of the pool's own."""
        try:
            client = self._pool.get(timeout=self.timeout)
        except queue.Empty:
            raise StoreUnavailable(
                f"all {self._pool_size} memcached connections of this process stayed busy for"
                f" {self.timeout} s; raise COUNTER_POOL_SIZE to at least the gunicorn threads"
            ) from None
        try:
            yield client
        except pylibmc.NotFound:
            raise
        except pylibmc.Error as error:
            raise StoreUnavailable(f"memcached {', '.join(self.servers)}: {error}") from error
        finally:
            self._pool.put(client)

    def _decode(self, key: str, raw: Any) -> int:
        try:
            return int(raw) - OFFSET
        except (TypeError, ValueError):
            raise CorruptCounter(
                f"counter {key!r}: memcached holds {raw!r:.40}, not a Tally counter"
            ) from None

    @staticmethod
    def _encode(value: int) -> bytes:
        return str(value + OFFSET).encode()

    def _ambiguous_failure(self, client: Any, key: str, error: Exception) -> Exception:
        """A non-numeric value and a broken reply raise the same pylibmc errors: look at the value."""
        try:
            raw = client.get(self._key(key))
        except pylibmc.Error:
            return StoreUnavailable(f"memcached {', '.join(self.servers)}: {error}")
        if raw is not None:
            self._decode(key, raw)
        return StoreUnavailable(f"memcached {', '.join(self.servers)}: {error}")

    # -- the contract ------------------------------------------------------------------------------

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        if abs(delta) > FAST_STEP_MAX:
            return self._add_with_cas(key, delta, ttl)
        mkey = self._key(key)
        with self._client() as client:
            for _ in range(CAS_RETRIES):
                try:
                    raw = client.incr(mkey, delta) if delta > 0 else client.decr(mkey, -delta)
                except pylibmc.NotFound:
                    initial = self.check_range(delta)
                    if client.add(mkey, self._encode(initial), memcached_expiry(ttl)):
                        return initial
                    continue  # another client created it first: step again
                except _AMBIGUOUS as error:
                    raise self._ambiguous_failure(client, key, error) from error
                value = raw - OFFSET
                if not self.min_value <= value <= self.max_value:
                    if delta > 0:
                        client.decr(mkey, delta)
                    else:
                        client.incr(mkey, -delta)
                    self.check_range(value)
                if ttl:
                    client.touch(mkey, memcached_expiry(ttl))
                return value
        raise Conflict(f"counter {key!r} kept disappearing while being created")

    def _add_with_cas(self, key: str, delta: int, ttl: int | None) -> int:
        mkey = self._key(key)
        with self._client() as client:
            for _ in range(CAS_RETRIES):
                raw, cas_id = client.gets(mkey)
                if raw is None:
                    new = self.check_range(delta)
                    if client.add(mkey, self._encode(new), memcached_expiry(ttl)):
                        return new
                    continue
                new = self.check_range(self._decode(key, raw) + delta)
                if client.cas(mkey, self._encode(new), cas_id, memcached_expiry(ttl)):
                    return new
        raise Conflict(f"counter {key!r} changed under {CAS_RETRIES} attempts to add {delta}")

    def get(self, key: str, ttl: int | None = None) -> int:
        mkey = self._key(key)
        with self._client() as client:
            raw = client.get(mkey)
            if ttl and raw is not None:
                client.touch(mkey, memcached_expiry(ttl))
        return 0 if raw is None else self._decode(key, raw)

    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        self.check_range(value)
        with self._client() as client:
            if not client.set(self._key(key), self._encode(value), memcached_expiry(ttl)):
                raise StoreUnavailable(f"memcached refused to store counter {key!r}")

    def delete(self, key: str) -> bool:
        with self._client() as client:
            return bool(client.delete(self._key(key)))

    # -- shared values: gets/cas -------------------------------------------------------------------

    def _value_key(self, key: str) -> str:
        return f"{self.key_prefix}={key}"  # "=" starts no counter name: a namespace of its own

    def get_value(self, key: str) -> bytes | None:
        with self._client() as client:
            return client.get(self._value_key(key))

    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        with self._client() as client:
            if not client.set(self._value_key(key), data, memcached_expiry(ttl)):
                raise StoreUnavailable(f"memcached refused to store shared value {key!r}")

    def delete_value(self, key: str) -> bool:
        with self._client() as client:
            return bool(client.delete(self._value_key(key)))

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        """``gets``, ``change``, then ``cas`` (or ``add`` for a new key), retried on conflict."""
        mkey = self._value_key(key)
        with self._update_locks(key), self._client() as client:
            for attempt in range(VALUE_RETRIES):
                current, cas_id = client.gets(mkey)
                data = change(current)
                if current is None:
                    stored = client.add(mkey, data, memcached_expiry(ttl))
                else:
                    stored = client.cas(mkey, data, cas_id, memcached_expiry(ttl))
                if stored:
                    return data
                pause_after_conflict(attempt)
        raise Conflict(f"shared value {key!r} changed under {VALUE_RETRIES} attempts to update it")

    def health(self) -> dict[str, Any]:
        servers = []
        for address in self.servers:
            servers.append(self._server_health(address))
        if not all(server["reachable"] for server in servers):
            down = ", ".join(s["address"] for s in servers if not s["reachable"])
            raise StoreUnavailable(f"memcached server(s) unreachable: {down}")
        return {"servers": servers}

    def _server_health(self, address: str) -> dict[str, Any]:
        probe = pylibmc.Client([address], binary=self._binary, behaviors=self._behaviors)
        try:
            ((_, stats),) = probe.get_stats()
        except (pylibmc.Error, ValueError) as error:
            return {"address": address, "reachable": False, "detail": str(error)}
        finally:
            probe.disconnect_all()
        uptime = int(stats["uptime"])
        evictions = int(stats["evictions"])
        started = time.time() - uptime
        report = {"address": address, "reachable": True, "uptime": uptime, "evictions": evictions}
        # Started after this store was built (in gunicorn's master, so for every worker alike): what
        # the server held before is gone.  2 s of slack for memcached's one-second clock.
        if started > self._built_at + 2:
            report["restarted"] = True
            report["warning"] = (
                f"started {round(time.time() - started)} s ago, after this app: the counters it held"
                " before were lost"
            )
            previous = self._logged_starts.get(address)
            if previous is None or abs(started - previous) > 2:
                self._logged_starts[address] = started
                log.warning(
                    "memcached %s restarted (uptime %d s): the counters it held were lost", address, uptime
                )
        if evictions:
            report["warning"] = "memcached evicted items: counters may have been lost; run it with -M"
            log.warning("memcached %s has evicted %d items: counters may have been lost", address, evictions)
        return report

    def close(self) -> None:
        idle = []
        with contextlib.suppress(queue.Empty):
            while True:
                idle.append(self._pool.get_nowait())
        for client in idle:
            client.disconnect_all()
            self._pool.put(client)
