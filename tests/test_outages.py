"""Store outages in the middle of real load through gunicorn: only correct 200s or 503s, never a
guessed or repeated value, and service back without restarting the app."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections import Counter

import pytest

from tally.loadcheck import run_load
from tests.conftest import matrix, settings_env
from tests.servers import Gunicorn, Memcached, Redis

pytestmark = pytest.mark.slow

TIMEOUT = 0.5
ADMIN_TOKEN = "outage-admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def start_store(backend: str):
    return (Memcached("memcached") if backend == "memcached" else Redis()).start()


@pytest.fixture
def own_store():
    """A memcached or redis-server of the test's own, started on demand, resumed and stopped after."""
    started = []

    def start(backend: str):
        started.append(start_store(backend))
        return started[-1]

    yield start
    for store in started:
        store.resume()
        store.remove()


def take_away(store, kind: str) -> None:
    """Make the store unreachable. hang: it stops answering but keeps its port and data; stop: killed."""
    (store.pause if kind == "hang" else store.stop)()


def bring_back(store, kind: str) -> None:
    (store.resume if kind == "hang" else store.start)()


def settings_for(backend: str, server, tmp_path) -> dict:
    settings = {
        "CACHE_TYPE": "MemcachedCache" if backend == "memcached" else "RedisCache",
        "COUNTER_TIMEOUT": TIMEOUT,
        "COUNTER_DIR": str(tmp_path / "counters"),
    }
    if backend == "memcached":
        settings["CACHE_MEMCACHED_SERVERS"] = [server.address]
    else:
        settings["CACHE_REDIS_URL"] = server.url
    return settings


def status_of(url: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def wait_for_200(url: str, method: str = "GET", within: float = 15.0) -> float:
    began = time.monotonic()
    while time.monotonic() - began < within:
        if status_of(url, method)[0] == 200:
            return time.monotonic() - began
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer 200 within {within}s after the store came back")


def load_through(server: Gunicorn, outage, recovery, result: dict) -> None:
    """Six seconds of load; the outage starts after one and lasts two."""

    def drive() -> None:
        result["report"] = run_load(
            f"{server.url}/api/counters/outage/incr",
            clients=16,
            requests=100_000,
            deadline=6.0,
            timeout=10,
        )

    driver = threading.Thread(target=drive)
    driver.start()
    time.sleep(1.0)
    outage()
    time.sleep(2.0)
    recovery()
    driver.join(timeout=60)


OUTAGES = [("memcached", "hang"), ("redis", "hang"), ("redis", "stop"), ("memcached", "stop")]


@pytest.mark.parametrize("backend,kind", matrix(OUTAGES, ("memcached", "hang"), ("redis", "stop")))
def test_an_outage_under_load_answers_503_and_never_a_wrong_value(tmp_path, backend, kind):
    """Six seconds of load; the store hangs (SIGSTOP) or is killed and started again on its port
    for two of them.  Only 200s and 503s, none slower than twice the timeout plus the machine's own
    slack, and service returns."""
    store = start_store(backend)
    server = Gunicorn(settings_env(settings_for(backend, store, tmp_path)), workers=4, threads=8)
    try:
        server.start()
        # How slow this machine is right now, healthy: the slack of the latency bound below, so that
        # a loaded machine does not fail the test and a hang (seconds to minutes) still does.
        healthy = run_load(f"{server.url}/api/counters/warmup/incr", clients=16, requests=20)
        slack = max(1.0, 10 * healthy.percentile(0.99))
        result: dict = {}
        load_through(server, lambda: take_away(store, kind), lambda: bring_back(store, kind), result)
        report = result["report"]
        assert report.errors == {}, report.errors
        assert set(report.statuses) == {200, 503}, report.statuses
        # A request waits for the store at most TIMEOUT, twice when queued behind a stuck thread.
        assert max(report.latencies) < 2 * TIMEOUT + slack, (max(report.latencies), slack)
        wait_for_200(f"{server.url}/healthz")
        wait_for_200(f"{server.url}/api/counters/outage")
        final = status_of(f"{server.url}/api/counters/outage")[1]["value"]
        if (backend, kind) == ("memcached", "stop"):
            # memcached keeps nothing across a restart: the counter counted again from 0 (README,
            # "Guarantees and limits").  So a number may come back once more, and only one that the
            # new count reached; within each run of the server, every number was handed out once.
            repeats = Counter(report.values)
            assert max(repeats.values()) <= 2
            assert all(value <= final for value, seen in repeats.items() if seen == 2)
            assert final <= report.sent
            return
        # Redis keeps its counters (hang: in memory; stop: in its AOF): no number is ever repeated.
        assert report.duplicates == 0
        # Every 200 carried a value that really was the counter's; a 503 may or may not have counted.
        assert max(report.values) <= final <= report.sent
    finally:
        server.stop()
        store.remove()


def test_a_memcached_restart_answers_503_then_serves_again(tmp_path):
    store = start_store("memcached")
    # /healthz shows the servers' facts to the operator only (tests/test_metrics.py)
    settings = {**settings_for("memcached", store, tmp_path), "TALLY_ADMIN_TOKEN": ADMIN_TOKEN}
    server = Gunicorn(settings_env(settings), workers=2, threads=4)
    try:
        server.start()
        assert status_of(f"{server.url}/api/counters/m/incr", "POST") == (200, {"name": "m", "value": 1})
        assert "restarted" not in status_of(f"{server.url}/healthz", headers=ADMIN)[1]["servers"][0]
        time.sleep(5)  # memcached counts uptime in whole seconds, from a little before it starts
        store.stop()
        status, body = status_of(f"{server.url}/api/counters/m/incr", "POST")
        assert status == 503 and body["error"] == "store_unavailable"
        assert status_of(f"{server.url}/healthz")[0] == 503
        store.start()
        wait_for_200(f"{server.url}/api/counters/m")
        wait_for_200(f"{server.url}/healthz")
        # Every answer says so, whichever worker gives it: the flag compares the server's start with
        # the app's, built once in gunicorn's master, not with what one worker happened to see.
        reports = [status_of(f"{server.url}/healthz", headers=ADMIN)[1] for _ in range(20)]
        assert all(report["servers"][0].get("restarted") is True for report in reports), reports[:3]
        # memcached kept nothing: the counter starts again (README, "Guarantees and limits").
        assert status_of(f"{server.url}/api/counters/m")[1]["value"] == 0
    finally:
        server.stop()
        store.remove()


@pytest.mark.parametrize("kind", ["hang", "stop"])
@pytest.mark.parametrize("backend", ["memcached", "redis"])
def test_server_side_sessions_answer_503_quickly_while_the_store_is_away(
    make_app, tmp_path, own_store, backend, kind
):
    """With SESSION_BACKEND = "server" every request that uses its session (the per-client page here)
    reads it from the store: an unreachable store is a 503 within the timeout there too (not a 500
    after the client's own retries, nor a request that hangs), and the JSON API, which opens no
    session, answers 503 from the counter store; service returns with the store."""
    store = own_store(backend)
    client = make_app({**settings_for(backend, store, tmp_path), "SESSION_BACKEND": "server"}).test_client()
    assert client.get("/inc").get_data(as_text=True) == "counter is 1"
    take_away(store, kind)
    for path in ("/inc", "/api/counters/c/incr"):
        began = time.monotonic()
        response = client.post(path)
        assert time.monotonic() - began < TIMEOUT + 2.5, path  # it hung for good before
        assert response.status_code == 503, path
        assert response.get_json()["error"] == "store_unavailable", path
    bring_back(store, kind)
    deadline = time.monotonic() + 15
    while client.get("/inc").status_code != 200:
        assert time.monotonic() < deadline, "no 200 within 15 s of the store's return"
        time.sleep(0.2)


@pytest.mark.parametrize("kind", ["hang", "stop"])
@pytest.mark.parametrize("backend", ["memcached", "redis"])
def test_with_rate_limits_an_unreachable_store_is_still_a_quick_503(
    make_app, tmp_path, own_store, backend, kind
):
    """The limits live in the same store: while it is away the limit check gives up within the
    counters' timeout and lets the request through to the counter, which answers 503 (Flask-Limiter
    would otherwise answer 500, or wait on a hung server without end)."""
    store = own_store(backend)
    settings = {**settings_for(backend, store, tmp_path), "RATELIMIT_ENABLED": True}
    client = make_app(settings, RATELIMIT_DEFAULT="100 per minute").test_client()
    assert client.post("/api/counters/c/incr").status_code == 200
    take_away(store, kind)
    began = time.monotonic()
    response = client.post("/api/counters/c/incr")
    assert time.monotonic() - began < 2 * TIMEOUT + 2.5
    assert response.status_code == 503 and response.get_json()["error"] == "store_unavailable"
