"""Operating Tally: /metrics summed over gunicorn's workers and closed to the outside, a /healthz that
tells strangers nothing, and operator log lines written once per event, not once per request."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tally import metrics as tally_metrics
from tally.loadcheck import run_load
from tests.conftest import SHARED_BACKENDS, settings_env
from tests.servers import ROOT, Memcached, child_pids

ADMIN_TOKEN = "admin-" + "a" * 24
METRICS_TOKEN = "metrics-" + "m" * 24
INT64_MAX = 2**63 - 1


def scrape(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text exposition: (name, labels, value)."""
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(samples, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        value
        for sample_name, sample_labels, value in samples
        if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items())
    )


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# -- /metrics under gunicorn: every worker counted, exactly ------------------------------------------


@pytest.mark.light  # exact counts and files, no timing
@pytest.mark.slow
@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_scraped_totals_add_up_to_the_requests_sent_across_workers(serve, store_settings, backend):
    server = serve(settings_env(store_settings(backend)), workers=4, threads=8)
    name = "metrics-load"
    report = run_load(f"{server.url}/api/counters/{name}/incr", clients=40, requests=25, keepalive=False)
    assert report.ok == report.sent == 1000 and report.exact(start=0)
    members = run_load(
        f"{server.url}/api/shared/metrics-set/add",
        clients=20,
        requests=10,
        keepalive=False,
        body_for=lambda client, request: json.dumps({"member": f"m{client}-{request}"}).encode(),
        integer_values=False,
    )
    assert members.ok == members.sent == 200

    with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:  # from loopback
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples = scrape(text)
    assert total(samples, "tally_http_requests_total", endpoint="api.incr", status="200") == report.sent
    assert total(samples, "tally_http_requests_total", endpoint="shared.add", status="200") == members.sent
    steps = {"operation": "incr"}  # one backend per server: its label is the store's own name
    backends = {labels["backend"] for name, labels, _ in samples if name == "tally_store_operations_total"}
    assert len(backends) == 1
    assert total(samples, "tally_store_operations_total", outcome="ok", **steps) == report.sent
    assert total(samples, "tally_store_operations_total", **steps) == report.sent  # no other outcome
    assert total(samples, "tally_store_operation_seconds_count", **steps) == report.sent
    assert total(samples, "tally_store_operation_seconds_bucket", le="+Inf", **steps) == report.sent
    update = {"operation": "value_update", "outcome": "ok"}
    assert total(samples, "tally_store_operations_total", **update) == members.sent
    # The figures came from several processes' files, summed: the load reached more than one worker.
    directory = Path(server.instance_path) / "metrics" / str(server.process.pid)
    assert len(list(directory.glob("counter_*.db"))) >= 2
    # Names that users choose are never labels.
    assert name not in text and "metrics-set" not in text


@pytest.mark.light  # exact counts and files, no timing
def test_the_counts_of_a_worker_that_died_stay_in_the_totals(serve, store_settings):
    """A worker killed (and replaced by gunicorn) leaves its file behind: totals never go back."""
    server = serve(settings_env(store_settings("filesystem")), workers=2, threads=4)
    report = run_load(f"{server.url}/api/counters/dies/incr", clients=10, requests=20, keepalive=False)
    assert report.ok == 200

    def incr_total() -> float:
        with urllib.request.urlopen(f"{server.url}/metrics", timeout=10) as response:
            samples = scrape(response.read().decode())
        return total(samples, "tally_store_operations_total", operation="incr", outcome="ok")

    assert incr_total() == 200
    workers = child_pids(server.process.pid)
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while workers[0] in child_pids(server.process.pid) or len(child_pids(server.process.pid)) < 2:
        assert time.monotonic() < deadline, "gunicorn did not replace the killed worker"
        time.sleep(0.1)
    assert incr_total() == 200


@pytest.mark.light  # exact counts and files, no timing
def test_the_metrics_directory_is_the_masters_own_and_stale_ones_are_removed(serve, store_settings, tmp_path):
    instance = tmp_path / "instance"
    stale = instance / "metrics" / "999999999"  # above any pid this kernel hands out
    stale.mkdir(parents=True)
    (stale / "counter_123.db").write_bytes(b"")
    # A short graceful stop: the master must reach on_exit before the fixture's 10 s SIGKILL.
    env = {**settings_env(store_settings("filesystem")), "TALLY_GRACEFUL_TIMEOUT": "3"}
    server = serve(env, workers=2, threads=2, instance_path=str(instance))
    assert not stale.exists()
    own = instance / "metrics" / str(server.process.pid)
    assert own.is_dir()
    server.stop()
    assert not own.exists()  # the master removes its own directory when it stops


# -- /metrics access: the token, or a direct request from loopback -----------------------------------


@pytest.fixture
def open_app(make_app, store_settings):
    """No METRICS_TOKEN: loopback only."""
    return make_app(store_settings("filesystem"))


@pytest.fixture
def token_app(make_app, store_settings):
    return make_app(store_settings("filesystem"), METRICS_TOKEN=METRICS_TOKEN, TALLY_ADMIN_TOKEN=ADMIN_TOKEN)


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "::ffff:127.0.0.1"])
def test_metrics_answer_a_direct_loopback_request_without_a_token(open_app, address):
    response = open_app.test_client().get("/metrics", environ_base={"REMOTE_ADDR": address})
    assert response.status_code == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert "tally_http_requests_total" in response.get_data(as_text=True)


@pytest.mark.parametrize(
    "address, headers",
    [
        ("10.0.0.7", {}),
        ("192.0.2.1", {}),
        ("127.0.0.2", {}),
        ("::ffff:10.0.0.7", {}),
        ("2001:db8::1", {}),
        ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}),
        ("127.0.0.1", {"Forwarded": "for=203.0.113.9"}),
        ("127.0.0.1", {"X-Real-IP": "203.0.113.9"}),
        ("::1", {"X-Forwarded-For": "127.0.0.1"}),  # a proxy's header is never trusted, whatever it says
    ],
)
def test_metrics_refuse_a_remote_or_proxied_request_without_a_token(open_app, address, headers):
    response = open_app.test_client().get("/metrics", headers=headers, environ_base={"REMOTE_ADDR": address})
    assert response.status_code == 403
    assert response.get_json()["error"] == "forbidden"
    assert "METRICS_TOKEN" in response.get_json()["detail"]


@pytest.mark.parametrize(
    "headers", [{}, bearer("wrong"), bearer(ADMIN_TOKEN), {"Authorization": METRICS_TOKEN}]
)
def test_with_a_token_set_metrics_need_it_even_from_loopback(token_app, headers):
    response = token_app.test_client().get("/metrics", headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].lower().startswith("bearer")


def test_with_its_token_a_remote_proxied_scraper_gets_the_metrics(token_app):
    client = token_app.test_client()
    client.post("/api/counters/secret-name/incr")
    response = client.get(
        "/metrics",
        headers={**bearer(METRICS_TOKEN), "X-Forwarded-For": "203.0.113.9"},
        environ_base={"REMOTE_ADDR": "10.0.0.7"},
    )
    assert response.status_code == 200
    text = response.get_data(as_text=True)
    assert 'endpoint="api.incr"' in text
    assert "secret-name" not in text  # counter names are never labels


def test_http_requests_are_counted_by_endpoint_never_by_path(open_app):
    client = open_app.test_client()
    before = scrape(client.get("/metrics").get_data(as_text=True))
    for number in range(5):
        client.post(f"/api/counters/name{number}/incr")
    client.get("/no/such/path-xyz")
    client.post("/api/counters/bad name/incr")
    after = scrape(client.get("/metrics").get_data(as_text=True))
    assert all(f"name{n}" not in labels.values() for _, labels, _ in after for n in range(5))
    assert not any("path-xyz" in value for _, labels, _ in after for value in labels.values())

    def grew(**labels: str) -> float:
        return total(after, "tally_http_requests_total", **labels) - total(
            before, "tally_http_requests_total", **labels
        )

    assert grew(endpoint="api.incr", status="200") == 5
    assert grew(endpoint="api.incr", status="400") == 1
    assert grew(endpoint="unmatched", status="404") == 1


def test_overflows_are_counted_as_an_outcome(token_app):
    client = token_app.test_client()
    assert (
        client.put("/api/counters/top", json={"value": INT64_MAX}, headers=bearer(ADMIN_TOKEN)).status_code
        == 200
    )
    before = scrape(client.get("/metrics", headers=bearer(METRICS_TOKEN)).get_data(as_text=True))
    for _ in range(3):
        assert client.post("/api/counters/top/incr").status_code == 409
    after = scrape(client.get("/metrics", headers=bearer(METRICS_TOKEN)).get_data(as_text=True))
    labels = {"backend": "filesystem", "operation": "incr", "outcome": "overflow"}
    assert (
        total(after, "tally_store_operations_total", **labels)
        - total(before, "tally_store_operations_total", **labels)
        == 3
    )


#: Steps and HTTP requests recorded by tally.metrics itself, in a process of its own (prometheus_client
#: picks its mode at import); a forked child records too, then exits without any clean-up.
RECORDING = """
import os, sys
from tally import metrics
from tally.errors import Overflow

class Store:
    backend = "filesystem"

    def where(self):
        return ""

def overflow(key, by):
    raise Overflow("no")

store = Store()
incr = metrics.measured(store, "incr", lambda key, by: by)
for _ in range(3):
    incr("c", 1)
try:
    metrics.measured(store, "incr", overflow)("c", 1)
except Overflow:
    pass
metrics.http_request("api.incr", 200)
if sys.argv[1] == "fork":
    pid = os.fork()
    if pid == 0:
        for _ in range(5):
            incr("c", 1)
        metrics.measure(store, "get", "c", lambda key: 0)
        metrics.http_request("api.incr", 200)
        os._exit(0)  # no atexit, no flush: what a SIGKILL leaves
    os.waitpid(pid, 0)
print(metrics.exposition()[0].decode())
"""


def recorded(tmp_path, *, multiprocess: bool) -> tuple[list, Path | None]:
    env = {**os.environ}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    directory = None
    if multiprocess:
        directory = tmp_path / "metrics"
        directory.mkdir()
        env["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    mode = "fork" if multiprocess else "alone"
    result = subprocess.run(
        [sys.executable, "-c", RECORDING, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return scrape(result.stdout), directory


def test_every_step_is_in_the_files_when_it_returns_in_every_process(tmp_path):
    """Multiprocess mode (gunicorn's): each process writes its steps through to files of its own pid at
    once, so the scrape sums a parent and a child that died without any clean-up; the child counted
    from 0 (not again the parent's steps), and every bucket of the histogram is there."""
    samples, directory = recorded(tmp_path, multiprocess=True)
    incr = {"backend": "filesystem", "operation": "incr"}
    assert total(samples, "tally_store_operations_total", outcome="ok", **incr) == 3 + 5
    assert total(samples, "tally_store_operations_total", outcome="overflow", **incr) == 1
    assert total(samples, "tally_store_operation_seconds_count", **incr) == 3 + 1 + 5
    assert total(samples, "tally_store_operation_seconds_bucket", le="+Inf", **incr) == 3 + 1 + 5
    buckets = [
        labels["le"]
        for name, labels, _ in samples
        if name.endswith("_bucket") and labels == {**labels, **incr}
    ]
    assert len(buckets) == len(tally_metrics.LATENCY_BUCKETS) + 1
    assert total(samples, "tally_store_operations_total", operation="get", outcome="ok") == 1
    assert total(samples, "tally_http_requests_total", endpoint="api.incr", status="200") == 2
    assert directory is not None and len(list(directory.glob("counter_*.db"))) == 2  # one per process


def test_in_one_process_the_registry_has_the_same_families(tmp_path):
    """Without PROMETHEUS_MULTIPROC_DIR, prometheus_client's registry (what the app's /metrics, or any
    exporter of the app, reads) has Tally's families as its own Counter and Histogram would give them."""
    samples, _ = recorded(tmp_path, multiprocess=False)
    incr = {"backend": "filesystem", "operation": "incr"}
    assert total(samples, "tally_store_operations_total", outcome="ok", **incr) == 3
    assert total(samples, "tally_store_operation_seconds_count", **incr) == 4
    cumulative = [
        value for name, labels, value in samples if name.endswith("_bucket") and labels == {**labels, **incr}
    ]
    assert len(cumulative) == len(tally_metrics.LATENCY_BUCKETS) + 1
    assert cumulative == sorted(cumulative) and cumulative[-1] == 4
    assert total(samples, "tally_store_operation_seconds_sum", **incr) > 0
    created = [name for name, _, _ in samples if name.endswith("_created")]
    assert "tally_store_operations_created" in created and "tally_http_requests_created" in created
    assert total(samples, "tally_http_requests_total", endpoint="api.incr", status="200") == 1


def test_the_library_works_without_prometheus_client(tmp_path):
    """Metrics are optional: with prometheus_client unimportable, counters count and /metrics says why
    it has nothing (501)."""
    script = f"""
import sys
sys.modules["prometheus_client"] = None  # import fails, as when it is not installed
from app import create_app
from tally import metrics
assert not metrics.ENABLED
app = create_app({{"TESTING": True, "SECRET_KEY": "k" * 40, "COUNTER_DIR": {str(tmp_path / "c")!r}}})
client = app.test_client()
assert [client.post("/api/counters/a/incr").get_json()["value"] for _ in range(3)] == [1, 2, 3]
response = client.get("/metrics")
assert response.status_code == 501, response.status_code
print("ok")
"""
    env = {**os.environ, "TALLY_INSTANCE_PATH": str(tmp_path / "instance")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# -- /healthz: status and backend for anyone, details for the operator -------------------------------


def test_healthz_tells_anyone_only_status_and_backend(token_app):
    for headers in ({}, bearer("wrong")):
        response = token_app.test_client().get("/healthz", headers=headers)
        assert response.status_code == 200
        assert response.get_json() == {"status": "ok", "backend": "filesystem"}
        text = response.get_data(as_text=True)
        assert "/" not in text and str(os.getpid()) not in text


@pytest.mark.parametrize("token", [ADMIN_TOKEN, METRICS_TOKEN])
def test_healthz_shows_the_details_with_a_token(token_app, token):
    body = token_app.test_client().get("/healthz", headers=bearer(token)).get_json()
    assert body["status"] == "ok" and body["backend"] == "filesystem"
    assert body["pid"] == os.getpid()
    assert body["directory"] == token_app.config["COUNTER_DIR"]
    assert body["latency_ms"] >= 0


def test_healthz_hides_memcached_addresses_and_uptimes_without_a_token(
    make_app, store_settings, memcached_server
):
    app = make_app(store_settings("memcached"), TALLY_ADMIN_TOKEN=ADMIN_TOKEN)
    client = app.test_client()
    anonymous = client.get("/healthz")
    assert anonymous.get_json() == {"status": "ok", "backend": "memcached"}
    assert str(memcached_server.port) not in anonymous.get_data(as_text=True)
    detailed = client.get("/healthz", headers=bearer(ADMIN_TOKEN)).get_json()
    assert detailed["servers"][0]["address"] == memcached_server.address
    assert detailed["servers"][0]["uptime"] >= 0


def test_healthz_of_an_unreachable_store_is_a_bare_503(make_app, tmp_path):
    from tests.servers import free_port

    app = make_app(
        {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"},
        COUNTER_DIR=str(tmp_path / "counters"),
        COUNTER_TIMEOUT=0.5,
    )
    response = app.test_client().get("/healthz")
    assert response.status_code == 503
    assert response.get_json() == {"status": "unavailable", "backend": "redis"}


# -- logs: once per event per worker -------------------------------------------------------------------


def lines(caplog, text: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if text in record.getMessage()]


@pytest.fixture
def own_memcached():
    servers: list[Memcached] = []

    def start(server: Memcached | None = None) -> Memcached:
        servers.append((server or Memcached()).start())
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def test_an_outage_is_logged_once_when_it_starts_and_once_when_it_ends(
    make_app, tmp_path, own_memcached, caplog, monkeypatch
):
    monkeypatch.setattr(tally_metrics, "RECOVERY_QUIET_SECONDS", 0.3)
    store = own_memcached()
    # One pooled connection: with more, each connection left idle across a restart fails once after it
    # (a 503 and, rightly, a new outage), which would make the count depend on the pool's rotation.
    app = make_app(
        {"CACHE_TYPE": "MemcachedCache", "CACHE_MEMCACHED_SERVERS": [store.address]},
        COUNTER_DIR=str(tmp_path / "counters"),
        COUNTER_TIMEOUT=0.5,
        COUNTER_POOL_SIZE=1,
    )
    client = app.test_client()
    caplog.set_level(logging.INFO)
    assert client.post("/api/counters/c/incr").status_code == 200
    for outage in range(2):  # two outages: two pairs of lines
        store.stop()
        for _ in range(5):
            assert client.post("/api/counters/c/incr").status_code == 503
        assert client.get("/healthz").status_code == 503
        assert client.get("/inc").status_code == 503
        store.start()
        deadline = time.monotonic() + 15
        while client.post("/api/counters/c/incr").status_code != 200:
            assert time.monotonic() < deadline, "no 200 within 15 s of the store's return"
            time.sleep(0.1)
        time.sleep(0.4)  # past RECOVERY_QUIET_SECONDS
        for _ in range(5):
            assert client.post("/api/counters/c/incr").status_code == 200
        down = lines(caplog, "store unreachable")
        up = lines(caplog, "store recovered")
        assert len(down) == outage + 1, down
        assert len(up) == outage + 1, up
    assert all("memcached" in line and store.address in line for line in down + up)


def test_an_overflow_is_logged_once_per_counter(token_app, caplog):
    client = token_app.test_client()
    for name in ("top", "other"):
        client.put(f"/api/counters/{name}", json={"value": INT64_MAX}, headers=bearer(ADMIN_TOKEN))
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            assert client.post("/api/counters/top/incr").status_code == 409
        assert len(lines(caplog, "overflow")) == 1
        assert client.post("/api/counters/other/incr").status_code == 409
        assert client.post("/api/me/counters/mine/incr", json={"by": INT64_MAX}).status_code == 200
        for _ in range(3):
            assert client.post("/api/me/counters/mine/incr", json={"by": INT64_MAX}).status_code == 409
    logged = lines(caplog, "overflow")
    assert len(logged) == 3, logged
    assert "'top'" in logged[0] and "'other'" in logged[1] and "per-client" in logged[2]
    assert all("filesystem" in line for line in logged)
    session_id = client.get_cookie("session")
    assert session_id is None or session_id.value not in logged[2]


class SmallMemcached(Memcached):
    """memcached with 2 MB of memory: a few large items make it evict."""

    def command(self) -> list[str]:
        command = super().command()
        command[command.index("-m") + 1] = "2"
        return command


def test_evictions_are_logged_when_they_grow_not_at_every_check(make_app, tmp_path, own_memcached, caplog):
    from pymemcache.client.base import Client

    store = own_memcached(SmallMemcached())
    app = make_app(
        {"CACHE_TYPE": "MemcachedCache", "CACHE_MEMCACHED_SERVERS": [store.address]},
        COUNTER_DIR=str(tmp_path / "counters"),
        TALLY_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    client = app.test_client()
    filler = Client(("127.0.0.1", store.port))

    def fill(rounds: int) -> None:
        """Write until memcached evicts, then wait for its background evictions to settle."""
        for number in range(rounds):
            filler.set(f"fill-{time.monotonic_ns()}-{number}", b"x" * 200_000)
        previous = None
        for _ in range(50):
            evictions = int(filler.stats()[b"evictions"])
            if evictions == previous:
                return
            previous = evictions
            time.sleep(0.2)

    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert client.get("/healthz", headers=bearer(ADMIN_TOKEN)).status_code == 200
        assert lines(caplog, "evicted") == []
        fill(40)
        for _ in range(3):
            assert client.get("/healthz", headers=bearer(ADMIN_TOKEN)).status_code == 200
        assert len(lines(caplog, "evicted")) == 1
        fill(40)
        for _ in range(3):
            assert client.get("/healthz", headers=bearer(ADMIN_TOKEN)).status_code == 200
    logged = lines(caplog, "evicted")
    assert len(logged) == 2, logged
    assert all(store.address in line for line in logged)
    filler.close()


def test_a_memcached_restart_is_logged_once_and_counted(make_app, tmp_path, own_memcached, caplog):
    store = own_memcached()
    app = make_app(
        {"CACHE_TYPE": "MemcachedCache", "CACHE_MEMCACHED_SERVERS": [store.address]},
        COUNTER_DIR=str(tmp_path / "counters"),
        TALLY_ADMIN_TOKEN=ADMIN_TOKEN,
    )
    client = app.test_client()
    assert client.get("/healthz", headers=bearer(ADMIN_TOKEN)).status_code == 200
    time.sleep(5)  # memcached counts uptime in whole seconds, from a little before it starts
    store.stop()
    store.start()
    with caplog.at_level(logging.WARNING):
        for _ in range(4):
            body = client.get("/healthz", headers=bearer(ADMIN_TOKEN)).get_json()
            assert body["servers"][0]["restarted"] is True
    logged = lines(caplog, "restarted")
    assert len(logged) == 1 and store.address in logged[0], logged
    samples = scrape(client.get("/metrics").get_data(as_text=True))
    assert total(samples, "tally_memcached_restarts_seen", server=store.address) == 1
