"""Counters in memcached: one or many servers, shared by every app host.

memcached's ``incr``/``decr`` are atomic but unsigned: ``decr`` stops at 0 and ``incr`` wraps past
2**64-1.  Worse, memcached refuses to ``incr``/``decr`` a stored number of 2**63 or more whenever a
"-" byte happens to lie in the slab memory after the item (its ``safe_strtoull`` scans with
``strchr``), so such numbers fail at random, depending on earlier traffic.  Values are therefore
stored with an offset of 2**62, and the range is limited to +-4.6e18: every encoded value lies
between 1.1e16 and 2**63 - 1.1e16, so no ``incr``/``decr`` step (at most 2**31-1, far inside that
margin) can clamp, wrap or reach 2**63, and a step that leaves the range is undone by the opposite
step and reported as ``Overflow``.  Larger steps go through ``gets``/``cas``.

The client is ``memcached_client`` (pure Python, a deadline per command, a connection dropped after
any failure); its docstring says why not pylibmc.  A server that is down is never taken out of the
hashing (that would send its keys to another server, where the counter would start again from 0):
while it is down its counters answer ``StoreUnavailable``, each command within ``timeout`` seconds.
"""

from __future__ import annotations

import math
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from pymemcache.exceptions import MemcacheClientError, MemcacheError, MemcacheServerError

from .. import metrics
from ..errors import Conflict, CorruptCounter, StoreRefused, StoreUnavailable
from .base import VALUE_RETRIES, CounterStore, KeyLocks, SessionStorage, counter_name, pause_after_conflict
from .memcached_client import Connection, PoolExhausted, ServerConnections, parse_address, server_for

OFFSET = 2**62
LIMIT = 4_600_000_000_000_000_000
#: Steps up to this size go through incr/decr; the encoding's margin (1.1e16) is far larger.
FAST_STEP_MAX = 2**31 - 1
#: memcached reads an expiry above 30 days as a unix timestamp, not a duration.
RELATIVE_EXPIRY_MAX = 30 * 24 * 3600
CAS_RETRIES = 50
#: The command that lists a server's keys (url-encoded, one ``key=... exp=... ...`` line each).
#: The key dump: ``hash`` walks the hash table, ``all`` the LRU lists, where an item read just before
#: (bumped to another segment by the LRU maintainer while the crawler runs) can be skipped: measured
#: here, 3 dumps of 6 missed a counter right after reads with ``all``, none of 8 with ``hash``.  A
#: server that does not know ``hash`` gets ``all``.
METADUMP = b"lru_crawler metadump hash\r\n"
METADUMP_LRU = b"lru_crawler metadump all\r\n"
#: memcached runs one crawler at a time and answers BUSY meanwhile: wait this long, then ask again.
CRAWLER_BUSY_PAUSE = 0.01


#: memcached's clock ticks once a second, and an item may be dropped up to a second before its
#: exptime counted from the moment it was stored (measured: 0.08-0.96 s early for a 1 s lifetime).
CLOCK_MARGIN = 1


def memcached_expiry(ttl: float | None) -> int:
    """memcached's exptime for data that must live at least ``ttl`` seconds, whatever the phase of
    the server's clock (0 or ``None``: never expires)."""
    if not ttl:
        return 0
    lifetime = math.ceil(ttl) + CLOCK_MARGIN
    return lifetime if lifetime <= RELATIVE_EXPIRY_MAX else int(time.time()) + lifetime


class MemcachedCounterStore(CounterStore, SessionStorage):
    """Atomic across every process and host sharing the servers; one round trip per step.

    Values live only in memcached's memory: a restart of a server, ``flush_all`` (Flask-Caching's
    ``cache.clear()`` on this backend), or an eviction loses the counters on that server (run memcached
    with ``-M`` so that it refuses writes rather than evict).  ``health`` reports each server's uptime
    and evictions, and flags (and logs once) a server that started after the app did.  Every command
    to a server finishes or fails within ``timeout`` seconds; an unreachable server raises
    ``StoreUnavailable``.
    """

    backend = "memcached"
    cache_types = ("MemcachedCache",)
    multi_process = True
    combines_adds = True  # a step is a round trip: concurrent ones may share it (tally.combining)
    optimistic_updates = True  # gets, then cas
    shares_cache_keyspace = True
    session_protocol = "memcached"
    min_value = -LIMIT
    max_value = LIMIT

    def __init__(
        self,
        servers: list[str],
        *,
        key_prefix: str = "tally:",
        timeout: float = 0.5,
        pool_size: int = 16,
    ) -> None:
        self.servers = list(servers)
        self.key_prefix = key_prefix
        self.timeout = timeout
        self._pool_size = pool_size
        self._no_hash_dump: set[str] = set()  # servers that refused ``metadump hash``
        self._connections = {
            address: ServerConnections(address, pool_size, timeout) for address in self.servers
        }
        self._built_at = time.time()
        self._logged_starts: dict[str, float] = {}
        self._update_locks = KeyLocks()

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], instance_path: str) -> MemcachedCounterStore:
        return cls(
            settings["CACHE_MEMCACHED_SERVERS"],
            key_prefix=settings["COUNTER_KEY_PREFIX"],
            timeout=settings["COUNTER_TIMEOUT"],
            pool_size=settings["COUNTER_POOL_SIZE"],
        )

    def where(self) -> str:
        return ", ".join(self.servers)

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    @contextmanager
    def _client(self, mkey: str) -> Iterator[Connection]:
        """A connection to the server of ``mkey``, waited for at most ``timeout`` s when all are in use
        (more threads than ``COUNTER_POOL_SIZE``); every failure to talk to the server, and that wait
        running out, is ``StoreUnavailable``."""
        address = server_for(mkey, self.servers)
        connections = self._connections[address]
        try:
            client = connections.take(self.timeout)
            try:
                yield client
            finally:
                connections.give(client)
        except PoolExhausted:
            raise StoreUnavailable(
                f"all {self._pool_size} memcached connections of this process stayed busy for"
                f" {self.timeout} s; raise COUNTER_POOL_SIZE to at least the gunicorn threads"
            ) from None
        except (MemcacheError, OSError) as error:
            if type(error) is MemcacheServerError:  # a SERVER_ERROR reply: up, but it would not keep it
                raise StoreRefused(f"memcached {address} refused the write: {error}") from error
            raise StoreUnavailable(f"memcached {address}: {type(error).__name__}: {error}") from error

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

    def _step(self, client: Connection, key: str, mkey: str, delta: int) -> int | None:
        """``incr``/``decr`` by ``delta``: the new encoded value, ``None`` for a missing key.  memcached
        answers CLIENT_ERROR for a value that is not a number: that is a damaged counter."""
        try:
            value: int | None = (
                client.call("incr", mkey, delta) if delta > 0 else client.call("decr", mkey, -delta)
            )
            return value
        except MemcacheClientError:
            raw = client.call("get", mkey)
            if raw is not None:
                self._decode(key, raw)
            raise

    # -- the contract ------------------------------------------------------------------------------

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        if abs(delta) > FAST_STEP_MAX:
            return self._add_with_cas(key, delta, ttl)
        mkey = self._key(key)
        with self._client(mkey) as client:
            for _ in range(CAS_RETRIES):
                raw = self._step(client, key, mkey, delta)
                if raw is None:
                    initial = self.check_range(delta)
                    if client.call("add", mkey, self._encode(initial), memcached_expiry(ttl)):
                        return initial
                    continue  # another client created it first: step again
                value = raw - OFFSET
                if not self.min_value <= value <= self.max_value:
                    self._step(client, key, mkey, -delta)
                    self.check_range(value)
                if ttl:
                    client.call("touch", mkey, memcached_expiry(ttl))
                return value
        raise Conflict(f"counter {key!r} kept disappearing while being created")

    def _add_with_cas(self, key: str, delta: int, ttl: int | None) -> int:
        mkey = self._key(key)
        with self._client(mkey) as client:
            for _ in range(CAS_RETRIES):
                raw, cas_id = client.call("gets", mkey)
                if raw is None:
                    new = self.check_range(delta)
                    if client.call("add", mkey, self._encode(new), memcached_expiry(ttl)):
                        return new
                    continue
                new = self.check_range(self._decode(key, raw) + delta)
                if client.call("cas", mkey, self._encode(new), cas_id, memcached_expiry(ttl)):
                    return new
        raise Conflict(f"counter {key!r} changed under {CAS_RETRIES} attempts to add {delta}")

    def get(self, key: str, ttl: int | None = None) -> int:
        mkey = self._key(key)
        with self._client(mkey) as client:
            raw = client.call("get", mkey)
            if ttl and raw is not None:
                client.call("touch", mkey, memcached_expiry(ttl))
        return 0 if raw is None else self._decode(key, raw)

    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        self.check_range(value)
        mkey = self._key(key)
        with self._client(mkey) as client:
            if not client.call("set", mkey, self._encode(value), memcached_expiry(ttl)):
                raise StoreUnavailable(f"memcached refused to store counter {key!r}")

    def delete(self, key: str) -> bool:
        mkey = self._key(key)
        with self._client(mkey) as client:
            return bool(client.call("delete", mkey))

    # -- shared values: gets/cas -------------------------------------------------------------------

    def _value_key(self, key: str) -> str:
        return f"{self.key_prefix}={key}"  # "=" starts no counter name: a namespace of its own

    def get_value(self, key: str) -> bytes | None:
        mkey = self._value_key(key)
        with self._client(mkey) as client:
            data: bytes | None = client.call("get", mkey)
            return data

    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        mkey = self._value_key(key)
        with self._client(mkey) as client:
            if not client.call("set", mkey, data, memcached_expiry(ttl)):
                raise StoreUnavailable(f"memcached refused to store shared value {key!r}")

    def delete_value(self, key: str) -> bool:
        mkey = self._value_key(key)
        with self._client(mkey) as client:
            return bool(client.call("delete", mkey))

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        """``gets``, ``change``, then ``cas`` (or ``add`` for a new key), retried on conflict."""
        mkey = self._value_key(key)
        with self._update_locks(key), self._client(mkey) as client:
            for attempt in range(VALUE_RETRIES):
                current, cas_id = client.call("gets", mkey)
                data = change(current)
                if current is None:
                    stored = client.call("add", mkey, data, memcached_expiry(ttl))
                else:
                    stored = client.call("cas", mkey, data, cas_id, memcached_expiry(ttl))
                if stored:
                    return data
                metrics.update_retried(self.backend)
                pause_after_conflict(attempt)
        raise Conflict(f"shared value {key!r} changed under {VALUE_RETRIES} attempts to update it")

    def names(self, limit: int) -> list[str]:
        """``lru_crawler metadump all`` on each server in turn, over a plain socket of its own (not a
        pooled connection: the dump is a stream, and closing it early is how enumeration stops once
        ``limit`` names are found, the list then possibly partial).

        Keys are url-decoded and kept when they start with ``key_prefix`` and the rest is a counter
        name (shared values, ``<prefix>=<name>``, and per-client keys, ``<prefix>@...``, are not).
        Each server's dump, connect included, must finish by a deadline ``timeout`` seconds after it
        starts (every socket wait is capped by what is left of it, as for every other command); a
        server that is unreachable, answers an error, or does not finish by then raises
        ``StoreUnavailable``, never a partial list.  memcached runs one crawler at a time: while
        another client's dump runs it answers BUSY, and the request is repeated until the deadline.
        Every item of the server is dumped, whatever its prefix (measured here: 400,000 items in
        0.22 s), so a server holding more than about ``timeout`` x 10^6 items cannot be listed in time.
        """
        found: dict[str, None] = {}
        for address in self.servers:
            if len(found) >= limit:
                break
            self._dump_names(address, limit, found)
        return list(found)

    def _dump_names(self, address: str, limit: int, found: dict[str, None]) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while not self._dump_once(address, deadline, limit, found):
                time.sleep(min(CRAWLER_BUSY_PAUSE, self._left(deadline)))  # BUSY: ask again shortly
        except (OSError, UnicodeDecodeError) as error:
            raise StoreUnavailable(f"memcached {address}: {type(error).__name__}: {error}") from error

    def _left(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the key dump did not finish within {self.timeout} s")
        return remaining

    def _dump_once(self, address: str, deadline: float, limit: int, found: dict[str, None]) -> bool:
        """One ``metadump`` into ``found``: ``True`` when it ended (END, or ``limit`` reached),
        ``False`` when the crawler was busy with another client's dump."""
        with socket.create_connection(parse_address(address), timeout=self._left(deadline)) as sock:
            sock.settimeout(self._left(deadline))
            sock.sendall(METADUMP_LRU if address in self._no_hash_dump else METADUMP)
            # memcached escapes keys as urllib's quote does (all but A-Z a-z 0-9 - . _ ~ as %XX): lines
            # of other prefixes are skipped by this byte comparison, without decoding them.
            ours = b"key=" + urllib.parse.quote(self.key_prefix, safe="").encode("ascii")
            pending = b""
            while True:
                sock.settimeout(self._left(deadline))
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("memcached closed the connection during the key dump")
                *lines, pending = (pending + chunk).split(b"\n")  # key lines end in \n, END in \r\n
                for line in lines:
                    if line.startswith(ours):
                        name = self._dumped_name(line)
                        if name is not None:
                            found[name] = None
                            if len(found) >= limit:
                                return True  # closing the socket ends the dump
                    elif line.startswith(b"key="):
                        continue
                    elif line == b"END\r":
                        return True
                    elif line.startswith(b"BUSY"):
                        return False
                    elif (
                        line.startswith((b"BADCLASS", b"CLIENT_ERROR", b"ERROR"))
                        and address not in self._no_hash_dump
                    ):
                        self._no_hash_dump.add(address)  # an older memcached: its LRU dump instead
                        return False
                    else:
                        raise ConnectionError(f"memcached answered {line[:100]!r} to the key dump")

    def _dumped_name(self, line: bytes) -> str | None:
        """The counter name in a metadump line ``key=<url-encoded key> exp=...``, or ``None``."""
        key = urllib.parse.unquote(line[4:].split(b" ", 1)[0].decode("ascii"))
        if not key.startswith(self.key_prefix):
            return None
        return counter_name(key[len(self.key_prefix) :])

    # -- server-side sessions: whole keys on their one server (never moved off a server that is down,
    # where the session would not be found and the browser would seem new) --------------------------

    def session_get(self, key: str) -> bytes | None:
        with self._client(key) as client:
            data: bytes | None = client.call("get", key)
            return data

    def session_set(self, key: str, data: bytes, ttl: int) -> None:
        if ttl > RELATIVE_EXPIRY_MAX:  # Flask-Session gives a lifetime over 30 days as a unix time
            ttl = max(1, ttl - int(time.time()))
        with self._client(key) as client:
            if not client.call("set", key, data, memcached_expiry(ttl)):
                raise StoreUnavailable(f"memcached refused to store session {key!r}")

    def session_delete(self, key: str) -> bool:
        with self._client(key) as client:
            return bool(client.call("delete", key))

    def health(self) -> dict[str, Any]:
        servers = []
        for address in self.servers:
            servers.append(self._server_health(address))
        if not all(server["reachable"] for server in servers):
            down = ", ".join(s["address"] for s in servers if not s["reachable"])
            raise StoreUnavailable(f"memcached server(s) unreachable: {down}")
        return {"servers": servers}

    def _server_health(self, address: str) -> dict[str, Any]:
        probe = Connection(address, self.timeout)
        try:
            stats = probe.call("stats")
        except (MemcacheError, OSError) as error:
            return {"address": address, "reachable": False, "detail": f"{type(error).__name__}: {error}"}
        finally:
            probe.close()
        stats = {name.decode(): value for name, value in stats.items()}
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
                metrics.memcached_restarted(address, uptime)  # logged and counted once per start
        if evictions:
            report["warning"] = "memcached evicted items: counters may have been lost; run it with -M"
        metrics.memcached_evictions(address, evictions)  # logged when the number grows
        return report

    def close(self) -> None:
        for connections in self._connections.values():
            connections.close()
