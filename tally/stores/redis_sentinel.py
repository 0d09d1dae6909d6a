"""Counters on the primary that Redis Sentinel names: the Redis store's mechanisms, reached through
the sentinels, so that a failover moves the counters to the promoted replica without a restart."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from redis.sentinel import Sentinel

from .redis_store import RedisCounterStore, no_retries


class RedisSentinelCounterStore(RedisCounterStore):
    """``RedisCounterStore`` on the primary of ``master`` as the sentinels name it; replicas are
    never read (they may be behind).

    A connection asks the sentinels for the primary when it opens; one that finds the old primary
    gone or demoted (``READONLY``) fails with ``StoreUnavailable`` and the next one follows the
    sentinels to the new primary.  During a failover requests fail within the timeout; service
    returns by itself once a replica is promoted.  Each sentinel gets an equal share of the timeout,
    so asking all of them fits in one ``timeout``.

    What a failover keeps: with ``min_replicas`` 0, steps the promoted replica had not received are
    lost and their numbers handed out again; with ``min_replicas`` >= 1 every number returned had
    reached that many replicas, and Sentinel promotes the most up-to-date one it can reach.
    """

    backend = "redis-sentinel"
    cache_types = ("RedisSentinelCache",)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], instance_path: str) -> RedisSentinelCounterStore:
        return cls(
            settings["CACHE_REDIS_SENTINELS"],
            settings["CACHE_REDIS_SENTINEL_MASTER"],
            password=settings["CACHE_REDIS_PASSWORD"],
            sentinel_password=settings["CACHE_REDIS_SENTINEL_PASSWORD"],
            db=settings["CACHE_REDIS_DB"],
            key_prefix=settings["COUNTER_KEY_PREFIX"],
            timeout=settings["COUNTER_TIMEOUT"],
            pool_size=settings["COUNTER_POOL_SIZE"],
            min_replicas=settings["COUNTER_MIN_REPLICAS"],
        )

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        master: str,
        *,
        password: str | None = None,
        sentinel_password: str | None = None,
        db: int = 0,
        key_prefix: str = "tally:",
        timeout: float = 0.5,
        pool_size: int = 16,
        min_replicas: int = 0,
    ) -> None:
        self.sentinels = [(str(host), int(port)) for host, port in sentinels]
        self.master = master
        share = timeout / len(self.sentinels)
        # redis-py before 8.2 leaves Sentinel's constructor, master_for and discover_master unannotated:
        # the ignores hold on both sides of that release
        self._sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            self.sentinels,
            sentinel_kwargs={
                "socket_timeout": share,
                "socket_connect_timeout": share,
                "password": sentinel_password,
                "retry": no_retries(),
            },
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            password=password,
            db=db,
            retry=no_retries(),
        )
        # Connections open as threads need them (redis-py's sentinel pool does not block at a bound).
        self._redis = self._sentinel.master_for(master)  # type: ignore[no-untyped-call, unused-ignore]
        self._set_up(key_prefix, timeout, min_replicas)

    def where(self) -> str:
        return f"{self.master} via sentinels {','.join(f'{h}:{p}' for h, p in self.sentinels)}"

    def health(self) -> dict[str, Any]:
        details = super().health()
        with self._errors():
            host, port = self._sentinel.discover_master(self.master)  # type: ignore[no-untyped-call, unused-ignore]
        details["primary"] = f"{host}:{port}"
        return details

    def close(self) -> None:
        self._redis.connection_pool.disconnect()
        for sentinel in self._sentinel.sentinels:
            sentinel.connection_pool.disconnect()
