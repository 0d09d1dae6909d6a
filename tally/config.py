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

from .errors import ConfigError
from .stores import MISSING, REGISTRY, cache_type_stores, missing_note, store_class

__all__ = ["DEFAULTS", "ConfigError", "backend_name", "cache_settings", "store_settings"]

#: Tally's own keys and their defaults.  Relative directories resolve under the instance folder.
DEFAULTS: dict[str, Any] = {
    "COUNTER_STORE": None,  # None: follow CACHE_TYPE; "sql": the database at SQLALCHEMY_DATABASE_URI
    "COUNTER_DIR": "counters",  # filesystem counters: never CACHE_DIR, which cachelib prunes
    "COUNTER_FSYNC": False,  # flush every filesystem step to disk (survives power loss; slower)
    "COUNTER_SWEEP_INTERVAL": 300,  # seconds between sweeps of expired per-client counters and values
    "COUNTER_KEY_PREFIX": "tally:",  # memcached/Redis key prefix, apart from CACHE_KEY_PREFIX
    "COUNTER_TIMEOUT": 0.5,  # seconds: every memcached/Redis call returns or fails within it
    "COUNTER_POOL_SIZE": 16,  # connections per process (>= the threads serving requests)
    "COUNTER_COMBINE": True,  # concurrent steps on one counter share a round trip (tally.combining)
    "COUNTER_MIN_REPLICAS": 0,  # Redis: replicas that must confirm each write (WAIT) before it counts
    "VALUE_MAX_BYTES": 65536,  # largest shared value, as JSON
    "COUNTER_ERROR_HANDLERS": True,  # init_app answers TallyError with its status (tally.handlers)
    # COUNTER_STORE = "manager": one multiprocessing manager process on this host
    "COUNTER_MANAGER_ADDRESS": None,  # None: manager.sock (0600) in the instance folder; or 127.0.0.1:port
    "COUNTER_MANAGER_AUTHKEY": None,  # None: generated once into the instance folder (0600)
    "COUNTER_MANAGER_ALLOW_REMOTE": False,  # true: a non-loopback host:port (the protocol is pickle)
    "COUNTER_MANAGER_SNAPSHOT": None,  # a file the manager saves its state to (None: lost with it)
    "COUNTER_MANAGER_SNAPSHOT_INTERVAL": 5,  # seconds between snapshot writes, at most one each
}


def supported_cache_types() -> tuple[str, ...]:
    """The Flask-Caching backends (class names) that some registered store follows."""
    return tuple(cache_type_stores())


def _spellings() -> dict[str, str]:
    """Every spelling of a followed backend that Flask-Caching accepts now (the class name, or a
    dotted path ending in it) or accepted before 2.0 (the short name, ``"filesystem"`` for
    ``FileSystemCache``), lower-cased, -> the class name."""
    found = {}
    for cache_type in cache_type_stores():
        found[cache_type.lower()] = cache_type
        found[cache_type.lower().removesuffix("cache")] = cache_type
    return found


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
}


def _refuse(spelling: str, why: str) -> ConfigError:
    return ConfigError(
        f"CACHE_TYPE {spelling!r}: Tally cannot keep atomic counters on it (it {why});"
        f" use one of {', '.join(supported_cache_types())}"
        + (f" ({note})" if (note := missing_note()) else "")
    )


def backend_name(cache_type: object) -> str:
    """The supported backend a ``CACHE_TYPE`` names, whatever its spelling, or ``ConfigError``."""
    if isinstance(cache_type, type):
        cache_type = cache_type.__name__
    if not isinstance(cache_type, str) or not cache_type:
        raise ConfigError(f"CACHE_TYPE must name a cache backend; got {cache_type!r}")
    last = cache_type.rsplit(".", 1)[-1].lower()
    spellings = _spellings()
    if last in spellings:
        return spellings[last]
    needs = [why for module, why in MISSING.items() if _module_stem(module) in last]
    if needs:  # a store Tally has, whose client library is not installed here
        raise ConfigError(f"CACHE_TYPE {cache_type!r} needs a library that is not installed: {needs[0]}")
    raise _refuse(cache_type, _UNSUPPORTED.get(last, "is not a backend Tally knows"))


def _module_stem(module: str) -> str:
    """``tally.stores.redis_store`` -> ``redis``: what a Flask-Caching class name of it contains."""
    return module.rsplit(".", 1)[-1].removesuffix("_store").split("_")[0]


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_positive(value: Any) -> bool:
    return is_number(value) and value > 0


def is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def is_directory(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and os.fspath(value) != ""


def _named_stores() -> list[str]:
    """The stores chosen by ``COUNTER_STORE`` rather than by the cache backend."""
    return [name for name, cls in REGISTRY.items() if not cls.cache_types]


#: key -> (check, what the check expects)
CHECKS: dict[str, tuple[Any, str]] = {
    "COUNTER_STORE": (
        lambda v: v is None or v in _named_stores(),
        "unset (follow CACHE_TYPE) or the name of a store: " + ", ".join(_named_stores()),
    ),
    "COUNTER_DIR": (is_directory, "a directory path"),
    "COUNTER_FSYNC": (lambda v: isinstance(v, bool), "true or false"),
    "COUNTER_SWEEP_INTERVAL": (is_positive, "a number of seconds > 0"),
    "COUNTER_KEY_PREFIX": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "COUNTER_TIMEOUT": (is_positive, "a number of seconds > 0"),
    "COUNTER_POOL_SIZE": (is_count, "an integer >= 1"),
    "COUNTER_COMBINE": (lambda v: isinstance(v, bool), "true or false"),
    "COUNTER_ERROR_HANDLERS": (lambda v: isinstance(v, bool), "true or false"),
    "COUNTER_MIN_REPLICAS": (lambda v: is_count(v) or (type(v) is int and v == 0), "an integer >= 0"),
    "VALUE_MAX_BYTES": (lambda v: is_count(v) and v <= 1_000_000, "a number of bytes from 1 to 1000000"),
    "COUNTER_MANAGER_ADDRESS": (
        lambda v: v is None or isinstance(v, str),
        "unset, a Unix socket path or host:port",
    ),
    "COUNTER_MANAGER_AUTHKEY": (
        lambda v: v is None or (isinstance(v, (str, bytes)) and (v in ("", b"") or len(v) >= 16)),
        "unset (generated) or a key of at least 16 characters",
    ),
    "COUNTER_MANAGER_ALLOW_REMOTE": (lambda v: isinstance(v, bool), "true or false"),
    "COUNTER_MANAGER_SNAPSHOT": (lambda v: v is None or v == "" or is_directory(v), "unset or a file path"),
    "COUNTER_MANAGER_SNAPSHOT_INTERVAL": (is_positive, "a number of seconds > 0"),
}


def _check(key: str, value: Any, check: Any, expected: str) -> None:
    if not check(value):
        raise ConfigError(f"setting {key} must be {expected}; got {value!r}")


#: Where Flask-Caching's (cachelib's) MemcachedCache looks when it is given no servers.
DEFAULT_MEMCACHED_SERVERS = ["127.0.0.1:11211"]


def _server_list(value: Any) -> list[str]:
    if value is None:  # unset, as for Flask-Caching: the local server
        return list(DEFAULT_MEMCACHED_SERVERS)
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


def _sentinel_list(value: Any) -> list[tuple[str, int]]:
    """``CACHE_REDIS_SENTINELS``: ``[[host, port], ...]`` (Flask-Caching's spelling; tuples too)."""
    try:
        sentinels = [(host, int(port)) for host, port in value]
    except (TypeError, ValueError):
        sentinels = []
    if not sentinels or not all(
        isinstance(host, str) and host and 0 < port < 65536 for host, port in sentinels
    ):
        raise ConfigError(f"setting CACHE_REDIS_SENTINELS must be a list of [host, port]; got {value!r}")
    return sentinels


def _cluster_nodes(value: Any, url: Any = None) -> list[tuple[str, int]]:
    """The cluster's startup nodes as Flask-Caching finds them: the one node of ``CACHE_REDIS_URL``
    when that is set (Flask-Caching prefers it), else ``CACHE_REDIS_CLUSTER``,
    ``"host:port,host:port"``."""
    if isinstance(url, str) and url.startswith(("redis://", "rediss://")):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        value = f"{parts.hostname}:{parts.port or 6379}"
    nodes = []
    for part in value.split(",") if isinstance(value, str) else [None]:
        host, _, port = (part or "").strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f'setting CACHE_REDIS_CLUSTER must be "host:port,host:port,..."; got {value!r}')
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def _redis_topology(config: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """Flask-Caching's keys for a Sentinel or Cluster backend, checked."""
    password = config.get("CACHE_REDIS_PASSWORD") or None
    if backend == "RedisClusterCache":
        return {
            "CACHE_REDIS_CLUSTER": _cluster_nodes(
                config.get("CACHE_REDIS_CLUSTER"), config.get("CACHE_REDIS_URL")
            ),
            "CACHE_REDIS_PASSWORD": password,
        }
    master = config.get("CACHE_REDIS_SENTINEL_MASTER", "mymaster")
    if not isinstance(master, str) or not master:
        raise ConfigError(f"setting CACHE_REDIS_SENTINEL_MASTER must be a name; got {master!r}")
    db = config.get("CACHE_REDIS_DB") or 0
    if not isinstance(db, int) or isinstance(db, bool) or db < 0:
        raise ConfigError(f"setting CACHE_REDIS_DB must be an integer >= 0; got {db!r}")
    return {
        "CACHE_REDIS_SENTINELS": _sentinel_list(config.get("CACHE_REDIS_SENTINELS", [("127.0.0.1", 26379)])),
        "CACHE_REDIS_SENTINEL_MASTER": master,
        "CACHE_REDIS_PASSWORD": password,
        "CACHE_REDIS_SENTINEL_PASSWORD": config.get("CACHE_REDIS_SENTINEL_PASSWORD") or None,
        "CACHE_REDIS_DB": db,
    }


def _topology_of(backend: Any) -> dict[str, Any]:
    """What a Flask-Caching ``RedisSentinelCache`` or ``RedisClusterCache`` object was built with."""
    client = backend._write_client
    pool: Any = getattr(client, "connection_pool", None)  # redis-py's objects, read by duck typing
    manager = getattr(pool, "sentinel_manager", None)
    if manager is not None:
        kwargs = pool.connection_kwargs
        sentinels = [
            (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in manager.sentinels
        ]
        return {
            "CACHE_TYPE": "RedisSentinelCache",
            "CACHE_REDIS_SENTINELS": sentinels,
            "CACHE_REDIS_SENTINEL_MASTER": pool.service_name,
            "CACHE_REDIS_PASSWORD": kwargs.get("password"),
            "CACHE_REDIS_SENTINEL_PASSWORD": manager.sentinel_kwargs.get("password"),
            "CACHE_REDIS_DB": kwargs.get("db", 0),
        }
    nodes_manager = client.nodes_manager
    return {
        "CACHE_TYPE": "RedisClusterCache",
        "CACHE_REDIS_CLUSTER": [(node.host, node.port) for node in nodes_manager.startup_nodes.values()],
        "CACHE_REDIS_PASSWORD": nodes_manager.connection_kwargs.get("password"),
    }


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
    client: Any = getattr(backend, "_client", None)  # pylibmc's or python-memcached's client
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
        if name in _spellings():
            break
    if isinstance(backend, cachelib.FileSystemCache):
        found.update(CACHE_TYPE="FileSystemCache", CACHE_DIR=getattr(backend, "_path", None))
    elif isinstance(backend, cachelib.SimpleCache):
        found["CACHE_TYPE"] = "SimpleCache"
    elif isinstance(backend, cachelib.MemcachedCache):
        found.update(CACHE_TYPE="MemcachedCache", CACHE_MEMCACHED_SERVERS=_memcached_addresses(backend))
    elif any(name in ("redissentinelcache", "redisclustercache") for name in names):
        found.update(_topology_of(backend))
    elif isinstance(backend, cachelib.RedisCache):
        found.update(CACHE_TYPE="RedisCache", CACHE_REDIS_URL=_redis_url_of(backend._write_client))
    else:
        raise _refuse(kind.__name__, "is not a backend Tally knows")
    return found


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
    if cache["CACHE_TYPE"] in ("RedisSentinelCache", "RedisClusterCache"):
        cache.update(_redis_topology(config, cache["CACHE_TYPE"]))
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
    if backend == "MemcachedCache" and not settings.get("CACHE_MEMCACHED_SERVERS"):
        # the cache's client did not say (another client library): the servers it was given
        settings["CACHE_MEMCACHED_SERVERS"] = _server_list(config.get("CACHE_MEMCACHED_SERVERS"))
    if backend == "RedisCache" and not settings.get("CACHE_REDIS_URL"):
        settings["CACHE_REDIS_URL"] = _redis_url_from_config(config)
    settings["COUNTER_DIR"] = os.path.abspath(
        os.path.join(app.instance_path, os.fspath(settings["COUNTER_DIR"]))
    )
    store = (
        store_class(settings["COUNTER_STORE"]) if settings["COUNTER_STORE"] else cache_type_stores()[backend]
    )
    settings["STORE"] = store.backend
    settings.update(store.check_settings(config, settings, app.instance_path))
    if settings["COUNTER_MIN_REPLICAS"] and not store.waits_for_replicas:
        waiting = ", ".join(name for name, cls in REGISTRY.items() if cls.waits_for_replicas)
        raise ConfigError(
            f"COUNTER_MIN_REPLICAS = {settings['COUNTER_MIN_REPLICAS']} needs a store with replicas"
            f" ({waiting}); the {store.backend} store has no replicas to wait for"
        )
    counter_prefix, cache_prefix = settings["COUNTER_KEY_PREFIX"], str(settings["CACHE_KEY_PREFIX"] or "")
    if store.shares_cache_keyspace and (
        counter_prefix.startswith(cache_prefix) or cache_prefix.startswith(counter_prefix)
    ):
        # cachelib's RedisCache.clear() deletes every key starting with CACHE_KEY_PREFIX.
        raise ConfigError(
            f"COUNTER_KEY_PREFIX {counter_prefix!r} and CACHE_KEY_PREFIX {cache_prefix!r} must not"
            " be prefixes of each other, or clearing the page cache would delete counters"
        )
    return settings
