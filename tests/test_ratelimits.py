"""The ``tally://`` storage for limits and Flask-Limiter, on every store.

limits' own strategies drive it, in one process (their rules, next to limits' own memory storage) and
from 4 processes x 8 threads on one key, where exactly the limit passes; ``memory://`` in the same
hammer (a limit per process, the bug of the seed's question) lets through many times the limit, so
the count does catch the race.  Through HTTP, the demo under gunicorn 4x4 on every store gives exactly
20 x 200 for 120 concurrent POSTs against "20 per minute", and the naive variant fails that test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from limits import parse
from limits.errors import StorageError
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import STRATEGIES

import tally
from tally.ratelimits import LIMIT_MARK, TallyStorage, limit_key
from tests.conftest import BACKENDS, SHARED_BACKENDS, matrix, settings_env, store_of
from tests.servers import ROOT, Memcached, Redis, free_port
from tests.store_contract import CONTRACT_TIMEOUT, bare_app

#: make stress runs the hammer this many rounds per store (make test: 1).
STRESS_ROUNDS = int(os.environ.get("TALLY_STRESS_ROUNDS", "1"))
HOSTILE_KEYS = ["x" * 5000, "clé/ünïcødé/ключ", "../../etc/passwd", "a/b/../c", "..", "", " ", "@rl.x"]


@pytest.fixture
def bare(store_settings, backend, tmp_path):
    """A bare app on ``backend`` whose store sweeps expired keys every second (where it sweeps)."""
    config = {"COUNTER_TIMEOUT": CONTRACT_TIMEOUT, "COUNTER_SWEEP_INTERVAL": 1}
    made = bare_app(store_settings(backend), config, str(tmp_path / "i"))
    with made:
        yield made
    made.store.close()


def test_importing_tally_registers_the_scheme(bare):
    storage = storage_from_string("tally://", counters=bare.counters)
    assert isinstance(storage, TallyStorage)
    for name, strategy in STRATEGIES.items():
        assert strategy(storage), name  # every strategy accepts it (limits checks the abilities)


def test_the_storage_needs_the_counters():
    with pytest.raises(TypeError, match="counters"):
        storage_from_string("tally://")
    with pytest.raises(TypeError, match="no options"):
        storage_from_string("tally://", counters=tally.Counters(), timeout=3)


def test_each_strategy_follows_limits_rules_and_keys_expire(bare, tmp_path):
    """Each strategy's answers and window stats on the store match limits' own memory storage hit
    for hit; the limits open again once their window has passed.  And a key is gone from the store
    after its window (swept where the store sweeps), not merely ignored."""
    ours = storage_from_string("tally://", counters=bare.counters)
    ours.incr("brief", 1)
    assert ours.get("brief") == 1
    assert ours.acquire_entry("moving", 5, 1)
    reference = MemoryStorage()
    # 3 per 2 s; the sliding window counter at 3 per 1 s, so that it is clear of its previous
    # window too after the same wait (3.2 s: a fixed window's end is rounded up to the whole second
    # on the filesystem and SQL).
    items = {
        "fixed-window": parse("3 per 2 second"),
        "moving-window": parse("3 per 2 second"),
        "sliding-window-counter": parse("3 per 1 second"),
    }
    for name, item in items.items():
        if name == "sliding-window-counter":  # start just after a 1 s window begins: all 8 hits in it
            while time.time() % 1 > 0.05:
                time.sleep(0.01)
        mine, theirs = STRATEGIES[name](ours), STRATEGIES[name](reference)
        assert [mine.hit(item, "who", name) for _ in range(4)] == [True, True, True, False], name
        assert [theirs.hit(item, "who", name) for _ in range(4)] == [True, True, True, False], name
        assert mine.test(item, "who", name) is theirs.test(item, "who", name) is False
        stats, expected = mine.get_window_stats(item, "who", name), theirs.get_window_stats(item, "who", name)
        assert stats.remaining == expected.remaining == 0, name
        assert abs(stats.reset_time - expected.reset_time) < 1.1, (name, stats, expected)
        assert mine.hit(item, "someone else", name), name  # a limit per identifier
        assert mine.hit(item, "who", name, cost=4) is False  # a cost over the limit never passes
    time.sleep(3.2)
    for name, item in items.items():
        mine = STRATEGIES[name](ours)
        assert mine.get_window_stats(item, "who", name).remaining == item.amount, name
        assert mine.hit(item, "who", name), name
    assert ours.get("brief") == 0
    assert bare.store.get_value(limit_key("brief")) is None and bare.store.get(limit_key("brief")) == 0
    if type(bare.store).backend == "filesystem":  # the writes above, with a lifetime, start the sweep
        values = tmp_path / "counters" / ".values"
        files = [
            tmp_path / "counters" / limit_key("brief"),  # the fixed window's counter file
            values / "data" / limit_key("moving"),  # a moving window's value, and its lock file
            values / "locks" / limit_key("moving"),
        ]
        deadline = time.monotonic() + 10  # the sweep runs in a thread of its own: wait for it
        while any(file.exists() for file in files) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(file.exists() for file in files), files


def test_fixed_window_storage_calls(bare):
    storage = storage_from_string("tally://", counters=bare.counters)
    assert storage.get("k") == 0
    before = time.time()
    assert [storage.incr("k", 60) for _ in range(3)] == [1, 2, 3]
    assert storage.incr("k", 60, amount=5) == 8
    assert storage.get("k") == 8
    assert before + 59 < storage.get_expiry("k") <= time.time() + 61  # set by the first hit only
    storage.clear("k")
    assert storage.get("k") == 0 and storage.incr("k", 60) == 1
    assert storage.check() is True
    with pytest.raises(NotImplementedError, match="clear"):
        storage.reset()


def test_get_after_a_hit_answers_from_the_hit_and_then_from_the_store(bare):
    """Flask-Limiter asks get and get_expiry right after each hit, for its headers: within RECENT
    seconds the same thread gets that hit's own window; after, or in another thread, the store's."""
    import threading

    from tally.ratelimits import RECENT

    storage = storage_from_string("tally://", counters=bare.counters)
    assert storage.incr("k", 60) == 1
    other = storage_from_string("tally://", counters=bare.counters)
    assert other.incr("k", 60, amount=4) == 5
    assert storage.get("k") == 1  # this thread's own hit, just now
    seen = []
    thread = threading.Thread(target=lambda: seen.append(bare.app.app_context().push() or storage.get("k")))
    thread.start()
    thread.join()
    assert seen == [5]  # another thread reads the store
    time.sleep(RECENT + 0.01)
    assert storage.get("k") == 5  # later: the store


def test_limit_keys_live_apart_from_counters_and_values(bare):
    """No counter listing, shared value or page cache ``clear()`` meets a limit's key."""
    storage = storage_from_string("tally://", counters=bare.counters)
    bare.counters.incr("visible")
    storage.incr("visible", 60)  # a limit named like a counter
    assert bare.store.names(100) == ["visible"]
    assert bare.counters.get("visible") == 1 and bare.shared.get_value("visible") is None
    if type(bare.store).backend != "memcached":  # memcached's clear() is flush_all (docs/stores.md)
        bare.cache.clear()
    fresh = storage_from_string("tally://", counters=bare.counters)  # reads the store, not a recent hit
    assert fresh.get("visible") == 1
    assert limit_key("visible").startswith(LIMIT_MARK) and limit_key("visible") != limit_key("visible ")


def test_hostile_keys_are_safe(bare, tmp_path):
    storage = storage_from_string("tally://", counters=bare.counters)
    for number, key in enumerate(HOSTILE_KEYS, start=1):
        assert storage.incr(key, 60, amount=number) == number, key
    fresh = storage_from_string("tally://", counters=bare.counters)  # reads the store, not a recent hit
    for number, key in enumerate(HOSTILE_KEYS, start=1):
        assert fresh.get(key) == number, key  # each its own limit: none overwrote another
        assert STRATEGIES["moving-window"](storage).hit(parse("1/minute"), key)
    assert not any(tmp_path.rglob("passwd"))


@pytest.mark.parametrize("kind", ["refused", "hung"])
def test_an_unreachable_store_is_a_storage_error_within_the_timeout(store_settings, tmp_path, kind):
    """A closed port, or a Redis that accepted the connection and then stopped answering (SIGSTOP):
    every call raises ``StoreUnavailable`` within the counters' timeout, not the OS's minutes."""
    server = Redis().start()
    try:
        settings = {**store_settings("redis"), "CACHE_REDIS_URL": server.url}
        if kind == "refused":
            settings["CACHE_REDIS_URL"] = f"redis://127.0.0.1:{free_port()}/0"
        made = bare_app(settings, {"COUNTER_TIMEOUT": 0.5}, str(tmp_path / "i"))
        with made:
            raw = storage_from_string("tally://", counters=made.counters)
            wrapped = storage_from_string("tally://", counters=made.counters, wrap_exceptions=True)
            if kind == "hung":
                assert raw.incr("k", 60) == 1  # connected, then the server hangs
                server.pause()
            for call in (
                lambda: raw.incr("k", 60),
                lambda: raw.get("k"),
                lambda: STRATEGIES["sliding-window-counter"](raw).hit(parse("1/minute"), "k"),
            ):
                began = time.monotonic()
                with pytest.raises(tally.StoreUnavailable):
                    call()
                assert time.monotonic() - began < 0.5 + 2.5
            with pytest.raises(StorageError):  # what Flask-Limiter's swallow_errors catches
                STRATEGIES["moving-window"](wrapped).hit(parse("1/minute"), "k")
            assert raw.check() is False
        made.store.close()
    finally:
        server.resume()
        server.remove()


def test_outside_an_app_context_the_counters_app_is_used(tmp_path):
    import flask

    app = flask.Flask(__name__, instance_path=str(tmp_path))
    counters = tally.Counters(app)
    storage = storage_from_string("tally://", counters=counters)
    assert storage.incr("k", 60) == 1
    unbound = storage_from_string("tally://", counters=tally.Counters())
    with pytest.raises(RuntimeError, match="app context"):
        unbound.incr("k", 60)


def hammer(settings: dict, storage: str, processes: int, threads: int, limit: int, hits: int) -> dict:
    spec = {
        "settings": settings,
        "storage": storage,
        "processes": processes,
        "threads": threads,
        "limit": limit,
        "hits": hits,
        "key": f"hammer-{time.monotonic_ns()}",
    }
    done = subprocess.run(
        [sys.executable, "-m", "tests.limits_hammer", json.dumps(spec)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("backend", ["memcached", "redis"])
def test_a_moving_window_keeps_its_hits_whatever_the_phase_of_the_stores_clock(bare):
    """ "10 per 2 seconds": 5 hits, then 1.8 s later 5 more pass and the 11th is refused, whichever
    tenth of a second the first hits came in.  memcached drops an item up to a second before its
    lifetime counted from when it was stored: the first 5 hits were gone in 8 phases of 10, and an
    11th hit passed."""
    storage = storage_from_string("tally://", counters=bare.counters)
    limit = parse("10 per 2 second")
    passed: dict[int, list[bool]] = {}

    def phase(tenth: int) -> None:
        with bare.app.app_context():
            limiter = STRATEGIES["moving-window"](storage)
            time.sleep((tenth / 10 - time.time()) % 1)
            began = time.time()
            first = [limiter.hit(limit, "phase", str(tenth)) for _ in range(5)]
            time.sleep(max(0.0, began + 1.8 - time.time()))
            passed[tenth] = first + [limiter.hit(limit, "phase", str(tenth)) for _ in range(6)]

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(phase, range(10)))
    assert passed == {tenth: [True] * 10 + [False] for tenth in range(10)}


def test_a_moving_window_too_large_for_memcached_is_refused_not_an_outage(store_settings, tmp_path):
    """A moving window keeps an entry per separate hit in one item: enough of them outgrow
    memcached's item size (1 MiB by default; 2 KiB for this server).  The server is up: the error
    says so and names the limit, and it is no StoreUnavailable (which is logged as an outage and
    answered 503).  A hit of any cost is one entry: limits' own test of a cost of 999,999 passes."""
    server = Memcached(item_size=2048).start()
    try:
        settings = {**store_settings("memcached"), "CACHE_MEMCACHED_SERVERS": [server.address]}
        made = bare_app(settings, {"COUNTER_TIMEOUT": CONTRACT_TIMEOUT}, str(tmp_path / "i"))
        with made:
            storage = storage_from_string("tally://", counters=made.counters)
            limiter = STRATEGIES["moving-window"](storage)
            limit = parse("1000000 per hour")
            assert limiter.hit(limit, "costly", cost=999_999)  # one entry, whatever the cost
            with pytest.raises(tally.StoreRefused, match=r"moving window of 1000000 hits") as refused:
                for _ in range(200):  # 200 separate hits: 2.4 KB
                    limiter.hit(limit, "many")
            assert not isinstance(refused.value, tally.StoreUnavailable)
            assert "too large" in str(refused.value)
            assert limiter.hit(limit, "another")  # the store is up
        made.store.close()
    finally:
        server.remove()


@pytest.mark.slow  # 4 processes x 8 threads: CPU load, run with the other load tests
@pytest.mark.parametrize("round_", range(STRESS_ROUNDS))
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_strategy_passes_exactly_the_limit_under_contention(store_settings, backend, round_):
    """4 processes x 8 threads (one process on the memory store), each thread 8 hits of each strategy
    against one "50 per hour" limit: 50 pass, on every store."""
    processes = 4 if store_of(backend).multi_process else 1
    settings = {**store_settings(backend), "COUNTER_TIMEOUT": 5.0}
    passed = hammer(settings, "tally://", processes, threads=8, limit=50, hits=8)
    assert passed == {name: 50 for name in STRATEGIES}, passed


@pytest.mark.slow
def test_a_limit_per_process_lets_the_hammer_through(store_settings):
    """The naive variant: limits' memory:// storage in each of the 4 processes allows 50 each."""
    passed = hammer(store_settings("filesystem"), "memory://", 4, threads=8, limit=50, hits=8)
    assert all(count > 50 for count in passed.values()), passed


# -- through HTTP: the demo under gunicorn -------------------------------------------------------------


def post_concurrently(url: str, count: int) -> list[int]:
    import urllib.error
    import urllib.request

    def post(_: int) -> int:
        request = urllib.request.Request(url, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    with ThreadPoolExecutor(max_workers=40) as pool:
        return list(pool.map(post, range(count)))


def limited_env(settings: dict, **extra: str) -> dict[str, str]:
    return {
        **settings_env(settings),
        "FLASK_RATELIMIT_ENABLED": "true",
        "FLASK_RATELIMIT_DEFAULT": "20 per minute",
        "FLASK_RATELIMIT_KEY_PREFIX": f"limit-test-{time.monotonic_ns()}",
        **extra,
    }


@pytest.mark.slow
@pytest.mark.light  # 120 requests, exact counts, nothing timed: beside the load tests
@pytest.mark.parametrize("backend", matrix(SHARED_BACKENDS, "memcached", "sqlite", "redis"))
def test_a_limit_holds_across_gunicorn_workers(serve, store_settings, backend):
    server = serve(limited_env(store_settings(backend)), workers=4, threads=4)
    statuses = post_concurrently(f"{server.url}/api/counters/lim/incr", 120)
    assert (statuses.count(200), statuses.count(429)) == (20, 100), (statuses, server.log_text()[-2000:])
    with __import__("urllib.request").request.urlopen(f"{server.url}/api/counters/lim") as response:
        assert json.load(response)["value"] == 20


@pytest.mark.slow
@pytest.mark.light
def test_a_limit_per_worker_fails_the_same_test(serve, store_settings):
    """The naive variant (RATELIMIT_STORAGE_URI = memory://, still honoured): each worker allows 20."""
    env = limited_env(store_settings("filesystem"), FLASK_RATELIMIT_STORAGE_URI="memory://")
    server = serve(env, workers=4, threads=4)
    statuses = post_concurrently(f"{server.url}/api/counters/lim/incr", 120)
    assert statuses.count(200) > 20, statuses
