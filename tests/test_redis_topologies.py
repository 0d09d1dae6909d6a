"""Redis Sentinel and Redis Cluster: settings in Flask-Caching's keys, every read and write on a
primary, COUNTER_MIN_REPLICAS, and failover under load on real topologies.

The contract, shared-value, hostile-input and gunicorn race suites run on both topologies through
``tests/conftest.py`` (backends ``redis-sentinel`` and ``redis-cluster``); this file holds what is
particular to them.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis
from flask import Flask
from flask_caching import Cache

from common import counters
from tally import ConfigError, Counters, ReplicationUnconfirmed, StoreUnavailable
from tally.loadcheck import run_load
from tests.conftest import settings_env
from tests.fault_load import Load, repeats, serve_again, summary
from tests.fault_load import lost as lost_after_promotion
from tests.redis_topologies import MASTER_NAME, ClusterTopology, SentinelTopology, command, wait_until

TIMEOUT = 0.5
#: Failover rounds, each on a fresh topology: 1 in make test, more in make stress.
STRESS_ROUNDS = int(os.environ.get("TALLY_STRESS_ROUNDS", "1"))


def sentinel_settings(topology: SentinelTopology, **extra) -> dict:
    return {
        "CACHE_TYPE": "RedisSentinelCache",
        "CACHE_REDIS_SENTINELS": topology.sentinel_addresses,
        "CACHE_REDIS_SENTINEL_MASTER": MASTER_NAME,
        "COUNTER_TIMEOUT": TIMEOUT,
        **extra,
    }


def cluster_settings(topology: ClusterTopology, **extra) -> dict:
    return {
        "CACHE_TYPE": "RedisClusterCache",
        "CACHE_REDIS_CLUSTER": topology.startup_nodes,
        "COUNTER_TIMEOUT": TIMEOUT,
        **extra,
    }


def cut_replication(primary_port: int, replicas) -> None:
    """Make the replicas fall behind for as long as they stay paused: stop them, then close their
    links on the primary (a stopped replica's socket buffer would otherwise still take in the
    stream, losing nothing)."""
    for replica in replicas:
        replica.pause()
    command(primary_port, "CLIENT", "KILL", "TYPE", "replica")


# -- settings -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings,message",
    [
        (
            {"CACHE_TYPE": "RedisSentinelCache", "CACHE_REDIS_SENTINELS": "127.0.0.1:26379"},
            "CACHE_REDIS_SENTINELS",
        ),
        (
            {"CACHE_TYPE": "RedisSentinelCache", "CACHE_REDIS_SENTINELS": [["127.0.0.1", "x"]]},
            "CACHE_REDIS_SENTINELS",
        ),
        (
            {"CACHE_TYPE": "RedisSentinelCache", "CACHE_REDIS_SENTINEL_MASTER": ""},
            "CACHE_REDIS_SENTINEL_MASTER",
        ),
        ({"CACHE_TYPE": "RedisClusterCache", "CACHE_REDIS_CLUSTER": "127.0.0.1"}, "CACHE_REDIS_CLUSTER"),
        ({"CACHE_TYPE": "RedisClusterCache", "CACHE_REDIS_CLUSTER": ""}, "CACHE_REDIS_CLUSTER"),
        (
            {"CACHE_TYPE": "RedisClusterCache", "CACHE_REDIS_CLUSTER": "a:1", "COUNTER_MIN_REPLICAS": -1},
            "COUNTER_MIN_REPLICAS",
        ),
        (
            {"CACHE_TYPE": "RedisClusterCache", "CACHE_REDIS_CLUSTER": "a:1", "COUNTER_MIN_REPLICAS": True},
            "COUNTER_MIN_REPLICAS",
        ),
        ({"CACHE_TYPE": "FileSystemCache", "COUNTER_MIN_REPLICAS": 1}, "needs a store with replicas"),
        (
            {"CACHE_TYPE": "RedisSentinelCache", "COUNTER_KEY_PREFIX": "flask_cache_t:"},
            "must not be prefixes",
        ),
    ],
)
def test_bad_topology_settings_fail_at_start_up_naming_the_key(tmp_path, settings, message):
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(settings)
    with pytest.raises(ConfigError, match=message):
        Counters(app)


@pytest.mark.parametrize(
    "spelling", ["RedisSentinelCache", "redissentinel", "flask_caching.backends.RedisSentinelCache"]
)
def test_every_spelling_of_sentinel_names_the_sentinel_store(tmp_path, sentinel_topology, spelling):
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(sentinel_settings(sentinel_topology, CACHE_TYPE=spelling))
    Counters(app)
    assert app.extensions["tally"].backend == "redis-sentinel"


@pytest.mark.parametrize("topology", ["sentinel", "cluster"])
def test_counters_follow_a_flask_caching_topology_set_up_through_init_app(
    tmp_path, request, sentinel_topology, cluster_topology, topology
):
    """``Counters(cache)`` reads the servers from the Flask-Caching object itself, wherever its
    settings were given (here: only in ``init_app``'s config, never in app.config)."""
    settings = (
        sentinel_settings(sentinel_topology) if topology == "sentinel" else cluster_settings(cluster_topology)
    )
    app = Flask(__name__, instance_path=str(tmp_path))
    cache = Cache()
    cache.init_app(app, config={**settings, "CACHE_KEY_PREFIX": "page:"})
    mine = Counters(cache)
    mine.init_app(app)
    store = app.extensions["tally"]
    assert store.backend == f"redis-{topology}"
    with app.app_context():
        assert mine.incr("followed") == 1
        cache.set("page", "cached")
        assert cache.get("page") == "cached"
    store.close()


# -- every read and write on the primary --------------------------------------------------------------


def test_sentinel_reads_and_writes_the_primary_even_with_every_replica_stopped(make_app, sentinel_topology):
    """With COUNTER_MIN_REPLICAS = 0 nothing waits for replicas, and nothing is read from one: with
    both replicas stopped, reads and writes still answer at once, from the primary."""
    app = make_app(sentinel_settings(sentinel_topology, COUNTER_KEY_PREFIX="primary-only:"))
    raw = redis.Redis(port=sentinel_topology.current_primary().port)
    for replica in sentinel_topology.replicas:
        replica.pause()
    try:
        with app.app_context():
            assert counters.incr("p", 5) == 5
            raw.incrby("primary-only:p", 10)  # on the primary only: a replica read would miss it
            began = time.monotonic()
            assert counters.get("p") == 15
            assert time.monotonic() - began < TIMEOUT
    finally:
        for replica in sentinel_topology.replicas:
            replica.resume()
        raw.close()


@pytest.mark.parametrize("backend", ["redis-sentinel", "redis-cluster"])
def test_min_replicas_one_confirms_steps_while_replicas_keep_up(make_app, store_settings, backend):
    app = make_app({**store_settings(backend), "COUNTER_MIN_REPLICAS": 1})
    client = app.test_client()
    assert [client.post("/api/counters/w/incr").get_json()["value"] for _ in range(5)] == [1, 2, 3, 4, 5]
    assert client.post("/api/shared/s/add", json={"member": "m"}).status_code == 200
    health = client.get("/healthz").get_json()
    assert health["status"] == "ok"


def test_an_unconfirmed_step_is_a_503_outcome_unknown_and_never_a_number(make_app, tmp_path):
    """Replicas stopped and cut off: the primary applies the step, but WAIT comes back short, so the
    caller gets 503 within the timeout and no number; once replication resumes, steps confirm
    again."""
    topology = SentinelTopology().start()
    try:
        app = make_app(sentinel_settings(topology, COUNTER_MIN_REPLICAS=1, COUNTER_KEY_PREFIX="wait:"))
        client = app.test_client()
        assert client.post("/api/counters/c/incr").get_json()["value"] == 1
        cut_replication(topology.primary.port, topology.replicas)
        began = time.monotonic()
        response = client.post("/api/counters/c/incr")
        took = time.monotonic() - began
        assert response.status_code == 503, response.get_json()
        assert response.get_json()["error"] == "outcome_unknown"
        assert "value" not in response.get_json()
        assert took < 2 * TIMEOUT
        with app.app_context(), pytest.raises(ReplicationUnconfirmed):
            counters.decr("c")
        for replica in topology.replicas:
            replica.resume()
        deadline = time.monotonic() + 20
        while (
            status := client.post("/api/counters/c/incr").status_code
        ) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status == 200
    finally:
        topology.remove()


# -- cluster specifics ----------------------------------------------------------------------------------


def test_counters_spread_over_the_primaries_of_a_cluster(serve, store_settings, cluster_topology):
    """Forty counters stepped through gunicorn land on at least two of the three primaries, each
    exact; per-client counters and shared values work on the same cluster."""
    settings = store_settings("redis-cluster")
    server = serve(settings_env(settings), workers=2, threads=8)
    names = [f"spread{n}" for n in range(40)]
    reports = {}

    def drive(name: str) -> None:
        reports[name] = run_load(f"{server.url}/api/counters/{name}/incr", clients=2, requests=5)

    threads = [threading.Thread(target=drive, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(report.exact() for report in reports.values())
    prefix = settings["COUNTER_KEY_PREFIX"]
    holding = [
        primary.address
        for primary in cluster_topology.primaries()
        if command(primary.port, "--scan", "--pattern", f"{prefix}spread*").split()
    ]
    assert len(holding) >= 2, holding


@pytest.mark.parametrize("backend", ["redis-sentinel", "redis-cluster"])
def test_rate_limits_and_server_side_sessions_live_on_the_topology(
    make_app, store_settings, backend, request
):
    settings = {**store_settings(backend), "RATELIMIT_ENABLED": True, "SESSION_BACKEND": "server"}
    app = make_app(settings, RATELIMIT_DEFAULT="3 per minute")
    client = app.test_client()
    statuses = [client.post("/api/me/counters/mine/incr").status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert app.config["RATELIMIT_STORAGE_URI"] == "tally://"  # the counters' store: the topology
    store = app.extensions["tally"]
    keys = [key for client_ in store._primaries() for key in client_.scan_iter("*")]
    assert any(b"@rl." in key for key in keys), keys[:20]  # a limit's key (tally.ratelimits)
    assert any(key.startswith(b"tally-session:") for key in keys), keys[:20]


def test_a_topology_that_cannot_be_reached_answers_503_within_the_timeout(make_app, tmp_path):
    from tests.servers import free_port

    for settings in (
        {"CACHE_TYPE": "RedisClusterCache", "CACHE_REDIS_CLUSTER": f"127.0.0.1:{free_port()}"},
        {"CACHE_TYPE": "RedisSentinelCache", "CACHE_REDIS_SENTINELS": [["127.0.0.1", free_port()]]},
    ):
        app = Flask(__name__, instance_path=str(tmp_path))
        app.config.update(settings, COUNTER_TIMEOUT=TIMEOUT)
        Counters(app)  # nothing is contacted at start-up
        with app.app_context():
            began = time.monotonic()
            with pytest.raises(StoreUnavailable):
                counters.incr("x")
            assert time.monotonic() - began < 2 * TIMEOUT
        app.extensions["tally"].close()


# -- failover under load ------------------------------------------------------------------------------


def failover_under_load(
    urls: dict[str, str], topology, old, replicas, *, rejoin: bool = False
) -> dict[str, dict]:
    """Four seconds of load on every url (8 clients each): after 1.5 s the replicas fall behind,
    after 3 s the primary is killed.  Then the replicas come back, a replica is promoted (and with
    ``rejoin`` the old primary restarts, to come back as its replica), each url is asked until it
    answers 200 again, and 8 x 30 more requests follow.  Returns, per url, every value answered
    with a 200 and the statuses."""
    outcome = {
        label: {"values": [], "before": [], "after": [], "statuses": {}, "slowest": 0.0} for label in urls
    }
    phase = "before"

    def record(label: str, report) -> None:
        outcome[label]["values"] += report.values
        outcome[label][phase] += report.values
        outcome[label]["slowest"] = max([outcome[label]["slowest"], *report.latencies])
        for status, count in report.statuses.items():
            outcome[label]["statuses"][status] = outcome[label]["statuses"].get(status, 0) + count

    def drive(label: str, url: str) -> None:
        record(label, run_load(url, clients=8, requests=100_000, deadline=4.0, timeout=10))

    drivers = [threading.Thread(target=drive, args=item) for item in urls.items()]
    for driver in drivers:
        driver.start()
    time.sleep(1.5)
    cut_replication(old.port, replicas)
    time.sleep(1.5)
    old.kill()
    for driver in drivers:
        driver.join(timeout=60)
    for replica in replicas:
        replica.resume()
    topology.wait_for_promotion(old)
    phase = "after"
    if rejoin:
        old.start()
    for label, url in urls.items():
        deadline = time.monotonic() + 30
        while 200 not in (report := run_load(url, clients=1, requests=1, timeout=10)).statuses:
            record(label, report)
            assert time.monotonic() < deadline, f"{label}: no 200 within 30 s of the promotion"
            time.sleep(0.2)
        record(label, report)
        record(label, run_load(url, clients=8, requests=30, timeout=10))
    return outcome


def lost(outcome: dict) -> int:
    """Numbers answered with a 200 before the failover that the promoted replica never had: each is
    handed out again as the counter climbs back past it."""
    if not outcome["after"]:
        return 0
    first_after = min(outcome["after"])
    return sum(1 for value in outcome["before"] if value >= first_after)


def assert_failover_outcome(outcome: dict[str, dict]) -> tuple[int, int]:
    """``waiting`` (COUNTER_MIN_REPLICAS = 1) loses no acknowledged step, hands out no number twice,
    answers 503 during the switch and serves again after the promotion; ``plain`` (0) is the known
    trap and must show lost steps and repeats, or the check proves nothing.  Returns ``plain``'s
    lost steps and repeated numbers."""
    waiting, plain = outcome["waiting"], outcome["plain"]
    assert set(waiting["statuses"]) <= {200, 503} and set(plain["statuses"]) <= {200, 503}, (
        waiting["statuses"],
        plain["statuses"],
    )
    assert repeats(waiting["values"]) == 0, f"min_replicas 1 repeated {repeats(waiting['values'])} numbers"
    assert lost(waiting) == 0 and waiting["after"], "min_replicas 1 lost acknowledged steps"
    assert waiting["statuses"].get(503, 0) > 0  # the switch was seen
    # Every answer within the timeout, with room for a loaded machine (a hang would be seconds to minutes).
    assert max(waiting["slowest"], plain["slowest"]) < 2 * TIMEOUT + 1.0, (
        waiting["slowest"],
        plain["slowest"],
    )
    assert lost(plain) > 0 and repeats(plain["values"]) > 0, "min_replicas 0 lost nothing: no trap shown"
    print(
        f"\nfailover, min_replicas 0: {lost(plain)} acknowledged steps lost,"
        f" {repeats(plain['values'])} numbers already handed out again in the"
        f" {len(plain['after'])} requests after; min_replicas 1: 0 lost,"
        f" 0 repeated, {waiting['statuses'].get(503, 0)} 503s; slowest answers {waiting['slowest']:.2f} s,"
        f" {plain['slowest']:.2f} s"
    )
    return lost(plain), repeats(plain["values"])


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(STRESS_ROUNDS))
def test_sentinel_failover_under_load_hands_out_no_number_twice_with_min_replicas(serve, round_):
    """Replicas fall behind (stopped, links cut), load runs, the primary is killed, the replicas come
    back and Sentinel promotes one.  Two app servers share the topology: one with
    COUNTER_MIN_REPLICAS = 1, one with 0 (the naive variant)."""
    topology = SentinelTopology().start()
    try:
        servers = {
            label: serve(
                settings_env(
                    sentinel_settings(topology, COUNTER_MIN_REPLICAS=replicas, COUNTER_KEY_PREFIX=f"{label}:")
                ),
                workers=2,
                threads=8,
            )
            for label, replicas in (("waiting", 1), ("plain", 0))
        }
        urls = {label: f"{server.url}/api/counters/failover/incr" for label, server in servers.items()}
        assert_failover_outcome(failover_under_load(urls, topology, topology.primary, topology.replicas))
    finally:
        topology.remove()


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(STRESS_ROUNDS))
def test_cluster_failover_under_load_hands_out_no_number_twice_with_min_replicas(serve, round_):
    """As for Sentinel, on the primary that holds the counter: both servers' prefixes carry one hash
    tag, so their keys share a slot and go through the same failover."""
    topology = ClusterTopology().start()
    try:
        servers = {
            label: serve(
                settings_env(
                    cluster_settings(
                        topology, COUNTER_MIN_REPLICAS=replicas, COUNTER_KEY_PREFIX=f"{label}{{fo}}:"
                    )
                ),
                workers=2,
                threads=8,
            )
            for label, replicas in (("waiting", 1), ("plain", 0))
        }
        urls = {label: f"{server.url}/api/counters/failover/incr" for label, server in servers.items()}
        old = topology.owner_of("waiting{fo}:failover")
        assert old is topology.owner_of("plain{fo}:failover")
        # One replica per shard: the promoted one has none left, so with COUNTER_MIN_REPLICAS = 1 its
        # writes wait (503) until the old primary restarts and rejoins as its replica.
        outcome = failover_under_load(urls, topology, old, topology.replicas_of(old), rejoin=True)
        assert_failover_outcome(outcome)
    finally:
        topology.remove()


# -- a partition --------------------------------------------------------------------------------------

PARTITION_TIMEOUT = 1.0  # the clients reach the primary through a Python proxy: a little more room


def sentinel_partition(serve) -> dict[str, Load]:
    """Per variant (``waiting``: COUNTER_MIN_REPLICAS = 1; ``plain``: 0, the naive variant), two
    apps on one counter: ``majority`` asks the sentinels, and reaches the primary through the link
    the replicas and the sentinels use too; ``minority`` stands for the clients the partition leaves
    beside the old primary, cut off from the sentinels: it keeps writing to the primary straight.
    After 1 s of load the link is cut; the sentinels promote a replica; 2.5 s more load follow.
    Then the partition heals (the old primary rejoins as a replica, its own writes discarded) and
    each ``majority`` is asked again.  Both variants share the topology, on keys of their own."""
    topology = SentinelTopology(partitionable=True).start()
    assert topology.primary_link is not None
    loads: dict[str, Load] = {}
    try:
        for variant, replicas in (("waiting", 1), ("plain", 0)):
            common = {
                "COUNTER_MIN_REPLICAS": replicas,
                "COUNTER_KEY_PREFIX": f"{variant}:",
                "COUNTER_TIMEOUT": PARTITION_TIMEOUT,
            }
            minority_settings = {
                "CACHE_TYPE": "RedisCache",
                "CACHE_REDIS_URL": f"redis://{topology.primary.address}/0",
            }
            majority = serve(settings_env(sentinel_settings(topology, **common)), workers=1, threads=8)
            minority = serve(settings_env({**minority_settings, **common}), workers=1, threads=8)
            loads[variant] = Load(
                {
                    "majority": f"{majority.url}/api/counters/split/incr",
                    "minority": f"{minority.url}/api/counters/split/incr",
                },
                clients=3,
            )
        old = topology.primary
        with loads["waiting"], loads["plain"]:
            time.sleep(1.0)
            for load in loads.values():
                load.mark("isolated")
            topology.primary_link.cut()
            topology.wait_for_promotion(old)
            for load in loads.values():
                load.mark("promoted")
            time.sleep(2.5)
        topology.primary_link.reset()
        topology.primary_link.heal()
        wait_until(lambda: old.info().get("role") == "slave", "the old primary rejoining as a replica")
        for load in loads.values():
            serve_again(load, "majority")
        return loads
    finally:
        topology.remove()


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(STRESS_ROUNDS))
def test_a_sentinel_partition_with_min_replicas_one_acknowledges_nothing_on_the_cut_off_side(
    serve, round_, capsys
):
    """With COUNTER_MIN_REPLICAS = 1 the old primary, cut off from its replicas, cannot confirm a
    write: the minority's steps are 503s, and nothing acknowledged is lost or handed out twice.
    With 0 (the naive variant, beside it) both sides acknowledge steps during the partition; the
    old primary's are discarded when it rejoins, and their numbers come twice.  What a run
    measures goes in the guarantees table beside PostgreSQL's."""
    loads = sentinel_partition(serve)
    with capsys.disabled():
        for variant, load in loads.items():
            values = load.values("majority") + load.values("minority")
            print(
                f"\nsentinel partition, {variant}: {summary(load, 'majority')}; {summary(load, 'minority')};"
                f" lost {lost_after_promotion(load, 'majority')}, handed out twice {repeats(values)}"
            )
    waiting, plain = loads["waiting"], loads["plain"]
    values = waiting.values("majority") + waiting.values("minority")
    assert repeats(values) == 0 and lost_after_promotion(waiting, "majority") == 0
    assert not waiting.values("minority", sent_after=waiting.events["isolated"] + 0.1)
    assert waiting.values("majority", sent_after=waiting.events["promoted"]), "no 200 after the promotion"
    for label in ("majority", "minority"):
        assert set(waiting.statuses(label)) <= {200, 503}, waiting.statuses(label)
        assert waiting.slowest(label) < 2 * PARTITION_TIMEOUT + 1.0, waiting.slowest(label)
    assert lost_after_promotion(plain, "majority") > 0
    assert repeats(plain.values("majority") + plain.values("minority")) > 0
