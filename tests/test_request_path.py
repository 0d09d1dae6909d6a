"""The counter route's fast path keeps every behaviour: no session opened or saved for the JSON API
(the page's session and CSRF unchanged), empty and chunked bodies, one cheap response with its
no-store header, JSON errors, rate limits, metrics counting each request; and combining through the
app (COUNTER_COMBINE) returns every value once."""

from __future__ import annotations

import io
import json
import os
import re
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tally.combining import Combiner
from tally.extension import ADD_KEY, EXTENSION_KEY


@pytest.fixture
def fs_app(make_app, store_settings):
    return make_app(store_settings("filesystem"))


def test_the_counter_route_answers_compact_json_that_is_never_cached(fs_app):
    response = fs_app.test_client().post("/api/counters/fast/incr")
    assert response.status_code == 200
    assert response.data == b'{"name":"fast","value":1}\n'
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Length"] == str(len(response.data))


@pytest.mark.parametrize("session_backend", ["cookie", "server"])
def test_the_json_api_neither_opens_nor_saves_a_session(make_app, store_settings, session_backend):
    app = make_app(store_settings("filesystem"), SESSION_BACKEND=session_backend)
    client = app.test_client()
    for path in ("/api/counters/a/incr", "/api/counters/a/decr"):
        response = client.post(path)
        assert response.status_code == 200
        assert "Set-Cookie" not in response.headers and "Cookie" not in response.headers.get("Vary", "")
    assert client.get("/api/counters/a").headers.get("Set-Cookie") is None
    if session_backend == "server":  # sessions are the store's shared values under "@s.": none
        values = os.path.join(app.extensions["tally"].directory, ".values", "data")
        assert not [name for name in os.listdir(values) if name.startswith("@s.")]


@pytest.mark.parametrize("session_backend", ["cookie", "server"])
def test_a_session_cookie_sent_to_the_api_is_left_as_it_was(make_app, store_settings, session_backend):
    client = make_app(store_settings("filesystem"), SESSION_BACKEND=session_backend).test_client()
    assert client.get("/inc").get_data(as_text=True) == "counter is 1"  # the page's routes use it
    cookie = client.get_cookie("session")
    assert cookie is not None
    assert "Set-Cookie" not in client.post("/api/counters/b/incr").headers
    assert client.get_cookie("session").value == cookie.value
    assert client.get("/inc").get_data(as_text=True) == "counter is 2"  # the same client still


def test_the_page_still_keeps_its_session_and_refuses_a_form_without_its_csrf_token(fs_app):
    client = fs_app.test_client()
    page = client.get("/")
    assert page.status_code == 200 and "Set-Cookie" in page.headers
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    assert client.post("/", data={"action": "inc", "csrf_token": "x" * 43}).status_code == 403
    assert client.post("/", data={"action": "inc", "csrf_token": token}).status_code == 303
    assert client.get("/api/me/counters/counter").get_json()["value"] == 1


def test_empty_bodies_step_by_one_however_they_come(fs_app):
    client = fs_app.test_client()
    assert client.post("/api/counters/e/incr").get_json()["value"] == 1
    assert client.post("/api/counters/e/incr", headers={"Content-Length": "0"}).get_json()["value"] == 2
    assert client.post("/api/counters/e/incr", data=b"", content_type="text/plain").get_json()["value"] == 3


def test_a_dechunked_body_without_a_length_is_still_read(fs_app):
    """A chunked request has no Content-Length; the server dechunks it (wsgi.input_terminated): its
    body is read, never taken for an empty one."""
    body = json.dumps({"by": 5}).encode()
    environ = {
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "CONTENT_TYPE": "application/json",
    }
    response = fs_app.test_client().post("/api/counters/chunked/incr", environ_overrides=environ)
    assert response.get_json()["value"] == 5


def test_an_empty_body_on_a_terminated_stream_steps_by_one(fs_app):
    """gunicorn marks every request's stream terminated, with no Content-Length when there is no body:
    that body is read (empty), not guessed, and a declared length of 0 is empty too."""
    client = fs_app.test_client()
    for environ in ({"wsgi.input": io.BytesIO(b""), "wsgi.input_terminated": True}, {"CONTENT_LENGTH": "0"}):
        response = client.post("/api/counters/gunicorn/incr", environ_overrides=environ)
        assert response.status_code == 200
    assert client.get("/api/counters/gunicorn").get_json()["value"] == 2


def test_a_header_the_view_set_is_kept_not_doubled():
    from flask import Response

    from routes.pages import SECURITY_HEADERS, security_headers

    response = security_headers(Response("x", headers={"x-frame-options": "SAMEORIGIN"}))
    assert response.headers.getlist("X-Frame-Options") == ["SAMEORIGIN"]
    for name, value in SECURITY_HEADERS.items():
        if name != "X-Frame-Options":
            assert response.headers.getlist(name) == [value]


def test_errors_on_the_counter_route_are_json_and_not_cached(fs_app):
    client = fs_app.test_client()
    cases = [
        (client.post("/api/counters/-bad/incr"), 400, "invalid_name"),
        (client.post("/api/counters/x/incr", data="by=2", content_type="text/plain"), 415, None),
        (client.post("/api/counters/x/incr", json={"by": 0}), 400, "invalid_amount"),
        (client.get("/api/counters/x/incr"), 405, None),
    ]
    for response, status, error in cases:
        assert response.status_code == status
        assert response.headers["Cache-Control"] == "no-store"
        assert response.is_json and "error" in response.get_json()
        if error:
            assert response.get_json()["error"] == error


def test_rate_limits_still_apply_to_the_counter_route(make_app, store_settings):
    client = make_app(store_settings("filesystem"), RATELIMIT_ENABLED=True, RATELIMIT_DEFAULT="3 per minute")
    client = client.test_client()
    assert [client.post("/api/counters/r/incr").status_code for _ in range(4)] == [200, 200, 200, 429]
    assert client.get("/api/counters/r").get_json()["value"] == 3


def samples(client) -> dict[tuple[str, tuple], float]:
    text = client.get("/metrics", environ_overrides={"REMOTE_ADDR": "127.0.0.1"}).get_data(as_text=True)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(found: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in found.items() if n == name and all((k, labels[k]) in ls for k in labels))


@pytest.mark.parametrize("backend", ["filesystem", "memcached", "redis"])
def test_metrics_count_every_request_and_step_combined_or_not(make_app, store_settings, backend):
    app = make_app(store_settings(backend))
    client = app.test_client()
    before = samples(client)

    def run() -> None:
        own = app.test_client()  # one client per thread: a test client is not shared
        for _ in range(10):
            assert own.post("/api/counters/m/incr").status_code == 200

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    after = samples(client)
    ops = dict(name="tally_store_operations_total", operation="incr", outcome="ok")
    assert metric(after, **ops) - metric(before, **ops) == 80
    http = dict(name="tally_http_requests_total", endpoint="api.incr", status="200")
    assert metric(after, **http) - metric(before, **http) == 80


@pytest.mark.parametrize("backend", ["memcached", "redis"])
def test_combining_is_on_by_default_on_the_remote_stores_and_every_value_comes_once(
    make_app, store_settings, backend
):
    app = make_app(store_settings(backend))
    combiner = app.extensions[ADD_KEY].__self__
    assert isinstance(combiner, Combiner)
    outcomes: list[list[int]] = [[] for _ in range(12)]

    def run(index: int) -> None:
        own = app.test_client()
        for _ in range(40):
            outcomes[index].append(own.post("/api/counters/hot/incr").get_json()["value"])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    values = sorted(v for outcome in outcomes for v in outcome)
    assert values == list(range(1, 12 * 40 + 1))
    assert app.test_client().get("/api/counters/hot").get_json()["value"] == 12 * 40
    assert combiner.shared_steps > 0  # the requests did share steps


@pytest.mark.parametrize("backend", ["filesystem", "memcached", "redis"])
def test_combining_off_or_on_a_local_store_is_the_stores_own_step(make_app, store_settings, backend):
    app = make_app(store_settings(backend), COUNTER_COMBINE=False)
    assert app.extensions[ADD_KEY] == app.extensions[EXTENSION_KEY].add
    if backend == "filesystem":
        app = make_app(store_settings(backend))
        assert app.extensions[ADD_KEY] == app.extensions[EXTENSION_KEY].add


def test_a_bad_combine_setting_fails_at_start_up(make_app, store_settings):
    from settings import ConfigError

    with pytest.raises(ConfigError, match="COUNTER_COMBINE must be true or false"):
        make_app(store_settings("filesystem"), COUNTER_COMBINE="yes")
