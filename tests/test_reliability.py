"""Failures a production service meets: workers killed mid-request, damaged files, weak secrets,
abusive clients.  Real processes, loopback only."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from settings import ConfigError
from tally.loadcheck import run_load
from tests.conftest import settings_env
from tests.servers import Gunicorn


def worker_pids(server: Gunicorn) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(server.process.pid)], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def read_value(server: Gunicorn, name: str) -> int:
    with urllib.request.urlopen(f"{server.url}/api/counters/{name}", timeout=10) as response:
        return json.loads(response.read())["value"]


def cpu_ticks(pid: int) -> int:
    """User + system CPU time a process has used so far, in clock ticks (``/proc/<pid>/stat``)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0
    return int(fields[11]) + int(fields[12])


def kill_busiest_workers(server: Gunicorn, count: int) -> list[int]:
    """SIGKILL the ``count`` workers that used the most CPU over the last 0.2 s: the ones serving
    requests right now (gunicorn leaves the choice of worker to whichever accepts first, so an
    idle worker could be killed without cutting anything)."""
    pids = worker_pids(server)
    before = {pid: cpu_ticks(pid) for pid in pids}
    time.sleep(0.2)
    victims = sorted(pids, key=lambda pid: cpu_ticks(pid) - before[pid], reverse=True)[:count]
    for pid in victims:
        os.kill(pid, signal.SIGKILL)  # gunicorn starts a new worker in its place
    return victims


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["filesystem", "redis"])
def test_killing_workers_under_load_loses_no_value_and_repeats_none(serve, store_settings, backend):
    server = serve(settings_env(store_settings(backend)), workers=4, threads=8)
    result = {}
    answered = threading.Semaphore(0)

    def drive() -> None:
        result["report"] = run_load(
            f"{server.url}/api/counters/crash/incr",
            clients=50,
            requests=120,
            keepalive=False,
            timeout=10,
            deadline=60,
            on_response=answered.release,
        )

    driver = threading.Thread(target=drive)
    driver.start()
    victims = []
    for _round in range(2):  # two rounds of two kills, each well inside the load (6,000 requests)
        for _ in range(1000):
            assert answered.acquire(timeout=30), "the load stalled"
        victims += kill_busiest_workers(server, count=2)
    driver.join(timeout=120)
    report = result["report"]
    assert report.duplicates == 0  # no value was ever handed out twice
    assert report.errors, "the kills should have cut some requests off"
    server.wait_ready()
    final = read_value(server, "crash")
    # Every 200 was counted; a request cut off by the kill may or may not have been.
    assert report.ok <= final <= report.sent
    assert max(report.values) <= final
    assert not set(victims) & set(worker_pids(server))  # the killed workers were replaced


def test_a_damaged_counter_file_answers_500_with_a_log_line(make_app, store_settings, caplog):
    app = make_app(store_settings("filesystem"))
    client = app.test_client()
    client.post("/api/counters/broken/incr", json={"by": 7})
    path = os.path.join(app.config["COUNTER_DIR"], "broken")
    with open(path, "r+b") as file:
        file.truncate(5)
    with caplog.at_level(logging.ERROR):
        response = client.post("/api/counters/broken/incr")
    assert response.status_code == 500
    body = response.get_json()
    assert body["error"] == "corrupt_counter" and app.config["COUNTER_DIR"] not in body["detail"]
    assert any(
        "corrupt_counter" in record.getMessage() and "broken" in record.getMessage()
        for record in caplog.records
    )
    assert client.get("/api/counters/broken").status_code == 500  # never read as 0
    assert client.get("/api/counters/fine").get_json()["value"] == 0  # other counters unaffected


@pytest.mark.parametrize("key", ["dev", "secret", "changeme", "Development", "short-key", b"test"])
def test_a_weak_secret_key_stops_the_app_outside_testing(make_app, store_settings, key):
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        make_app(store_settings("filesystem"), TESTING=False, SECRET_KEY=key)


def test_a_long_secret_key_and_testing_mode_are_accepted(make_app, store_settings):
    make_app(store_settings("filesystem"), TESTING=False, SECRET_KEY="k" * 40)
    make_app(store_settings("filesystem"), TESTING=True, SECRET_KEY="dev")


def test_session_cookie_is_secure_when_configured(make_app, store_settings):
    app = make_app(store_settings("filesystem"), SESSION_COOKIE_SECURE=True)
    cookie = app.test_client().get("/inc").headers["Set-Cookie"]
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie


# -- rate limits --------------------------------------------------------------------------------------


def limited_app(make_app, store_settings, backend="filesystem", limit="3 per minute", **extra):
    return make_app(store_settings(backend), RATELIMIT_ENABLED=True, RATELIMIT_DEFAULT=limit, **extra)


def test_rate_limits_are_off_in_the_shipped_settings(make_app, store_settings):
    client = make_app(store_settings("filesystem")).test_client()
    assert all(client.post("/api/counters/free/incr").status_code == 200 for _ in range(200))


def test_writes_over_the_limit_get_429_json_with_retry_after(make_app, store_settings):
    client = limited_app(make_app, store_settings).test_client()
    assert [client.post("/api/counters/l/incr").status_code for _ in range(3)] == [200] * 3
    response = client.post("/api/counters/l/incr")
    assert response.status_code == 429
    assert response.get_json()["error"] == "too_many_requests"
    assert int(response.headers["Retry-After"]) > 0
    assert client.get("/api/counters/l").get_json()["value"] == 3  # the refused write changed nothing
    # Each writing route has its own budget per client (Flask-Limiter's default limits).
    assert [client.get("/inc").status_code for _ in range(4)] == [200, 200, 200, 429]


def test_each_app_keeps_its_own_limits(make_app, store_settings):
    """Flask-Limiter keeps the first configuration an instance sees: shared by two apps, the second
    would get the first one's limits (seen: a "3 per minute" app answering 200 to a fourth write)."""
    generous = limited_app(make_app, store_settings, limit="100 per minute").test_client()
    strict = limited_app(make_app, store_settings, limit="3 per minute").test_client()
    assert [strict.post("/api/counters/s/incr").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert all(generous.post("/api/counters/g/incr").status_code == 200 for _ in range(10))


#: The GET routes that change something (a visit takes the next number; /inc, /dec and /reset are the
#: seed's per-client demo): limited like every write.  Every other GET route must carry the
#: ``never_limited`` mark, so that a read route added later cannot stay limited unnoticed.
WRITING_GETS = {"pages.index", "clients.inc", "clients.dec", "clients.reset"}


def get_endpoints(app) -> set[str]:
    return {rule.endpoint for rule in app.url_map.iter_rules() if "GET" in rule.methods}


def test_every_read_route_carries_the_never_limited_mark(make_app, store_settings):
    from routes.limits import is_never_limited

    app = limited_app(make_app, store_settings)
    with app.test_request_context():
        unmarked = {e for e in get_endpoints(app) if not is_never_limited(e)}
    assert unmarked == WRITING_GETS
    assert {"metrics.scrape", "health.healthz", "health.livez", "api.read"} <= get_endpoints(app) - unmarked


def test_reads_health_liveness_and_metrics_are_never_limited(make_app, store_settings):
    """An operator's scrape is never rate limited (seen: 20 of 30 scrapes of /metrics answered 429
    under a "5 per minute" default), nor any other read, however many writes came first."""
    client = limited_app(make_app, store_settings, limit="2 per minute").test_client()
    writes = [client.post("/api/counters/r/incr").status_code for _ in range(3)]
    assert writes == [200, 200, 429]  # the limit is on: only reads pass from here
    paths = ["/api/counters/r", "/api/me/counters/r", "/api/shared/s", "/api/leaderboard", "/healthz"]
    paths += ["/livez", "/metrics", "/static/style.css"]
    for path in paths:
        statuses = [client.get(path).status_code for _ in range(30)]
        assert 429 not in statuses, (path, statuses)
    assert [client.get("/inc").status_code for _ in range(3)] == [200, 200, 429]


def test_the_limit_storage_is_the_counter_store_on_every_store(make_app, store_settings, backend):
    """``tally://`` whatever the store (tests/test_ratelimits.py holds it to exact limits), unless
    RATELIMIT_STORAGE_URI names another storage."""
    app = limited_app(make_app, store_settings, backend)
    assert app.config["RATELIMIT_STORAGE_URI"] == "tally://"
    assert app.config["RATELIMIT_STORAGE_OPTIONS"]["counters"] is __import__("common").counters
    chosen = limited_app(make_app, store_settings, backend, RATELIMIT_STORAGE_URI="memory://")
    assert chosen.config["RATELIMIT_STORAGE_URI"] == "memory://"
