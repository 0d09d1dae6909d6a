"""The Redis store on a real server: its own overflow check, damaged values, key namespacing."""

from __future__ import annotations

import pytest
import redis

from tally import CorruptCounter, Overflow, StoreUnavailable
from tally.stores.base import INT64_MAX
from tally.stores.redis_store import RedisCounterStore
from tests.servers import free_port


@pytest.fixture
def raw(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def test_keys_carry_the_counter_prefix(redis_server, raw):
    store = RedisCounterStore(redis_server.url, key_prefix="ns1:")
    store.add("k", 3)
    assert raw.get("ns1:k") == b"3"
    assert raw.get("k") is None


def test_redis_refuses_an_overflowing_step_and_keeps_the_value(redis_server, raw):
    store = RedisCounterStore(redis_server.url, key_prefix="ovf:")
    store.set("top", INT64_MAX)
    with pytest.raises(Overflow):
        store.add("top", 1)
    assert raw.get("ovf:top") == str(INT64_MAX).encode()


def test_a_value_that_is_not_a_counter_is_reported(redis_server, raw):
    store = RedisCounterStore(redis_server.url, key_prefix="bad:")
    raw.set("bad:c", "not a number")
    raw.rpush("bad:l", "x")
    for key in ("c", "l"):
        with pytest.raises(CorruptCounter):
            store.add(key, 1)
    with pytest.raises(CorruptCounter):
        store.get("c")
    assert raw.get("bad:c") == b"not a number"


def test_a_client_counter_gets_its_lifetime_on_every_write(redis_server, raw):
    store = RedisCounterStore(redis_server.url, key_prefix="ttl:")
    store.add("@0123456789abcdef0123456789abcdef.c", 1, ttl=100)
    store.add("forever", 1)
    assert 90 <= raw.ttl("ttl:@0123456789abcdef0123456789abcdef.c") <= 100
    assert raw.ttl("ttl:forever") == -1  # no expiry at all


def test_a_closed_port_fails_at_once_with_store_unavailable():
    store = RedisCounterStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(StoreUnavailable, match="refused"):
        store.add("x", 1)
    with pytest.raises(StoreUnavailable):
        store.health()


def test_a_step_no_replica_confirms_is_outcome_unknown_not_a_number(redis_server, raw):
    """The test server has no replica: with min_replicas 1 the primary applies the step, WAIT comes
    back short within the timeout, and the caller gets ReplicationUnconfirmed (a 503), never 1."""
    import time

    from tally import ReplicationUnconfirmed

    store = RedisCounterStore(redis_server.url, key_prefix="wait1:", timeout=0.5, min_replicas=1)
    # Each a short count, never a timeout of the connection (that is a 503 too, but no longer "outcome
    # unknown"): WAIT's own timeout leaves room for Redis answering it up to 100 ms late.
    for _ in range(5):
        began = time.monotonic()
        with pytest.raises(ReplicationUnconfirmed, match="0 of the 1 replicas"):
            store.add("c", 1)
        assert time.monotonic() - began < 1.0
    assert raw.get("wait1:c") == b"5"  # applied on the primary: the outcome is unknown, not undone
    with pytest.raises(ReplicationUnconfirmed):
        store.update_value("v", lambda current: b"x")
    assert store.get("c") == 5  # reads do not wait
