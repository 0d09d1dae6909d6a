"""Counters on a Redis Cluster: the Redis store's mechanisms, each sent to the primary that owns the
key's slot, so counters spread over every primary."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import redis
from redis.cluster import ClusterNode, RedisCluster

from .redis_store import RedisCounterStore, no_retries

#: How many times one call follows a ``MOVED`` redirect to the slot's new owner.
MAX_REDIRECTS = 3

T = TypeVar("T")


class RedisClusterCounterStore(RedisCounterStore):
    """``RedisCounterStore`` on a cluster: every step runs on the primary that owns its key's slot,
    never on a replica, on that node's own connection (so ``WAIT`` follows the write it confirms).

    Every step touches one key (a counter; a per-client counter and its lifetime, in one script; a
    shared value's compare-and-set), so no hash tags are needed and nothing spans two slots.

    A ``MOVED`` reply means the command was not run: it is sent again to the new owner (at most
    ``MAX_REDIRECTS`` times).  Anything else that fails (a dead primary, a timeout, ``ASK`` during a
    resharding, ``CLUSTERDOWN``) raises ``StoreUnavailable`` within the timeout, and the next call
    first reloads the slot map, so service returns by itself once the cluster has promoted a replica.
    The cluster is first contacted on the first call, not at start-up.
    """

    backend = "redis-cluster"
    cache_types = ("RedisClusterCache",)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], instance_path: str) -> RedisClusterCounterStore:
        return cls(
            settings["CACHE_REDIS_CLUSTER"],
            password=settings["CACHE_REDIS_PASSWORD"],
            key_prefix=settings["COUNTER_KEY_PREFIX"],
            timeout=settings["COUNTER_TIMEOUT"],
            pool_size=settings["COUNTER_POOL_SIZE"],
            min_replicas=settings["COUNTER_MIN_REPLICAS"],
        )

    def __init__(
        self,
        nodes: list[tuple[str, int]],
        *,
        password: str | None = None,
        key_prefix: str = "tally:",
        timeout: float = 0.5,
        pool_size: int = 16,
        min_replicas: int = 0,
    ) -> None:
        self.nodes = [(str(host), int(port)) for host, port in nodes]
        self._password = password or None
        self._retry = no_retries()
        self._cluster: RedisCluster | None = None
        self._reload_slots = False
        self._lock = threading.Lock()
        self._set_up(key_prefix, timeout, min_replicas)

    def _client(self) -> RedisCluster:
        """The cluster client, built on first use; the slot map reloaded after a failed call."""
        with self._lock:
            if self._cluster is None:
                self._cluster = RedisCluster(
                    # redis-py leaves ClusterNode's constructor unannotated
                    startup_nodes=[ClusterNode(host, port) for host, port in self.nodes],  # type: ignore[no-untyped-call]
                    password=self._password,
                    socket_timeout=self.timeout,
                    socket_connect_timeout=self.timeout,
                    retry=self._retry,
                    require_full_coverage=False,
                )
                self._reload_slots = False
            elif self._reload_slots:
                self._reload_slots = False
                self._cluster.nodes_manager.initialize()
            return self._cluster

    def _on_primary(self, rkey: str, run: Callable[[redis.Redis], T]) -> T:
        for _ in range(MAX_REDIRECTS):
            cluster = self._client()
            # redis-py leaves get_node_from_key, get_primaries and execute_command unannotated
            client = cluster.get_redis_connection(cluster.get_node_from_key(rkey))  # type: ignore[no-untyped-call]
            try:
                return run(client)
            except redis.exceptions.MovedError:
                self._reload_slots = True  # not run: safe to send to the new owner
            except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ClusterError):
                self._reload_slots = True
                raise
        raise redis.exceptions.ClusterError(f"the slot of {rkey!r} moved {MAX_REDIRECTS} times in one call")

    def _primaries(self) -> list[redis.Redis]:
        try:
            cluster = self._client()
            return [cluster.get_redis_connection(node) for node in cluster.get_primaries()]  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError):
            self._reload_slots = True
            raise

    def where(self) -> str:
        return "cluster " + ",".join(f"{host}:{port}" for host, port in self.nodes)

    def health(self) -> dict[str, Any]:
        details = super().health()
        with self._errors():
            cluster = self._client()
            primaries = cluster.get_primaries()  # type: ignore[no-untyped-call]
            details["primaries"] = sorted(node.name for node in primaries)
            info = cluster.get_redis_connection(primaries[0]).execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
            details["cluster_state"] = info.get("cluster_state")
        return details

    def close(self) -> None:
        with self._lock:
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None
