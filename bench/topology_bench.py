"""The Redis Sentinel and Cluster rows of ``make bench``: the helper's ``incr`` with
``COUNTER_MIN_REPLICAS`` 0 and 1 on Sentinel's primary, call by call against redis-py's own
``INCRBY`` (and ``INCRBY`` + ``WAIT 1`` in one round trip, the same work done raw); and the
environments of the HTTP counter route on both topologies, for bench.py's route-against-bare table."""

from __future__ import annotations

import json

import redis

from tally.stores.redis_sentinel import RedisSentinelCounterStore
from tests.redis_topologies import MASTER_NAME, ClusterTopology, SentinelTopology


def start_topologies(only: set[str]) -> tuple[SentinelTopology | None, ClusterTopology | None]:
    sentinel = SentinelTopology().start() if "redis-sentinel" in only else None
    try:
        cluster = ClusterTopology().start() if "redis-cluster" in only else None
    except BaseException:
        if sentinel is not None:
            sentinel.remove()
        raise
    return sentinel, cluster


def _raw_incr_and_wait(client: redis.Redis):
    def step() -> object:
        with client.pipeline(transaction=False) as pipe:
            pipe.incrby("raw-wait", 1)
            pipe.execute_command("WAIT", 1, 400)
            return pipe.execute()

    return step


def sentinel_rows(row, interleaved, seconds: float, topology: SentinelTopology) -> None:
    """Append the Sentinel helper rows through ``row`` (bench.py's)."""
    raw = redis.Redis(port=topology.current_primary().port)
    raw_wait = _raw_incr_and_wait(raw)
    for replicas in (0, 1):
        store = RedisSentinelCounterStore(
            [tuple(address) for address in topology.sentinel_addresses],
            MASTER_NAME,
            key_prefix=f"bench{replicas}:",
            timeout=2.0,
            min_replicas=replicas,
        )
        references = [("redis-py incrby", lambda: raw.incrby("raw", 1), ">= 0.90x" if not replicas else "")]
        if replicas:
            references.append(("redis-py incrby + WAIT 1, one round trip", raw_wait, ">= 0.90x"))
        for reference, raw_step, target in references:
            helper_rate, raw_rate, ratio = interleaved(
                lambda store=store: store.add("c", 1), raw_step, seconds
            )
            row(f"redis-sentinel raw {reference} (median call)", raw_rate, "ops/s")
            row(
                f"redis-sentinel helper incr, COUNTER_MIN_REPLICAS={replicas} (median call)",
                helper_rate,
                "ops/s",
                f"raw {reference}, call by call",
                f"{ratio:.2f}x",
                target,
            )
        store.close()
    raw.close()


def http_environments(sentinel: SentinelTopology | None, cluster: ClusterTopology | None, prefix: str):
    """(name, environment) of the demo app on each topology, for the HTTP comparison."""
    found = []
    if sentinel is not None:
        for replicas in (0, 1):
            found.append(
                (
                    f"redis-sentinel, min_replicas {replicas}",
                    {
                        "FLASK_CACHE_TYPE": "RedisSentinelCache",
                        "FLASK_CACHE_REDIS_SENTINELS": json.dumps(sentinel.sentinel_addresses),
                        "FLASK_CACHE_REDIS_SENTINEL_MASTER": MASTER_NAME,
                        "FLASK_COUNTER_MIN_REPLICAS": str(replicas),
                        "FLASK_COUNTER_KEY_PREFIX": f"{prefix}s{replicas}:",
                    },
                )
            )
    if cluster is not None:
        found.append(
            (
                "redis-cluster",
                {
                    "FLASK_CACHE_TYPE": "RedisClusterCache",
                    "FLASK_CACHE_REDIS_CLUSTER": cluster.startup_nodes,
                    "FLASK_COUNTER_KEY_PREFIX": f"{prefix}c:",
                },
            )
        )
    return found
