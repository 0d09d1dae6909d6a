"""Server-side sessions (Flask-Session) on the counters' own store, for the stores that declare
``SessionStorage``: the clients Flask-Session expects, speaking through the store's connections.

So a session gets what a counter step gets: the store's deadline (``COUNTER_TIMEOUT``), no hidden
retries, the primary only (never a replica, followed through a failover), ``WAIT`` as configured, and
``StoreUnavailable`` (a 503) for every failure.  A session lives on its one server: pymemcache's
``HashClient``, Flask-Session's usual memcached client, takes a failing server out of its ring, so a
session would be looked for on another server, not found, and the browser would seem new.
"""

from __future__ import annotations

import functools
from typing import Any

from .stores.base import SessionStorage


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


@functools.cache
def _redis_session_client_class() -> type:
    import redis

    class RedisSessionClient(redis.Redis):  # type: ignore[misc]  # redis-py's class is untyped here
        """The three calls Flask-Session's ``RedisSessionInterface`` makes (``get``, ``set``,
        ``delete``).  A ``redis.Redis`` only because Flask-Session accepts nothing else: no pool of its
        own is set up or used."""

        def __init__(self, store: SessionStorage) -> None:  # no super().__init__(): no pool of its own
            self._store = store

        def get(self, name: str) -> bytes | None:
            return self._store.session_get(name)

        def set(self, name: str, value: bytes, ex: int | None = None, **_: Any) -> None:
            self._store.session_set(name, value, ex or 0)

        def delete(self, *names: str) -> int:
            return sum(self._store.session_delete(name) for name in names)

        def close(self) -> None:
            """The store's connections are the store's to close."""

        def __del__(self) -> None:
            pass

        def __repr__(self) -> str:
            return f"<RedisSessionClient on {type(self._store).__name__}>"

    return RedisSessionClient


def flask_session_settings(store: SessionStorage) -> dict[str, Any]:
    """The Flask-Session settings (``SESSION_TYPE`` and its client) that keep sessions on ``store``."""
    if store.session_protocol == "redis":
        return {"SESSION_TYPE": "redis", "SESSION_REDIS": _redis_session_client_class()(store)}
    return {"SESSION_TYPE": "memcached", "SESSION_MEMCACHED": MemcachedSessionClient(store)}
