"""Counters in Redis through redis-py: ``INCRBY``, one round trip, atomic on the server.

One class holds every Redis mechanism; the Sentinel and Cluster stores (``redis_sentinel.py``,
``redis_cluster.py``) only say how to reach the primary that holds a key.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisClusterException
from redis.retry import Retry

from .. import metrics
from ..errors import (
    Conflict,
    CorruptCounter,
    Overflow,
    ReplicationUnconfirmed,
    StoreRefused,
    StoreUnavailable,
)
from .base import (
    VALUE_RETRIES,
    CounterStore,
    KeyLocks,
    SessionStorage,
    WindowSupport,
    counter_name,
    pause_after_conflict,
)

#: Keys Redis looks at per ``SCAN`` call while enumerating counter names (a hint, not a bound).
SCAN_COUNT = 1000

#: A per-client counter's step and its new lifetime, as one atomic step on one key.
ADD_WITH_LIFETIME = (
    "local value = redis.call('INCRBY', KEYS[1], ARGV[1]) redis.call('EXPIRE', KEYS[1], ARGV[2]) return value"
)
#: A fixed window's step: add, and give the key its lifetime (ARGV[2], ms) only when it has none, that
#: is when this step created it; returns the value and the milliseconds left.
ADD_IN_WINDOW = (
    "local value = redis.call('INCRBY', KEYS[1], ARGV[1]) local left = redis.call('PTTL', KEYS[1])"
    " if left < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) left = tonumber(ARGV[2]) end"
    " return {value, left}"
)
#: A fixed window's read: the value and the milliseconds left, or nil.
READ_WINDOW = (
    "local value = redis.call('GET', KEYS[1]) if not value then return false end"
    " return {value, redis.call('PTTL', KEYS[1])}"
)
#: A per-client counter's read, renewing the lifetime of a live key.
GET_AND_RENEW = (
    "local value = redis.call('GET', KEYS[1])"
    " if value then redis.call('EXPIRE', KEYS[1], ARGV[1]) end return value"
)
#: Compare-and-set of a shared value: write ARGV[3] only if the key still holds ARGV[2] (ARGV[1] = "1")
#: or is still missing (ARGV[1] = "0"); ARGV[4] is a lifetime in seconds, "0" for none.
COMPARE_AND_SET = """
local current = redis.call('GET', KEYS[1])
if ARGV[1] == '1' then
  if current ~= ARGV[2] then return 0 end
elseif current then
  return 0
end
if ARGV[4] ~= '0' then redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
else redis.call('SET', KEYS[1], ARGV[3]) end
return 1
"""

T = TypeVar("T")
#: How late Redis may answer a WAIT whose timeout has passed (its timer runs every 100 ms by default).
WAIT_LATENESS_MS = 100


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``MATCH`` pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


def no_retries() -> Retry:
    """redis-py retries a failed command by default; a re-sent ``INCRBY`` whose first reply was lost
    would count twice, so Tally's clients never retry."""
    return Retry(NoBackoff(), 0)


class RedisCounterStore(CounterStore, SessionStorage, WindowSupport):
    """Atomic across every process and host using the server; Redis checks int64 overflow itself.

    Commands are never retried by the client: a retried ``INCRBY`` whose first reply was lost would
    count twice.  A connection or timeout error raises ``StoreUnavailable`` within ``timeout`` seconds
    (the step may or may not have been applied; no value is guessed), and the next call reconnects.
    Every read and write goes to the primary; replicas are never read.

    ``min_replicas`` (``COUNTER_MIN_REPLICAS``): every write (counter step, set, delete, shared value)
    is followed, on the same connection and in the same round trip, by ``WAIT min_replicas``.  When
    fewer replicas confirm within the timeout, ``ReplicationUnconfirmed`` (a 503, "outcome unknown")
    is raised and the result is never returned: a number handed out has reached that many replicas,
    so a failover that promotes one of them does not hand it out again.  ``WAIT`` does not make Redis
    strongly consistent: under a network partition an acknowledged write can still be lost.

    Durability is the server's: with AOF (``appendonly yes``) counters survive a Redis restart.
    """

    backend = "redis"
    cache_types = ("RedisCache",)
    multi_process = True
    combines_adds = True  # a step is a round trip: concurrent ones may share it (tally.combining)
    optimistic_updates = True  # a compare-and-set script on the bytes read
    waits_for_replicas = True
    shares_cache_keyspace = True
    session_protocol = "redis"

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], instance_path: str) -> RedisCounterStore:
        return cls(
            settings["CACHE_REDIS_URL"],
            key_prefix=settings["COUNTER_KEY_PREFIX"],
            timeout=settings["COUNTER_TIMEOUT"],
            pool_size=settings["COUNTER_POOL_SIZE"],
            min_replicas=settings["COUNTER_MIN_REPLICAS"],
        )

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "tally:",
        timeout: float = 0.5,
        pool_size: int = 16,
        min_replicas: int = 0,
    ) -> None:
        self.url = url
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=no_retries(),
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._set_up(key_prefix, timeout, min_replicas)

    def _set_up(self, key_prefix: str, timeout: float, min_replicas: int) -> None:
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.min_replicas = min_replicas
        # WAIT's own timeout, well inside the socket timeout, so that a short count is an answer and not
        # a timeout of the connection: Redis checks blocked clients' timeouts on its 100 ms timer (hz 10),
        # so WAIT answers up to ~100 ms late (measured: WAIT 240 answered after 301 ms).  Half of what
        # is left: 200 ms of 0.5 s.
        self._wait_ms = max(1, int((timeout * 1000 - WAIT_LATENESS_MS) / 2))
        self._update_locks = KeyLocks()

    # -- reaching the primary: the one thing the Sentinel and Cluster stores change ------------------

    def _on_primary(self, rkey: str, run: Callable[[redis.Redis], T]) -> T:
        """``run`` with a client of the primary that holds ``rkey``."""
        return run(self._redis)

    def _primaries(self) -> list[redis.Redis]:
        """A client of every primary (one here; one per shard in a cluster)."""
        return [self._redis]

    def where(self) -> str:
        kwargs = self._redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', kwargs.get('path'))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"

    # -- every call's error handling -----------------------------------------------------------------

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StoreUnavailable(f"{self.backend} {self.where()}: {error}") from error
        except redis.exceptions.OutOfMemoryError as error:  # it answered: up, but over its maxmemory
            raise StoreRefused(f"{self.backend} {self.where()}: out of memory: {error}") from error
        except redis.ResponseError as error:
            message = str(error)
            if "overflow" in message:
                raise Overflow(f"counter {key!r}: {message}; the counter is unchanged") from error
            if "not an integer" in message or "WRONGTYPE" in message:
                raise CorruptCounter(f"counter {key!r}: Redis holds a value that is not a counter") from error
            raise StoreUnavailable(f"{self.backend} {self.where()}: {message}") from error
        except (redis.RedisError, RedisClusterException) as error:  # topology errors: no answer, no guess
            raise StoreUnavailable(f"{self.backend} {self.where()}: {error}") from error

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    def _value_key(self, key: str) -> str:
        return f"{self.key_prefix}={key}"  # "=" starts no counter name: a namespace of its own

    def _read(self, rkey: str, *command: Any) -> Any:
        # redis-py leaves execute_command (the client's and the pipeline's) unannotated
        return self._on_primary(rkey, lambda client: client.execute_command(*command))  # type: ignore[no-untyped-call]

    def _write(self, rkey: str, *command: Any) -> Any:
        """One write on the primary of ``rkey``; with ``min_replicas``, ``WAIT`` follows it on the
        same connection, in the same round trip, and a short count raises ``ReplicationUnconfirmed``."""
        if not self.min_replicas:
            return self._read(rkey, *command)

        def run(client: redis.Redis) -> Any:
            with client.pipeline(transaction=False) as pipe:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
                pipe.execute_command("WAIT", self.min_replicas, self._wait_ms)  # type: ignore[no-untyped-call]
                reply, confirmed = pipe.execute()
            if confirmed < self.min_replicas:
                metrics.replica_wait_short(self.backend)
                raise ReplicationUnconfirmed(
                    f"{self.backend}: {confirmed} of the {self.min_replicas} replicas asked for"
                    f" (COUNTER_MIN_REPLICAS) confirmed the step within {self._wait_ms} ms; it may"
                    " or may not survive a failover, so its result is not returned"
                )
            return reply

        return self._on_primary(rkey, run)

    # -- counters ------------------------------------------------------------------------------------

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        rkey = self._key(key)
        with self._errors(key):
            if not ttl:
                return int(self._write(rkey, "INCRBY", rkey, delta))
            return int(self._write(rkey, "EVAL", ADD_WITH_LIFETIME, 1, rkey, delta, ttl))

    def add_in_window(self, key: str, delta: int, window: float) -> tuple[int, float]:
        """One script: ``INCRBY``, and ``PEXPIRE`` only when it created the key (then ``WAIT`` as for
        every write)."""
        rkey = self._key(key)
        with self._errors(key):
            value, left = self._write(
                rkey, "EVAL", ADD_IN_WINDOW, 1, rkey, delta, max(1, math.ceil(window * 1000))
            )
        return int(value), time.time() + int(left) / 1000

    def read_window(self, key: str) -> tuple[int, float] | None:
        rkey = self._key(key)
        with self._errors(key):
            raw = self._read(rkey, "EVAL", READ_WINDOW, 1, rkey)
        if not raw or int(raw[1]) < 0:
            return None
        try:
            return int(raw[0]), time.time() + int(raw[1]) / 1000
        except ValueError:
            raise CorruptCounter(f"counter {key!r}: Redis holds {raw[0]!r:.40}, not a counter") from None

    def get(self, key: str, ttl: int | None = None) -> int:
        rkey = self._key(key)
        with self._errors(key):
            if ttl:
                raw = self._read(rkey, "EVAL", GET_AND_RENEW, 1, rkey, ttl)
            else:
                raw = self._read(rkey, "GET", rkey)
        if raw is None:
            return 0
        try:
            return int(raw)
        except ValueError:
            raise CorruptCounter(f"counter {key!r}: Redis holds {raw!r:.40}, not a counter") from None

    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        self.check_range(value)
        rkey = self._key(key)
        with self._errors(key):
            self._write(rkey, "SET", rkey, value, *(("EX", ttl) if ttl else ()))

    def delete(self, key: str) -> bool:
        rkey = self._key(key)
        with self._errors(key):
            return bool(self._write(rkey, "DEL", rkey))

    # -- shared values: compare-and-set on the bytes --------------------------------------------------

    def get_value(self, key: str) -> bytes | None:
        rkey = self._value_key(key)
        with self._errors(key):
            data: bytes | None = self._read(rkey, "GET", rkey)
            return data

    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        rkey = self._value_key(key)
        with self._errors(key):
            self._write(rkey, "SET", rkey, data, *(("EX", ttl) if ttl else ()))

    def delete_value(self, key: str) -> bool:
        rkey = self._value_key(key)
        with self._errors(key):
            return bool(self._write(rkey, "DEL", rkey))

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        """Read, ``change``, then a compare-and-set script that writes only if the key still holds
        the bytes read (or is still missing); retried when it moved.  One key, so one slot in a
        cluster, and an ordinary write, so ``WAIT`` follows it like any other.  A value changed and
        changed back in between is written over: harmless, since ``change`` depends on the bytes
        alone."""
        rkey = self._value_key(key)
        with self._update_locks(key), self._errors(key):
            for attempt in range(VALUE_RETRIES):
                current = self._read(rkey, "GET", rkey)
                data = change(current)
                expected = ("1", current) if current is not None else ("0", b"")
                if self._write(rkey, "EVAL", COMPARE_AND_SET, 1, rkey, *expected, data, ttl or 0):
                    return data
                metrics.update_retried(self.backend)
                pause_after_conflict(attempt)
        raise Conflict(f"shared value {key!r} changed under {VALUE_RETRIES} attempts to update it")

    def names(self, limit: int) -> list[str]:
        """``SCAN`` with ``MATCH <prefix>*`` on every primary (never ``KEYS``, which blocks the
        server), stopping once ``limit`` names are found: then the list may be partial.  Each ``SCAN``
        call answers within ``timeout`` or raises ``StoreUnavailable``; SCAN may repeat a key, listed
        here once."""
        pattern = glob_escape(self.key_prefix) + "*"
        found: dict[str, None] = {}
        with self._errors():
            for client in self._primaries():
                cursor = 0
                while len(found) < limit:
                    cursor, keys = client.scan(cursor, match=pattern, count=SCAN_COUNT)
                    for raw in keys:
                        name = self._counter_name(raw)
                        if name is not None and len(found) < limit:
                            found[name] = None
                    if cursor == 0:
                        break
        return list(found)

    def _counter_name(self, raw: bytes | str) -> str | None:
        """The counter name of a key under the prefix; ``None`` for shared values (``<prefix>=...``),
        per-client counters (``<prefix>@...``) and anything else that is not a valid name.  (Tally's
        clients answer keys as bytes; a key already decoded is taken as it is.)"""
        try:
            key = raw if isinstance(raw, str) else raw.decode()
        except UnicodeDecodeError:
            return None
        if not key.startswith(self.key_prefix):
            return None
        return counter_name(key[len(self.key_prefix) :])

    def health(self) -> dict[str, Any]:
        with self._errors():
            primaries = self._primaries()
            info = primaries[0].info("server")
            persistence = primaries[0].info("persistence")
            replication = [client.info("replication") for client in primaries]
        details: dict[str, Any] = {
            "server": self.where(),
            "redis_version": info.get("redis_version"),
            "uptime": info.get("uptime_in_seconds"),
            "aof_enabled": bool(persistence.get("aof_enabled")),
            "min_replicas": self.min_replicas,
            "replicas": [int(facts.get("connected_slaves", 0)) for facts in replication],
        }
        if len(primaries) == 1:
            details["replicas"] = details["replicas"][0]
        return details

    # -- server-side sessions: whole keys, outside the counters' prefix, WAIT as configured -----------

    def session_get(self, key: str) -> bytes | None:
        with self._errors():
            reply: bytes | None = self._read(key, "GET", key)
            return reply

    def session_set(self, key: str, data: bytes, ttl: int) -> None:
        with self._errors():
            self._write(key, "SET", key, data, *(("EX", ttl) if ttl else ()))

    def session_delete(self, key: str) -> bool:
        with self._errors():
            return bool(int(self._write(key, "DEL", key)))

    def close(self) -> None:
        self._redis.connection_pool.disconnect()
