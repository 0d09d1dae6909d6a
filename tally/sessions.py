"""Server-side sessions (Flask-Session) on the counters' own store, on every store: the clients
Flask-Session expects, speaking through the store's connections.  A store that declares
``SessionStorage`` (memcached, Redis) keeps sessions under Flask-Session's own keys on its servers;
every other store keeps them as shared values with a lifetime (``ValueSessionClient``), so on SQL a
session is a row of the database every host reads, and on the manager an entry of its table.

So a session gets what a counter step gets: the store's deadline (``COUNTER_TIMEOUT``), no hidden
retries, the primary only (never a replica, followed through a failover), ``WAIT`` as configured, and
``StoreUnavailable`` (a 503) for every failure.  A session lives on its one server: pymemcache's
``HashClient``, Flask-Session's usual memcached client, takes a failing server out of its ring, so a
session would be looked for on another server, not found, and the browser would seem new.
"""

from __future__ import annotations

import functools
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .names import hashed_key
from .stores.base import CounterStore, SessionStorage

if TYPE_CHECKING:  # redis is an extra: only the Redis stores' sessions import it, when first used
    from redis.typing import EncodableT, ExpiryT, KeyT


class MemcachedSessionClient:
    """The three calls Flask-Session's ``MemcachedSessionInterface`` makes."""

    def __init__(self, store: SessionStorage) -> None:
        self._store = store

    def get(self, key: str) -> bytes | None:
        return self._store.session_get(key)

    def set(self, key: str, value: bytes, timeout: int) -> bool:
        self._store.session_set(key, value, timeout)
        return True

    def delete(self, key: str) -> bool:
        return self._store.session_delete(key)


#: Shared values whose key starts with this are sessions (no validated key starts with ``@``).
SESSION_MARK = "@s."
#: Flask-Session's memcached interface sends a lifetime over 30 days as a unix time (memcached's rule).
_MEMCACHED_RELATIVE_LIMIT = 30 * 24 * 3600


class ValueSessionClient:
    """Flask-Session's memcached client calls (``get``, ``set``, ``delete``) on any store's shared
    values: each session is one value under ``@s.`` and 160 bits of the SHA-256 of its key, written
    with the session's lifetime, so it expires by itself (and the filesystem's and SQL's sweeps
    remove it).  Every call has the store's deadline and raises ``StoreUnavailable`` when the store
    cannot be reached."""

    def __init__(self, store: CounterStore) -> None:
        self._store = store

    @staticmethod
    def _key(key: str) -> str:
        return hashed_key(SESSION_MARK, key)

    def get(self, key: str) -> bytes | None:
        return self._store.get_value(self._key(key))

    def set(self, key: str, value: bytes, timeout: int) -> bool:
        if timeout > _MEMCACHED_RELATIVE_LIMIT:  # a unix time: back to seconds from now
            timeout = max(1, timeout - int(time.time()))
        self._store.set_value(self._key(key), bytes(value), timeout or None)
        return True

    def delete(self, key: str) -> bool:
        return self._store.delete_value(self._key(key))


@functools.cache
def _redis_session_client_class() -> type:
    import redis

    class RedisSessionClient(redis.Redis):
        """The three calls Flask-Session's ``RedisSessionInterface`` makes (``get``, ``set``,
        ``delete``).  A ``redis.Redis`` only because Flask-Session accepts nothing else: no pool of its
        own is set up or used.  Keys and values are taken as redis-py takes them (a ``bytes`` key is
        the same key as its UTF-8 text; a value is stored as the bytes redis-py would send), and a
        lifetime in seconds or as a ``timedelta``; ``set``'s other options are ignored."""

        def __init__(self, store: SessionStorage) -> None:  # no super().__init__(): no pool of its own
            self._store = store

        def get(self, name: KeyT) -> bytes | None:
            return self._store.session_get(_key_text(name))

        def set(
            self, name: KeyT, value: EncodableT, ex: ExpiryT | str | None = None, *_: Any, **__: Any
        ) -> bool:
            """Store the session for ``ex`` seconds (an int, its text, or a ``timedelta``)."""
            seconds = int(ex.total_seconds()) if isinstance(ex, timedelta) else int(ex or 0)
            self._store.session_set(_key_text(name), _value_bytes(value), seconds)
            return True

        def delete(self, *names: KeyT) -> int:
            return sum(self._store.session_delete(_key_text(name)) for name in names)

        def close(self) -> None:
            """The store's connections are the store's to close."""

        def __del__(self) -> None:
            pass

        def __repr__(self) -> str:
            return f"<RedisSessionClient on {type(self._store).__name__}>"

    return RedisSessionClient


def _key_text(name: KeyT) -> str:
    return name if isinstance(name, str) else bytes(name).decode()


def _value_bytes(value: EncodableT) -> bytes:
    """What redis-py's encoder sends for ``value``: bytes as they are, text as UTF-8, a number as
    its ``repr``."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return (value if isinstance(value, str) else repr(value)).encode()


def flask_session_settings(store: CounterStore) -> dict[str, Any]:
    """The Flask-Session settings (``SESSION_TYPE`` and its client) that keep sessions on ``store``:
    any store.  Every failure of the client is a ``StoreUnavailable``."""
    if not isinstance(store, SessionStorage):
        return {"SESSION_TYPE": "memcached", "SESSION_MEMCACHED": ValueSessionClient(store)}
    if store.session_protocol == "redis":
        return {"SESSION_TYPE": "redis", "SESSION_REDIS": _redis_session_client_class()(store)}
    return {"SESSION_TYPE": "memcached", "SESSION_MEMCACHED": MemcachedSessionClient(store)}
