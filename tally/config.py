"""Tally's settings: defaults set with ``app.config.setdefault``, every value checked at ``init_app``,
and the store chosen from the app's Flask-Caching setup.

A mistake fails at start-up with one ``ConfigError`` line naming the key, never at the first request.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from flask import Flask


class ConfigError(ValueError):
    """A setting has the wrong type or value; the message names the key and what it expects."""


#: Tally's own keys and their defaults.  Relative directories resolve under the instance folder.
DEFAULTS: dict[str, Any] = {
    "COUNTER_STORE": None,  # None: follow CACHE_TYPE; "sql": the database at SQLALCHEMY_DATABASE_URI
    "COUNTER_DIR": "counters",  # filesystem counters: never CACHE_DIR, which cachelib prunes
    "COUNTER_FSYNC": False,  # flush every filesystem step to disk (survives power loss; slower)
    "COUNTER_SWEEP_INTERVAL": 300,  # seconds between sweeps of expired per-client counters
    "COUNTER_KEY_PREFIX": "tally:",  # memcached/Redis key prefix, apart from CACHE_KEY_PREFIX
    "COUNTER_TIMEOUT": 0.5,  # seconds: every memcached/Redis call returns or fails within it
    "COUNTER_POOL_SIZE": 16,  # connections per process (>= the threads serving requests)
    "VALUE_MAX_BYTES": 65536,  # largest shared value, as JSON
}

#: The stores, by the Flask-Caching backend they follow.
SUPPORTED = ("FileSystemCache", "MemcachedCache", "RedisCache", "SimpleCache")

#: Every spelling of a supported backend that Flask-Caching accepts now (class names, dotted paths) or
#: accepted before 2.0 (short names), by its lower-cased last dotted component.
_SPELLINGS = {
    "filesystemcache": "FileSystemCache",
    "filesystem": "FileSystemCache",
    "memcachedcache": "MemcachedCache",
    "memcached": "MemcachedCache",
    "rediscache": "RedisCache",
    "redis": "RedisCache",
    "simplecache": "SimpleCache",
    "simple": "SimpleCache",
}

#: Backends Flask-Caching has and Tally cannot keep counters on, and why.
_UNSUPPORTED = {
    "nullcache": "stores nothing",
    "null": "stores nothing",
    "uwsgicache": "has no atomic increment shared by every process",
    "uwsgi": "has no atomic increment shared by every process",
    "saslmemcachedcache": "needs SASL authentication, which Tally's memcached client does not do",
    "saslmemcached": "needs SASL authentication, which Tally's memcached client does not do",
    "spreadsaslmemcachedcache": "spreads one value over several keys, so no step on it is atomic",
    "spreadsaslmemcached": "spreads one value over several keys, so no step on it is atomic",
    "redissentinelcache": "is not supported yet (Redis Sentinel)",
    "redissentinel": "is not supported yet (Redis Sentinel)",
    "redisclustercache": "is not supported yet (Redis Cluster)",
    "rediscluster": "is not supported yet (Redis Cluster)",
}


def _refuse(spelling: str, why: str) -> ConfigError:
    return ConfigError(
        f"CACHE_TYPE {spelling!r}: Tally cannot keep atomic counters on it (it {why});"
        f" use one of {', '.join(SUPPORTED)}"
    )


def backend_name(cache_type: object) -> str:
    """The supported backend a ``CACHE_TYPE`` names, whatever its spelling, or ``ConfigError``."""
    if isinstance(cache_type, type):
        cache_type = cache_type.__name__
    if not isinstance(cache_type, str) or not cache_type:
        raise ConfigError(f"CACHE_TYPE must name a cache backend; got {cache_type!r}")
    last = cache_type.rsplit(".", 1)[-1].lower()
    if last in _SPELLINGS:
        return _SPELLINGS[last]
    raise _refuse(cache_type, _UNSUPPORTED.get(last, "is not a backend Tally knows"))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_positive(value: Any) -> bool:
    return is_number(value) and value > 0


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_directory(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and os.fspath(value) != ""


#: key -> (check, what the check expects)
#: Stores chosen by COUNTER_STORE rather than by the cache backend.
COUNTER_STORES = ("sql",)
#: The database of COUNTER_STORE = "sql" when SQLALCHEMY_DATABASE_URI is not set (in the instance folder).
DEFAULT_DATABASE_URI = "sqlite:///tally.db"

CHECKS: dict[str, tuple[Any, str]] = {
    "COUNTER_STORE": (lambda v: v is None or v in COUNTER_STORES, 'unset, or "sql"'),
    "COUNTER_DIR": (is_directory, "a directory path"),
    "COUNTER_FSYNC": (lambda v: isinstance(v, bool), "true or false"),
    "COUNTER_SWEEP_INTERVAL": (is_positive, "a number of seconds > 0"),
    "COUNTER_KEY_PREFIX": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "COUNTER_TIMEOUT": (is_positive, "a number of seconds > 0"),
    "COUNTER_POOL_SIZE": (is_count, "an integer >= 1"),
    "VALUE_MAX_BYTES": (lambda v: is_count(v) and v <= 1_000_000, "a number of bytes from 1 to 1000000"),
}


def _check(key: str, value: Any, check: Any, expected: str) -> None:
    if not check(value):
        raise ConfigError(f"setting {key} must be {expected}; got {value!r}")


def _server_list(value: Any) -> list[str]:
    if not (
        isinstance(value, (list, tuple))
        and value
        and all(isinstance(v, str) and v.rpartition(":")[2].isdigit() for v in value)
    ):
        raise ConfigError(f'setting CACHE_MEMCACHED_SERVERS must be a list of "host:port"; got {value!r}')
    return list(value)


def _redis_url_from_config(config: Mapping[str, Any]) -> str:
    """Flask-Caching's keys: CACHE_REDIS_URL, else CACHE_REDIS_HOST/PORT/DB/PASSWORD."""
    url = config.get("CACHE_REDIS_URL")
    if url:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"setting CACHE_REDIS_URL must be a redis:// URL; got {url!r}")
        return url
    host = config.get("CACHE_REDIS_HOST") or "localhost"
    port = config.get("CACHE_REDIS_PORT") or 6379
    db = config.get("CACHE_REDIS_DB") or 0
    password = config.get("CACHE_REDIS_PASSWORD")
    auth = f":{quote(str(password), safe='')}@" if password else ""
    return f"redis://{auth}{host}:{port}/{db}"


def _redis_url_of(client: Any) -> str | None:
    """The URL of the server a redis-py client talks to (what Flask-Caching built), if it tells."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if not isinstance(kwargs, dict):
        return None
    user, password = kwargs.get("username"), kwargs.get("password")
    auth = ""
    if password:
        auth = f"{quote(str(user or ''), safe='')}:{quote(str(password), safe='')}@"
    db = kwargs.get("db", 0)
    if kwargs.get("path"):
        return f"unix://{auth}{kwargs['path']}?db={db}"
    scheme = "rediss" if "SSL" in getattr(pool, "connection_class", type).__name__ else "redis"
    return f"{scheme}://{auth}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"


def _memcached_addresses(backend: Any) -> list[str] | None:
    """The servers of cachelib's MemcachedCache: its client, or a client of its pool (pylibmc's
    ``addresses``; python-memcached's ``servers``)."""
    client = getattr(backend, "_client", None)
    if getattr(client, "addresses", None) is None and hasattr(backend, "_client_context"):
        with backend._client_context() as pooled:
            client = pooled
            addresses = getattr(client, "addresses", None)
    else:
        addresses = getattr(client, "addresses", None)
    if addresses is None and hasattr(client, "servers"):
        addresses = [f"{host.ip}:{host.port}" for host in client.servers if hasattr(host, "ip")]
    return list(addresses) if addresses else None


def _from_cache_backend(backend: Any) -> dict[str, Any]:
    """What a Flask-Caching backend object was built with: its kind, directory, servers, prefix.

    Read from the object, so it holds whether the settings sat in ``app.config``, in ``Cache(config=)``
    or in ``cache.init_app(app, config=...)`` (Flask-Caching keeps that last one nowhere else).
    """
    import cachelib

    found: dict[str, Any] = {"CACHE_KEY_PREFIX": getattr(backend, "key_prefix", "") or ""}
    kind = type(backend)
    names = [cls.__name__.lower() for cls in kind.__mro__]
    for name in names:  # the most specific class first: RedisSentinelCache is also a RedisCache
        if name in _UNSUPPORTED:
            raise _refuse(kind.__name__, _UNSUPPORTED[name])
        if name in _SPELLINGS:
            break
    if isinstance(backend, cachelib.FileSystemCache):
        found.update(CACHE_TYPE="FileSystemCache", CACHE_DIR=getattr(backend, "_path", None))
    elif isinstance(backend, cachelib.SimpleCache):
        found["CACHE_TYPE"] = "SimpleCache"
    elif isinstance(backend, cachelib.MemcachedCache):
        found.update(CACHE_TYPE="MemcachedCache", CACHE_MEMCACHED_SERVERS=_memcached_addresses(backend))
    elif isinstance(backend, cachelib.RedisCache):
        found.update(CACHE_TYPE="RedisCache", CACHE_REDIS_URL=_redis_url_of(backend._write_client))
    else:
        raise _refuse(kind.__name__, "is not a backend Tally knows")
    return found


def database_uri(uri: Any, instance_path: str) -> str:
    """``SQLALCHEMY_DATABASE_URI`` for the sql store: ``sqlite:///relative.db`` resolved under the
    instance folder, ``postgresql://`` driven by psycopg 3; anything else is a ``ConfigError``."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(os.fspath(uri) if isinstance(uri, os.PathLike) else uri)
    except (ArgumentError, TypeError, ValueError) as error:
        raise ConfigError(
            f"setting SQLALCHEMY_DATABASE_URI must be a database URL; got {uri!r}: {error}"
        ) from None
    if url.drivername in ("sqlite", "sqlite+pysqlite"):
        if not url.database or url.database == ":memory:":
            raise ConfigError(
                "SQLALCHEMY_DATABASE_URI: an in-memory SQLite database is private to one connection;"
                " name a file (sqlite:///tally.db is created in the instance folder)"
            )
        path = os.path.abspath(os.path.join(instance_path, url.database))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return url.set(drivername="sqlite", database=path).render_as_string(hide_password=False)
    if url.drivername in ("postgresql", "postgresql+psycopg"):
        return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ConfigError(
        f"SQLALCHEMY_DATABASE_URI {url.render_as_string(hide_password=True)!r}: the sql store supports"
        " sqlite:///... and postgresql+psycopg://..."
    )


def cache_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """Flask-Caching's keys in ``config``, checked for the backend they name: the canonical
    ``CACHE_TYPE`` (none at all: the embedded filesystem store), its directory or servers, its key
    prefix.  Raises ``ConfigError`` naming the key."""
    cache = {
        "CACHE_TYPE": backend_name(config.get("CACHE_TYPE", "FileSystemCache")),
        "CACHE_DIR": config.get("CACHE_DIR"),
        "CACHE_KEY_PREFIX": config.get("CACHE_KEY_PREFIX", "flask_cache_"),
    }
    if cache["CACHE_TYPE"] == "MemcachedCache":
        cache["CACHE_MEMCACHED_SERVERS"] = _server_list(config.get("CACHE_MEMCACHED_SERVERS"))
    if cache["CACHE_TYPE"] == "RedisCache":
        cache["CACHE_REDIS_URL"] = _redis_url_from_config(config)
    return cache


def store_settings(app: Flask, cache_backend: Any = None) -> dict[str, Any]:
    """Set Tally's defaults on ``app.config``, check every value, and return what the store needs:
    the backend (``CACHE_TYPE``, canonical), its servers or directory, and the ``COUNTER_*`` keys with
    ``COUNTER_DIR`` made absolute under the instance folder.  ``cache_backend`` is the Flask-Caching
    backend object the counters follow, when ``Counters`` was given a ``Cache``.
    """
    config = app.config
    for key, default in DEFAULTS.items():
        config.setdefault(key, default)
    for key, (check, expected) in CHECKS.items():
        _check(key, config[key], check, expected)
    settings = {key: config[key] for key in DEFAULTS}

    cache = _from_cache_backend(cache_backend) if cache_backend is not None else cache_settings(config)
    settings.update(cache)

    backend = settings["CACHE_TYPE"]
    settings["STORE"] = settings["COUNTER_STORE"] or backend
    if settings["STORE"] == "sql":
        settings["SQLALCHEMY_DATABASE_URI"] = database_uri(
            config.get("SQLALCHEMY_DATABASE_URI") or DEFAULT_DATABASE_URI, app.instance_path
        )
    if backend == "MemcachedCache" and not settings.get("CACHE_MEMCACHED_SERVERS"):
        # the cache's client did not say (another client library): the servers it was given
        settings["CACHE_MEMCACHED_SERVERS"] = _server_list(config.get("CACHE_MEMCACHED_SERVERS"))
    if backend == "RedisCache" and not settings.get("CACHE_REDIS_URL"):
        settings["CACHE_REDIS_URL"] = _redis_url_from_config(config)
    counter_prefix, cache_prefix = settings["COUNTER_KEY_PREFIX"], str(settings["CACHE_KEY_PREFIX"] or "")
    if backend in ("MemcachedCache", "RedisCache") and (
        counter_prefix.startswith(cache_prefix) or cache_prefix.startswith(counter_prefix)
    ):
        # cachelib's RedisCache.clear() deletes every key starting with CACHE_KEY_PREFIX.
        raise ConfigError(
            f"COUNTER_KEY_PREFIX {counter_prefix!r} and CACHE_KEY_PREFIX {cache_prefix!r} must not"
            " be prefixes of each other, or clearing the page cache would delete counters"
        )
    counter_dir = os.path.abspath(os.path.join(app.instance_path, os.fspath(settings["COUNTER_DIR"])))
    settings["COUNTER_DIR"] = counter_dir
    if backend == "FileSystemCache" and settings.get("CACHE_DIR"):
        # cachelib deletes the plain files at the top of CACHE_DIR that it did not write (pruning,
        # clear()), and nothing below: a directory there fails os.remove and is skipped (cachelib's
        # file.py).  So the counters may not share CACHE_DIR, and CACHE_DIR may not sit in theirs.
        cache_dir = os.path.abspath(os.path.join(app.instance_path, os.fspath(settings["CACHE_DIR"])))
        if os.path.commonpath([counter_dir, cache_dir]) == counter_dir:
            raise ConfigError(
                f"COUNTER_DIR {counter_dir} must not be CACHE_DIR {cache_dir} nor contain it:"
                " cachelib deletes files it did not write in CACHE_DIR"
            )
    return settings
