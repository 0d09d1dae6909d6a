"""Counters in Redis through redis-py: ``INCRBY``, one round trip, atomic on the server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .. import metrics
from ..errors import Conflict, CorruptCounter, Overflow, StoreUnavailable
from .base import VALUE_RETRIES, CounterStore, KeyLocks, counter_name, pause_after_conflict

#: Keys Redis looks at per ``SCAN`` call while enumerating counter names (a hint, not a bound).
SCAN_COUNT = 1000


def glob_escape(text: str) -> str:
    """``text`` as a literal in a Redis ``MATCH`` pattern."""
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


class RedisCounterStore(CounterStore):
    """Atomic across every process and host using the server; Redis checks int64 overflow itself.

    Commands are never retried by the client: a retried ``INCRBY`` whose first reply was lost would
    count twice.  A connection or timeout error raises ``StoreUnavailable`` within ``timeout`` seconds
    (the step may or may not have been applied; no value is guessed), and the next call reconnects.
    Durability is the server's: with AOF (``appendonly yes``) counters survive a Redis restart.
    """

    backend = "redis"
    multi_process = True

    def __init__(
        self, url: str, *, key_prefix: str = "tally:", timeout: float = 0.5, pool_size: int = 16
    ) -> None:
        self.url = url
        self.key_prefix = key_prefix
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._update_locks = KeyLocks()

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    @contextmanager
    def _errors(self, key: str | None = None) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as error:
            raise StoreUnavailable(f"redis {self._safe_url()}: {error}") from error
        except redis.ResponseError as error:
            message = str(error)
            if "overflow" in message:
                raise Overflow(f"counter {key!r}: {message}; the counter is unchanged") from error
            if "not an integer" in message or "WRONGTYPE" in message:
                raise CorruptCounter(f"counter {key!r}: Redis holds a value that is not a counter") from error
            raise StoreUnavailable(f"redis {self._safe_url()}: {message}") from error

    def _safe_url(self) -> str:
        kwargs = self._redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', kwargs.get('path'))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}"

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        rkey = self._key(key)
        with self._errors(key):
            if not ttl:
                return int(self._redis.incrby(rkey, delta))
            with self._redis.pipeline(transaction=True) as pipe:
                value, _ = pipe.incrby(rkey, delta).expire(rkey, ttl).execute()
            return int(value)

    def get(self, key: str, ttl: int | None = None) -> int:
        rkey = self._key(key)
        with self._errors(key):
            if ttl:
                with self._redis.pipeline(transaction=True) as pipe:
                    raw, _ = pipe.get(rkey).expire(rkey, ttl).execute()
            else:
                raw = self._redis.get(rkey)
        if raw is None:
            return 0
        try:
            return int(raw)
        except ValueError:
            raise CorruptCounter(f"counter {key!r}: Redis holds {raw!r:.40}, not a counter") from None

    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        self.check_range(value)
        with self._errors(key):
            self._redis.set(self._key(key), value, ex=ttl or None)

    def delete(self, key: str) -> bool:
        with self._errors(key):
            return bool(self._redis.delete(self._key(key)))

    # -- shared values: WATCH / MULTI / EXEC --------------------------------------------------------

    def _value_key(self, key: str) -> str:
        return f"{self.key_prefix}={key}"  # "=" starts no counter name: a namespace of its own

    def get_value(self, key: str) -> bytes | None:
        with self._errors(key):
            return self._redis.get(self._value_key(key))

    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        with self._errors(key):
            self._redis.set(self._value_key(key), data, ex=ttl or None)

    def delete_value(self, key: str) -> bool:
        with self._errors(key):
            return bool(self._redis.delete(self._value_key(key)))

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        """``WATCH``, read, ``change``, then ``MULTI``/``SET``/``EXEC``, retried when the key moved."""
        rkey = self._value_key(key)
        with self._update_locks(key), self._errors(key), self._redis.pipeline(transaction=True) as pipe:
            for attempt in range(VALUE_RETRIES):
                try:
                    pipe.watch(rkey)
                    data = change(pipe.get(rkey))
                    pipe.multi()
                    pipe.set(rkey, data, ex=ttl or None)
                    pipe.execute()
                    return data
                except redis.WatchError:
                    metrics.update_retried(self.backend)
                    pause_after_conflict(attempt)
                finally:
                    pipe.reset()
        raise Conflict(f"shared value {key!r} changed under {VALUE_RETRIES} attempts to update it")

    def names(self, limit: int) -> list[str]:
        """``SCAN`` with ``MATCH <prefix>*`` (never ``KEYS``, which blocks the server), stopping once
        ``limit`` names are found: then the list may be partial.  Each ``SCAN`` call answers within
        ``timeout`` or raises ``StoreUnavailable``; SCAN may repeat a key, listed here once."""
        pattern = glob_escape(self.key_prefix) + "*"
        found: dict[str, None] = {}
        cursor = 0
        with self._errors():
            while len(found) < limit:
                cursor, keys = self._redis.scan(cursor, match=pattern, count=SCAN_COUNT)
                for raw in keys:
                    name = self._counter_name(raw)
                    if name is not None and len(found) < limit:
                        found[name] = None
                if cursor == 0:
                    break
        return list(found)

    def _counter_name(self, raw: bytes) -> str | None:
        """The counter name of a key under the prefix; ``None`` for shared values (``<prefix>=...``),
        per-client counters (``<prefix>@...``) and anything else that is not a valid name."""
        try:
            key = raw.decode()
        except UnicodeDecodeError:
            return None
        if not key.startswith(self.key_prefix):
            return None
        return counter_name(key[len(self.key_prefix) :])

    def health(self) -> dict[str, Any]:
        with self._errors():
            info = self._redis.info("server")
            persistence = self._redis.info("persistence")
        return {
            "server": self._safe_url(),
            "redis_version": info.get("redis_version"),
            "uptime": info.get("uptime_in_seconds"),
            "aof_enabled": bool(persistence.get("aof_enabled")),
        }

    def close(self) -> None:
        self._redis.connection_pool.disconnect()
