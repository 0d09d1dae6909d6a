"""The leaderboard: ``store.names`` on every backend, and ``GET /api/leaderboard``, a deliberately
stale view kept in Flask-Caching's cache for at most ``LEADERBOARD_MAX_AGE`` seconds, while the
counter route is never stale.  Real servers throughout; outages are servers of the test's own,
paused (hung) or stopped."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import redis
from flask_caching.backends.rediscache import RedisCache

from common import cache
from routes import leaderboard as lb
from routes.leaderboard import BoundedCalls
from settings import ConfigError
from tally import StoreUnavailable
from tally.names import client_key
from tally.stores.filesystem import GONE, TEMP_PREFIX, pack_record
from tally.stores.memcached import MemcachedCounterStore
from tally.stores.redis_store import RedisCounterStore
from tests.servers import Memcached, Redis

CLIENT = "0123456789abcdef0123456789abcdef"


def with_leaderboard(app):
    """The app with the leaderboard blueprint (the factory registers it once app.py does)."""
    if "leaderboard" not in app.blueprints:
        app.register_blueprint(lb.bp)
    return app


@pytest.fixture
def build(make_app, store_settings):
    def build_app(backend: str, **extra):
        return with_leaderboard(make_app(store_settings(backend), **extra))

    return build_app


@pytest.fixture
def store(app):
    with app.app_context():
        yield app.extensions["tally"]


@pytest.fixture
def own_server():
    """A memcached or redis-server of the test's own, resumed and removed afterwards."""
    started = []

    def start(kind: str):
        server = (Memcached("memcached") if kind == "memcached" else Redis()).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.resume()
        server.remove()


def board(client) -> tuple[dict, dict]:
    response = client.get("/api/leaderboard")
    assert response.status_code == 200, response.get_json()
    return dict(response.headers), response.get_json()


def rows(*pairs: tuple[str, int]) -> list[dict]:
    return [{"name": name, "value": value} for name, value in pairs]


# -- names() ------------------------------------------------------------------------------------------


def test_names_are_exactly_the_shared_counters(store):
    for name, value in [("a", 3), ("b.c-d_e", -2), ("Zed9", 1)]:
        store.add(name, value)
    store.set("zero", 0)
    store.add("reset", 4)
    store.delete("reset")
    store.add(client_key(CLIENT, "a"), 5, ttl=60)  # per-client, even with a shared counter's name
    store.add(client_key(CLIENT, "mine"), 5, ttl=60)
    store.set_value("shared", b'["ada"]')
    store.set_value("a", b"1")  # a shared value named like a counter
    assert sorted(store.names(100)) == ["Zed9", "a", "b.c-d_e", "zero"]
    assert sorted(store.counts(100)) == [("Zed9", 1), ("a", 3), ("b.c-d_e", -2), ("zero", 0)]


def test_names_stop_at_the_limit(store):
    created = {f"c{i:02d}" for i in range(25)}
    for name in created:
        store.add(name, 1)
    for limit in (1, 10, 24):
        found = store.names(limit)
        assert len(found) == limit
        assert len(set(found)) == limit
        assert set(found) <= created
        counted = store.counts(limit)
        assert len(counted) == limit and {name for name, _ in counted} <= created
        assert {value for _, value in counted} == {1}
    assert sorted(store.names(25)) == sorted(created)
    assert sorted(store.counts(1000)) == sorted((name, 1) for name in created)
    assert sorted(store.names(1000)) == sorted(created)


def test_filesystem_names_leave_out_files_that_hold_no_live_counter(make_app, store_settings):
    app = with_leaderboard(make_app(store_settings("filesystem")))
    with app.app_context():
        store = app.extensions["tally"]
        store.add("live", 2)
        store.add(client_key(CLIENT, "x"), 1, ttl=60)
        for name, data in [
            ("damaged", b"not a record"),
            ("tombstoned", pack_record(0, 0, GONE)),
            (f"{TEMP_PREFIX}leftover", pack_record(7)),
        ]:
            with open(os.path.join(store.directory, name), "wb") as file:
                file.write(data)
        os.mkdir(os.path.join(store.directory, "a-directory"))
        assert store.names(100) == ["live"]
        assert store.counts(100) == [("live", 2)]
    client = app.test_client()
    assert board(client)[1]["counters"] == rows(("live", 2))
    assert client.get("/api/counters/damaged").status_code == 500  # its own route reports it


def test_memcached_names_while_other_dumps_run(make_app, store_settings):
    """memcached runs one key dump at a time and answers BUSY to the others: they wait their turn."""
    store = make_app(store_settings("memcached")).extensions["tally"]
    expected = {f"m{i}" for i in range(30)}
    for name in expected:
        store.add(name, 1)
    results: list[set[str]] = []
    errors: list[Exception] = []

    def work() -> None:
        try:
            for _ in range(5):
                results.append(set(store.names(1000)))
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert results == [expected] * 20


@pytest.mark.parametrize("outage", ["hang", "stop"])
@pytest.mark.parametrize("kind", ["memcached", "redis"])
def test_names_of_an_unreachable_server_raise_store_unavailable_in_time(own_server, kind, outage):
    server = own_server(kind)
    if kind == "memcached":
        store = MemcachedCounterStore([server.address], timeout=0.3)
    else:
        store = RedisCounterStore(server.url, timeout=0.3)
    try:
        store.add("x", 1)
        assert store.names(10) == ["x"]
        (server.pause if outage == "hang" else server.stop)()
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.names(10)
        assert time.monotonic() - began < 0.3 + 1.0
    finally:
        store.close()


# -- the route ----------------------------------------------------------------------------------------


def test_the_route_lists_the_top_ten_by_value_ties_by_name(build, backend):
    app = build(backend)
    values = dict(a=5, b=7, c=7, d=-3, e=0, f=12, g=1, h=2, i=3, j=4, k=6, l=-1)
    with app.app_context():
        store = app.extensions["tally"]
        for name, value in values.items():
            store.set(name, value)
        store.add(client_key(CLIENT, "huge"), 10**6, ttl=60)
        store.set_value("bigger", b"99999999")
    before = time.time()
    headers, body = board(app.test_client())
    assert set(body) == {"counters", "computed_at", "max_age"}
    assert body["counters"] == rows(
        ("f", 12), ("b", 7), ("c", 7), ("k", 6), ("a", 5), ("j", 4), ("i", 3), ("h", 2), ("g", 1), ("e", 0)
    )
    assert body["max_age"] == 10  # the default
    assert before - 0.01 <= body["computed_at"] <= time.time()
    assert headers["Cache-Control"] == "public, max-age=10"
    assert headers["Age"] == "0"


def test_within_max_age_the_list_is_stale_and_the_counter_route_never_is(build, backend):
    max_age = 2
    app = build(backend, LEADERBOARD_MAX_AGE=max_age)
    client = app.test_client()
    client.post("/api/counters/a/incr", json={"by": 5})
    _, first = board(client)
    assert first["counters"] == rows(("a", 5))

    assert client.post("/api/counters/a/incr", json={"by": 45}).get_json()["value"] == 50
    assert client.post("/api/counters/b/incr").get_json()["value"] == 1
    headers, second = board(client)
    assert time.time() - first["computed_at"] < max_age, "the machine was too slow for this check"
    assert second == first  # the cached list, stale on purpose, and saying when it was computed
    assert 0 <= int(headers["Age"]) <= max_age
    read = client.get("/api/counters/a")  # the counter itself: the change shows at once
    assert read.get_json() == {"name": "a", "value": 50}
    assert read.headers["Cache-Control"] == "no-store"

    time.sleep(max(0.0, first["computed_at"] + max_age - time.time()) + 0.05)
    _, third = board(client)
    assert third["counters"] == rows(("a", 50), ("b", 1))
    assert third["computed_at"] > first["computed_at"]


def test_the_counter_route_reads_the_store_never_the_page_cache(build, backend):
    """While the leaderboard holds a cached (stale) value of ``hot``, and the page cache holds a
    wrong answer under the key ``@cache.cached`` would give the counter route, every read of the
    counter route shows each step at once: it would fail if counters were read through the cache."""
    app = build(backend, LEADERBOARD_MAX_AGE=60)
    client = app.test_client()
    client.post("/api/counters/hot/incr")
    _, cached = board(client)
    assert cached["counters"] == rows(("hot", 1))
    with app.test_request_context("/api/counters/hot"):
        cache.set("view//api/counters/hot", '{"name": "hot", "value": 999}', timeout=60)
    for expected in range(2, 12):
        assert client.post("/api/counters/hot/incr").get_json()["value"] == expected
        read = client.get("/api/counters/hot")
        assert read.get_json() == {"name": "hot", "value": expected}
        assert read.headers["Cache-Control"] == "no-store"
    assert board(client)[1] == cached  # the leaderboard, meanwhile, is still the stale list


def test_a_wrong_cached_entry_is_never_served(build, backend):
    """Entries the leaderboard did not write for this store and this age are misses: malformed,
    another store's (a shared page cache), too old (a longer max age elsewhere), from the future,
    or not a ranked list of valid counters."""
    app = build(backend, LEADERBOARD_MAX_AGE=60)
    client = app.test_client()
    client.post("/api/counters/real/incr", json={"by": 3})
    with app.app_context():
        scope = lb.store_scope(app.extensions["tally"], app.config["LEADERBOARD_SCAN_LIMIT"])
    now = time.time()
    ghost = [("ghost", 9)]
    wrong = [
        "not json",
        42,
        json.dumps({"scope": scope}),
        lb.encode_entry("0" * 32, now, ghost),
        lb.encode_entry(scope, now - 61, ghost),
        lb.encode_entry(scope, now + 30, ghost),
        lb.encode_entry(scope, now, [("a", 1), ("b", 2)]),
        lb.encode_entry(scope, now, [("../x", 9)]),
        lb.encode_entry(scope, now, [("ghost", 9), ("ghost", 8)]),
        lb.encode_entry(scope, now, [(f"g{i:02d}", 100 - i) for i in range(11)]),
        json.dumps({"scope": scope, "computed_at": now, "counters": [["ghost", True]]}),
        json.dumps({"scope": scope, "computed_at": True, "counters": []}),
    ]
    for raw in wrong:
        with app.app_context():
            assert cache.set(lb.cache_key(scope), raw, 60)
        before = time.time()
        _, body = board(client)
        assert body["counters"] == rows(("real", 3)), raw
        assert body["computed_at"] >= before - 0.001, raw  # taken after before, rounded down to the ms
        assert board(client)[1] == body  # and the entry written in its place is used


def test_the_scan_limit_bounds_the_counters_looked_at(build, backend):
    app = build(backend, LEADERBOARD_SCAN_LIMIT=3)
    with app.app_context():
        for i in range(6):
            app.extensions["tally"].set(f"c{i}", i)
    listed = board(app.test_client())[1]["counters"]
    assert len(listed) == 3
    assert {row["name"] for row in listed} <= {f"c{i}" for i in range(6)}
    assert all(row["value"] == int(row["name"][1:]) for row in listed)
    assert listed == sorted(listed, key=lambda row: (-row["value"], row["name"]))


def test_max_age_zero_computes_every_request(build):
    app = build("memory", LEADERBOARD_MAX_AGE=0)
    client = app.test_client()
    for expected in (1, 2, 3):
        client.post("/api/counters/n/incr")
        headers, body = board(client)
        assert body["counters"] == rows(("n", expected))
        assert headers["Cache-Control"] == "public, max-age=0"


@pytest.mark.parametrize(
    "key,value",
    [
        ("LEADERBOARD_MAX_AGE", -1),
        ("LEADERBOARD_MAX_AGE", "10"),
        ("LEADERBOARD_MAX_AGE", 1.5),
        ("LEADERBOARD_MAX_AGE", True),
        ("LEADERBOARD_SCAN_LIMIT", 0),
        ("LEADERBOARD_SCAN_LIMIT", None),
    ],
)
def test_a_bad_setting_stops_the_app(build, key, value):
    with pytest.raises(ConfigError, match=key):
        build("memory", **{key: value})


# -- failures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", ["hang", "stop"])
def test_a_failing_page_cache_still_gives_the_right_list_in_time(
    make_app, store_settings, own_server, outage
):
    """The page cache on a Redis of its own (Flask-Caching's Redis client has no socket timeout, so
    a hung one would hold a request for ever), the counters on theirs: while the page cache is away
    the list is computed from the store, each request within the bound, and the cache is used again
    once it is back."""
    bound = 1.0
    server = own_server("redis")
    app = with_leaderboard(make_app(store_settings("redis"), COUNTER_TIMEOUT=bound, LEADERBOARD_MAX_AGE=60))
    page_cache = RedisCache(host=redis.Redis.from_url(server.url), key_prefix="flask_cache_")
    app.extensions["cache"][cache] = page_cache
    client = app.test_client()
    client.post("/api/counters/up/incr", json={"by": 2})
    _, cached = board(client)
    assert board(client)[1] == cached  # served from the page cache

    (server.pause if outage == "hang" else server.stop)()
    took = []
    for expected in (3, 4, 5):
        client.post("/api/counters/up/incr")
        began = time.monotonic()
        _, body = board(client)
        took.append(time.monotonic() - began)
        assert body["counters"] == rows(("up", expected))  # computed: never the cached 2
    assert max(took) < bound + 1.0
    if outage == "hang":
        assert took[0] >= bound  # waited for the hung cache once...
        assert max(took[1:]) < bound  # ...and not again while that call is stuck

    (server.resume if outage == "hang" else server.start)()
    deadline = time.monotonic() + 10
    while True:  # back in use: two requests in a row give the same cached list
        first = board(client)[1]
        if board(client)[1] == first:
            break
        assert time.monotonic() < deadline, "the page cache was not used again"
        time.sleep(0.1)


@pytest.mark.parametrize("outage", ["hang", "stop"])
@pytest.mark.parametrize("kind", ["memcached", "redis"])
def test_a_store_outage_answers_503_in_time_and_service_returns(make_app, tmp_path, own_server, kind, outage):
    """Counters and page cache on one server of the test's own: while it is away the leaderboard
    answers 503 (the page cache's bounded call, then the store's), never a list; then 200 again."""
    bound = 0.3
    server = own_server(kind)
    settings = {
        "CACHE_TYPE": "MemcachedCache" if kind == "memcached" else "RedisCache",
        "COUNTER_DIR": str(tmp_path / "counters"),
        "CACHE_DIR": str(tmp_path / "cache"),
        "COUNTER_TIMEOUT": bound,
        "LEADERBOARD_MAX_AGE": 60,
    }
    if kind == "memcached":
        settings["CACHE_MEMCACHED_SERVERS"] = [server.address]
    else:
        settings["CACHE_REDIS_URL"] = server.url
    app = with_leaderboard(make_app(settings))
    client = app.test_client()
    client.post("/api/counters/x/incr")
    assert board(client)[1]["counters"] == rows(("x", 1))

    (server.pause if outage == "hang" else server.stop)()
    for _ in range(2):
        began = time.monotonic()
        response = client.get("/api/leaderboard")
        assert time.monotonic() - began < 2 * bound + 1.0
        assert response.status_code == 503
        assert response.get_json()["error"] == "store_unavailable"
        assert response.headers["Cache-Control"] == "no-store"

    (server.resume if outage == "hang" else server.start)()
    deadline = time.monotonic() + 10
    while client.get("/api/leaderboard").status_code != 200:
        assert time.monotonic() < deadline, "the leaderboard did not come back with the store"
        time.sleep(0.1)


class _Backend:
    """A page-cache backend whose ``get`` waits for ``release`` (set: answers at once)."""

    def __init__(self, hung: bool = False) -> None:
        self.release = threading.Event()
        if not hung:
            self.release.set()

    def get(self, key: str) -> str:
        self.release.wait(10)  # bounded: a test that forgets to release still ends
        return f"value of {key}"


def test_bounded_calls_reuse_a_few_threads_and_stay_bounded_when_all_are_stuck():
    calls = BoundedCalls()
    before = set(threading.enumerate())
    assert [calls.call(_Backend(), "get", "k", within=2.0) for _ in range(50)] == ["value of k"] * 50
    started = [t for t in set(threading.enumerate()) - before if t.name == "tally-leaderboard-cache"]
    assert 1 <= len(started) <= BoundedCalls.RUNNERS  # not one thread per call

    hung = [_Backend(hung=True) for _ in range(BoundedCalls.RUNNERS)]
    for backend in hung:  # every runner stuck on a hung backend
        assert calls.call(backend, "get", "k", within=0.2) is BoundedCalls.FAILED
    assert calls.call(hung[0], "get", "k", within=5.0) is BoundedCalls.FAILED  # at once: still overdue
    began = time.monotonic()
    assert calls.call(_Backend(), "get", "k", within=0.3) is BoundedCalls.FAILED  # queued: in time
    assert 0.3 <= time.monotonic() - began < 1.3
    for backend in hung:
        backend.release.set()
    deadline = time.monotonic() + 5
    for backend in (_Backend(), *hung):  # each hung backend is used again once its call has ended
        while calls.call(backend, "get", "again", within=0.5) is BoundedCalls.FAILED:
            assert time.monotonic() < deadline, "the runners did not come back"
            time.sleep(0.01)


def test_computed_at_never_lies_after_the_moment_the_reads_began(build, monkeypatch):
    """``computed_at`` is kept to the millisecond, rounded down: rounded to nearest, a list computed
    at .4109542 said .411, a moment after its reads began (and after the answer, seen in a test)."""
    app = build("memory")
    began = 1796239690.4109542
    monkeypatch.setattr(lb.time, "time", lambda: began)
    _, body = board(app.test_client())
    assert body["computed_at"] <= began
    assert body["computed_at"] == 1796239690.41
