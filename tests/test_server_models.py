"""Every server model of the seed thread, and what happens to workers that are told to stop.

``app.run(threaded=True)``, ``app.run(processes=4)`` (Werkzeug's forking server: a fork per request, its
memory thrown away after the response), ``flask run --with-threads`` and gunicorn's gevent worker
(TALLY_WORKER_CLASS=gevent) on every store, a few hundred requests each: the shared stores stay exact,
the memory store refuses rather than count in a process that forgets.  gunicorn gthread 4x8 runs in
tests/test_concurrency.py (100 x 30); the larger matrix, naive variants included, is ``make
race-report``; what gevent does to each store's client is tests/test_gevent.py.
"""

from __future__ import annotations

import collections
import http.client
import json
import os
import signal
import threading
import time

import pytest

from tally.loadcheck import run_load
from tests.conftest import SHARED_BACKENDS, settings_env, under_load
from tests.servers import ROOT, DevServer, FlaskDevServer, Gunicorn, child_pids, process_state

pytestmark = pytest.mark.slow


@pytest.fixture
def dev_server():
    """Start a server of one model ("threaded", "processes=N", "flask run", "gevent": gunicorn's gevent
    worker, 4 workers unless told); each is stopped by its pid afterwards."""
    started: list[Gunicorn] = []

    def start(env: dict[str, str], model: str, **options) -> Gunicorn:
        env = under_load(env)
        if model == "flask run":
            server: Gunicorn = FlaskDevServer(env, **options)
        elif model == "gevent":
            server = Gunicorn(env, worker_class="gevent", **{"workers": 4, **options})
        else:
            server = DevServer(env, model, **options)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def post(server, path: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        connection.request("POST", path, headers={"Connection": "close"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


MODELS = ["threaded", "processes=4", "flask run", "gevent"]
#: ``make test`` runs each shared store under one model, the models in turn (8 cells: every store
#: once, every model twice); ``make stress`` (TALLY_FULL_MATRIX=1) runs all 32 cells, and ``make
#: race-report`` every store under every model through the load checker.
CELLS = (
    [(backend, model) for backend in SHARED_BACKENDS for model in MODELS]
    if os.environ.get("TALLY_FULL_MATRIX") == "1"
    else [(backend, MODELS[i % len(MODELS)]) for i, backend in enumerate(SHARED_BACKENDS)]
)


@pytest.mark.light  # 20 clients x 10 requests on a development server, exact values, nothing timed
@pytest.mark.parametrize("backend, model", CELLS)
def test_every_server_model_stays_exact_on_shared_stores(dev_server, store_settings, backend, model):
    server = dev_server(settings_env(store_settings(backend)), model)
    report = run_load(f"{server.url}/api/counters/dev/incr", clients=20, requests=10, keepalive=False)
    assert report.errors == {} and report.ok == 200, (report.statuses, report.errors)
    assert report.exact(start=0)


@pytest.mark.parametrize("model", ["flask run", "gevent"])
def test_the_memory_store_is_exact_in_one_process_of_threads_or_greenlets(dev_server, store_settings, model):
    server = dev_server(settings_env(store_settings("memory")), model, workers=1)
    report = run_load(f"{server.url}/api/counters/one/incr", clients=20, requests=10, keepalive=False)
    assert report.ok == 200 and report.exact(start=0)


def test_the_memory_store_refuses_several_gevent_workers(store_settings):
    server = Gunicorn(settings_env(store_settings("memory")), workers=2, worker_class="gevent")
    try:
        with pytest.raises(RuntimeError):
            server.start()
        server.process.wait(timeout=10)
        assert "the memory store keeps counters inside one process" in server.log_text()
    finally:
        server.stop()


def test_a_global_variable_loses_the_race_under_gevent_workers(dev_server):
    """The naive counterpart of the gevent rows: greenlets of one worker never interleave inside
    ``param += 1``, but four workers each count on their own."""
    server = dev_server({}, "gevent", app="naive_app:app", use_project_config=False)
    report = run_load(f"{server.url}/global/g/incr", clients=40, requests=10, keepalive=False)
    assert report.ok == 400
    assert report.duplicates > 0


def test_the_memory_store_refuses_a_fork_per_request_rather_than_count_wrong(dev_server, store_settings):
    """The seed's ``app.run(processes=10)``: each request runs in a fork whose memory is discarded,
    so counting there would answer 1 every time.  Every request is refused, naming the fix."""
    server = dev_server(settings_env(store_settings("memory")), "processes=4")
    answers = [post(server, "/api/counters/x/incr") for _ in range(5)]
    assert all(status == 500 for status, _ in answers), answers
    assert all(body["error"] == "store_not_shared" for _, body in answers)
    assert "shared store" in answers[0][1]["detail"]
    assert "forked from it" in server.log_text() and "redis" in server.log_text()  # the fix, logged


def test_the_memory_store_is_exact_under_app_run_threaded(dev_server, store_settings):
    server = dev_server(settings_env(store_settings("memory")), "threaded")
    report = run_load(f"{server.url}/api/counters/t/incr", clients=20, requests=10, keepalive=False)
    assert report.ok == 200 and report.exact(start=0)


def test_the_memory_store_in_workers_that_each_built_the_app_counts_in_one_only(serve, store_settings):
    """gunicorn without Tally's config (no check in the master, each worker imports the app), like
    uWSGI or mod_wsgi with several processes: one worker counts, the others refuse; the numbers
    handed out are never repeated."""
    env = settings_env(store_settings("memory"))
    server = serve(env, workers=3, threads=4, app="app:app", use_project_config=False)
    values: list[int] = []
    statuses: collections.Counter[int] = collections.Counter()
    for _ in range(5):  # which worker accepts is the kernel's choice: a busy machine may pick one
        report = run_load(f"{server.url}/api/counters/m/incr", clients=30, requests=10, keepalive=False)
        assert report.errors == {}
        values += report.values
        statuses.update(report.statuses)
        if statuses[500]:
            break
    assert set(statuses) <= {200, 500}
    assert sorted(values) == list(range(1, statuses[200] + 1))  # never a number twice
    assert statuses[500] > 0  # several workers served, and the others refused


def test_a_worker_with_a_stuck_request_exits_on_sigterm_within_graceful_timeout():
    """A request thread that never returns must not keep its worker alive past graceful_timeout: with
    the master gone (killed), nothing else would ever stop it.  The watchdog also logs the stacks."""
    graceful = 2
    env = {"PYTHONPATH": str(ROOT / "tests"), "TALLY_GRACEFUL_TIMEOUT": str(graceful)}
    server = Gunicorn(env, workers=2, threads=2, app="stuck_app:app").start()
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while len(workers) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
            workers = child_pids(server.process.pid)
        assert len(workers) == 2

        def hang() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            try:
                connection.request("GET", "/stuck")
                connection.getresponse()
            except (OSError, http.client.HTTPException):
                pass

        for _ in range(4):
            threading.Thread(target=hang, daemon=True).start()
        time.sleep(1.0)  # the requests reach the workers and block there
        os.kill(server.process.pid, signal.SIGKILL)  # no master left to SIGKILL its workers later
        server.process.wait(timeout=10)
        began = time.monotonic()
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        while (
            any(process_state(pid) not in (None, "Z") for pid in workers)
            and time.monotonic() - began < graceful + 20
        ):
            time.sleep(0.1)
        took = time.monotonic() - began
        assert not any(process_state(pid) not in (None, "Z") for pid in workers), (
            "a worker outlived its SIGTERM"
        )
        assert took < graceful + 5, took  # by its own watchdog, not by anything else
        assert "Timeout" in server.log_text() or "Thread" in server.log_text()  # the stacks were logged
    finally:
        for pid in workers:
            if process_state(pid) not in (None, "Z"):
                os.kill(pid, signal.SIGKILL)
        server.stop()
