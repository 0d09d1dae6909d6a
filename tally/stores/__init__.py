"""Counter stores, one module per backend, chosen once: ``COUNTER_STORE`` when set, else the
Flask-Caching ``CACHE_TYPE``."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from .base import INT64_MAX, INT64_MIN, CounterStore

__all__ = ["BACKENDS", "INT64_MAX", "INT64_MIN", "CounterStore", "build_store"]


def _filesystem(config: Mapping[str, Any], instance_path: str) -> CounterStore:
    from .filesystem import FileCounterStore

    return FileCounterStore(
        config["COUNTER_DIR"],
        fsync=config["COUNTER_FSYNC"],
        sweep_interval=config["COUNTER_SWEEP_INTERVAL"],
    )


def _memory(config: Mapping[str, Any], instance_path: str) -> CounterStore:
    from .memory import MemoryCounterStore

    return MemoryCounterStore(lock_path=os.path.join(instance_path, "memory-store.lock"))


def _memcached(config: Mapping[str, Any], instance_path: str) -> CounterStore:
    from .memcached import MemcachedCounterStore

    return MemcachedCounterStore(
        config["CACHE_MEMCACHED_SERVERS"],
        key_prefix=config["COUNTER_KEY_PREFIX"],
        timeout=config["COUNTER_TIMEOUT"],
        pool_size=config["COUNTER_POOL_SIZE"],
    )


def _redis(config: Mapping[str, Any], instance_path: str) -> CounterStore:
    from .redis_store import RedisCounterStore

    return RedisCounterStore(
        config["CACHE_REDIS_URL"],
        key_prefix=config["COUNTER_KEY_PREFIX"],
        timeout=config["COUNTER_TIMEOUT"],
        pool_size=config["COUNTER_POOL_SIZE"],
        min_replicas=config["COUNTER_MIN_REPLICAS"],
    )


def _redis_sentinel(config: Mapping[str, Any], instance_path: str) -> CounterStore:
    from .redis_sentinel import RedisSentinelCounterStore

    return RedisSentinelCounterStore(
        config["CACHE_REDIS_SENTINELS"],
        config["CACHE_REDIS_SENTINEL_MASTER"],
        password=config["CACHE_REDIS_PASSWORD"],
        sentinel_password=config["CACHE_REDIS_SENTINEL_PASSWORD"],
        db=config["CACHE_REDIS_DB"],
        key_prefix=config["COUNTER_KEY_PREFIX"],
        timeout=config["COUNTER_TIMEOUT"],
        pool_size=config["COUNTER_POOL_SIZE"],
        min_replicas=config["COUNTER_MIN_REPLICAS"],
    )


def _redis_cluster(config: Mapping[str, Any], instance_path: str) -> CounterStore:
    from .redis_cluster import RedisClusterCounterStore

    return RedisClusterCounterStore(
        config["CACHE_REDIS_CLUSTER"],
        password=config["CACHE_REDIS_PASSWORD"],
        key_prefix=config["COUNTER_KEY_PREFIX"],
        timeout=config["COUNTER_TIMEOUT"],
        pool_size=config["COUNTER_POOL_SIZE"],
        min_replicas=config["COUNTER_MIN_REPLICAS"],
    )


def _sql(config: Mapping[str, Any], instance_path: str) -> CounterStore:
    from .sql import SqlCounterStore

    return SqlCounterStore(
        config["SQLALCHEMY_DATABASE_URI"],
        key_prefix=config["COUNTER_KEY_PREFIX"],
        timeout=config["COUNTER_TIMEOUT"],
        pool_size=config["COUNTER_POOL_SIZE"],
        fsync=config["COUNTER_FSYNC"],
        sweep_interval=config["COUNTER_SWEEP_INTERVAL"],
    )


def _manager(config: Mapping[str, Any], instance_path: str) -> CounterStore:
    from .manager import ManagerCounterStore

    return ManagerCounterStore(
        config["COUNTER_MANAGER_ADDRESS"],
        config["COUNTER_MANAGER_AUTHKEY"],
        key_prefix=config["COUNTER_KEY_PREFIX"],
        timeout=config["COUNTER_TIMEOUT"],
        pool_size=config["COUNTER_POOL_SIZE"],
    )


#: Flask-Caching backend name -> builder of the counter store that goes with it.
BACKENDS: dict[str, Callable[[Mapping[str, Any], str], CounterStore]] = {
    "FileSystemCache": _filesystem,
    "SimpleCache": _memory,
    "MemcachedCache": _memcached,
    "RedisCache": _redis,
    "RedisSentinelCache": _redis_sentinel,
    "RedisClusterCache": _redis_cluster,
    "sql": _sql,  # COUNTER_STORE = "sql"
    "manager": _manager,  # COUNTER_STORE = "manager"
}


def build_store(config: Mapping[str, Any], instance_path: str) -> CounterStore:
    """The one place that knows which backend is configured.  ``config`` is already checked;
    ``instance_path`` is the app's instance folder."""
    backend = config["STORE"]
    try:
        builder = BACKENDS[backend]
    except KeyError:
        raise ValueError(
            f"CACHE_TYPE {backend!r} has no counter store; use one of {', '.join(BACKENDS)}"
        ) from None
    return builder(config, instance_path)
