"""What an error response may say: what happened and what to do, never where the store lives.

A store's error message names its servers, ports, socket paths, database users and URLs; that goes
to the operator's log (and to ``/healthz`` with a token), never into a 4xx or 5xx body that any client
on the internet can read.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3

import pytest

from tally import StoreUnavailable
from tests.conftest import SHARED_BACKENDS
from tests.redis_topologies import command
from tests.servers import free_port

#: A user, a database and a Sentinel service name that no public answer may repeat.
USER, DATABASE, SERVICE = "secretuser", "secretdb", "secret-master"


def unreachable(backend: str, tmp_path, port: int) -> dict:
    """Settings for ``backend`` whose store cannot answer: a closed loopback port, a socket path
    with no manager, a database locked by another connection, a counter directory taken away."""
    base = {"COUNTER_DIR": str(tmp_path / "counters"), "CACHE_DIR": str(tmp_path / "cache")}
    address = f"127.0.0.1:{port}"
    return {
        "filesystem": {},
        "memcached": {"CACHE_TYPE": "MemcachedCache", "CACHE_MEMCACHED_SERVERS": [address]},
        "redis": {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": f"redis://{USER}:pw@{address}/3"},
        "redis-sentinel": {
            "CACHE_TYPE": "RedisSentinelCache",
            "CACHE_REDIS_SENTINELS": [["127.0.0.1", port]],
            "CACHE_REDIS_SENTINEL_MASTER": SERVICE,
        },
        # Flask-Caching's RedisClusterCache connects when it is built: the app starts on the real
        # cluster, whose writes ``take_away`` then pauses.
        "redis-cluster": {"CACHE_TYPE": "RedisClusterCache"},
        "postgresql": {
            "COUNTER_STORE": "sql",
            "SQLALCHEMY_DATABASE_URI": f"postgresql+psycopg://{USER}:pw@{address}/{DATABASE}",
        },
        "sqlite": {"COUNTER_STORE": "sql", "SQLALCHEMY_DATABASE_URI": f"sqlite:///{tmp_path / 'tally.db'}"},
        "manager": {
            "COUNTER_STORE": "manager",
            "COUNTER_MANAGER_ADDRESS": str(tmp_path / "nowhere" / "manager.sock"),
            "COUNTER_MANAGER_AUTHKEY": "k" * 40,
        },
    }[backend] | base


def take_away(backend: str, app, tmp_path, cluster) -> None:
    """The stores that were reachable when the app started lose their storage now."""
    if backend == "redis-cluster":
        for node in cluster.nodes:  # writes wait 3 s on every node: each step times out
            command(node.port, "CLIENT", "PAUSE", "3000", "WRITE")
    if backend == "filesystem":
        shutil.rmtree(app.config["COUNTER_DIR"])
        with open(app.config["COUNTER_DIR"], "w") as file:  # a file where the directory was
            file.write("not a directory")
    if backend == "sqlite":
        app.test_client().post("/api/counters/x/incr")  # the schema exists
        locker = sqlite3.connect(tmp_path / "tally.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        app.extensions["test.locker"] = locker


REQUESTS = [
    ("post", "/api/counters/x/incr"),
    ("post", "/api/counters/x/decr"),
    ("get", "/api/counters/x"),
    ("post", "/api/me/counters/x/incr"),
    ("get", "/api/me/counters/x"),
    ("post", "/api/shared/s/add"),
    ("put", "/api/shared/s"),
    ("get", "/api/shared/s"),
    ("get", "/api/leaderboard"),
    ("get", "/healthz"),
]


@pytest.mark.parametrize("backend", SHARED_BACKENDS)  # the memory store has no server to lose
def test_no_error_body_names_a_server_a_path_or_a_url(make_app, tmp_path, backend, caplog, request):
    port = free_port()
    settings = unreachable(backend, tmp_path, port)
    cluster = None
    if backend == "redis-cluster":
        cluster = request.getfixturevalue("cluster_topology")
        settings["CACHE_REDIS_CLUSTER"] = cluster.startup_nodes
        settings["COUNTER_KEY_PREFIX"] = f"{{pub{port}}}:"
    app = make_app(settings, COUNTER_TIMEOUT=0.3)
    request.addfinalizer(lambda: release(app, cluster))
    take_away(backend, app, tmp_path, cluster)
    client = app.test_client()
    forbidden = ["127.0.0.1", str(port), str(tmp_path), USER, DATABASE, SERVICE, "://", ".sock", ".db"]
    forbidden += [str(node.port) for node in cluster.nodes] if cluster else []
    bodies = {}
    with caplog.at_level(logging.ERROR):
        for method, path in REQUESTS:
            body = {"value": 1} if method == "put" else {"item": 1}
            response = getattr(client, method)(path, json=body if "shared" in path else None)
            if response.status_code >= 400:
                bodies[f"{method} {path}"] = (response.status_code, response.get_data(as_text=True))
    assert bodies["post /api/counters/x/incr"][0] == 503
    leaks = {
        request: [word for word in forbidden if word in text]
        for request, (_, text) in bodies.items()
        if any(word in text for word in forbidden)
    }
    assert not leaks, leaks
    assert StoreUnavailable.public_message in bodies["post /api/counters/x/incr"][1]
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert "tally store unreachable" in logged  # the operator is told, in the log


def release(app, cluster) -> None:
    """Give the session's servers back as they were (the cluster is shared by other tests)."""
    for node in cluster.nodes if cluster else []:
        command(node.port, "CLIENT", "UNPAUSE")
    locker = app.extensions.pop("test.locker", None)
    if locker is not None:
        locker.close()


def test_errors_about_the_callers_input_still_say_what_was_wrong(make_app, store_settings):
    client = make_app(store_settings("filesystem")).test_client()
    body = client.post("/api/counters/x/incr", json={"by": "many"}).get_json()
    assert body["error"] == "invalid_amount" and "whole number" in body["detail"]
