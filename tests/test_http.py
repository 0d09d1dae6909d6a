"""The HTTP surface and the CLI through Flask's test client: statuses, JSON shapes, and that a refused
request changes nothing."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import time

import pytest

from common import counters
from settings import ConfigError
from tests.conftest import BACKENDS
from tests.servers import HOST, free_port

TOKEN = "s3cret-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def fs_app(make_app, store_settings):
    """One backend is enough for behaviour that does not depend on the store."""
    return make_app(store_settings("filesystem"))


@pytest.fixture
def web(fs_app):
    return fs_app.test_client()


@pytest.fixture
def admin_app(make_app, store_settings):
    return make_app(store_settings("filesystem"), TALLY_ADMIN_TOKEN=TOKEN)


@pytest.fixture
def admin(admin_app):
    return admin_app.test_client()


def value_of(client, name: str) -> int:
    response = client.get(f"/api/counters/{name}")
    assert response.status_code == 200
    return response.get_json()["value"]


def assert_error(response, status: int, error: str | None = None) -> dict:
    """A JSON error of the one shape, with the status (and error code) expected."""
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error", "detail"}
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["detail"], str)
    if error is not None:
        assert body["error"] == error
    return body


# -- shared counters: reading and counting ---------------------------------------------------------


def test_a_missing_counter_reads_zero_and_is_not_cached(web):
    response = web.get("/api/counters/fresh")
    assert response.status_code == 200
    assert response.get_json() == {"name": "fresh", "value": 0}
    assert response.headers["Cache-Control"] == "no-store"


def test_incr_and_decr_without_a_body_step_by_one(web):
    response = web.post("/api/counters/n/incr")
    assert response.status_code == 200
    assert response.get_json() == {"name": "n", "value": 1}
    assert response.headers["Cache-Control"] == "no-store"
    assert web.post("/api/counters/n/incr").get_json()["value"] == 2
    response = web.post("/api/counters/n/decr")
    assert response.get_json() == {"name": "n", "value": 1}
    assert response.headers["Cache-Control"] == "no-store"
    assert value_of(web, "n") == 1


def test_incr_and_decr_by_an_amount(web):
    assert web.post("/api/counters/n/incr", json={"by": 5}).get_json()["value"] == 5
    assert web.post("/api/counters/n/decr", json={"by": 7}).get_json()["value"] == -2
    assert value_of(web, "n") == -2


def test_an_empty_json_object_steps_by_one(web):
    assert web.post("/api/counters/n/incr", json={}).get_json()["value"] == 1


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_get_incr_decr_over_http_on_every_backend(make_app, store_settings, backend):
    web = make_app(store_settings(backend)).test_client()
    assert web.get("/api/counters/smoke").get_json() == {"name": "smoke", "value": 0}
    assert web.post("/api/counters/smoke/incr", json={"by": 10}).get_json()["value"] == 10
    assert web.post("/api/counters/smoke/decr").get_json()["value"] == 9
    assert web.get("/api/counters/smoke").get_json() == {"name": "smoke", "value": 9}
    # per-client counters take the store's expiring path
    assert web.get("/inc").get_data(as_text=True) == "counter is 1"
    assert web.post("/api/me/counters/smoke/incr", json={"by": 2}).get_json()["value"] == 2
    assert web.get("/api/counters/smoke").get_json()["value"] == 9


# -- shared counters: bad input is a 4xx and changes nothing ---------------------------------------


@pytest.mark.parametrize(
    "name",
    ["x" * 65, "-lead", "_lead", "a%20b", "%C3%A9t%C3%A9", "@x"],
    ids=["too-long", "leading-dash", "leading-underscore", "space", "unicode", "client-mark"],
)
def test_invalid_names_are_400(web, name):
    for response in (
        web.get(f"/api/counters/{name}"),
        web.post(f"/api/counters/{name}/incr"),
        web.post(f"/api/counters/{name}/decr"),
    ):
        assert_error(response, 400, "invalid_name")


def test_a_name_of_64_characters_is_fine(web):
    name = "a" * 64
    assert web.post(f"/api/counters/{name}/incr").get_json() == {"name": name, "value": 1}


@pytest.mark.parametrize(
    "by",
    ["1", 1.0, 1.5, True, None, 0, -1, 2**63, [1], {"n": 1}],
    ids=["string", "float", "fraction", "bool", "null", "zero", "negative", "2**63", "list", "object"],
)
@pytest.mark.parametrize("op", ["incr", "decr"])
def test_bad_amounts_are_400_and_change_nothing(web, op, by):
    web.post("/api/counters/a/incr", json={"by": 3})
    assert_error(web.post(f"/api/counters/a/{op}", json={"by": by}), 400, "invalid_amount")
    assert value_of(web, "a") == 3


def test_unknown_body_fields_are_400_and_change_nothing(web):
    web.post("/api/counters/a/incr", json={"by": 3})
    body = assert_error(web.post("/api/counters/a/incr", json={"by": 1, "step": 2}), 400, "bad_request")
    assert "step" in body["detail"]
    assert value_of(web, "a") == 3


@pytest.mark.parametrize(
    "raw",
    ["[1]", '"by"', "7", "null", "{by: 1}", '{"by": 1', "\xff", "[" * 4000, '{"a":' * 600 + "1" + "}" * 600],
    ids=[
        "array",
        "string",
        "number",
        "null",
        "unquoted",
        "truncated",
        "not-utf8",
        "deep-array",
        "deep-unknown-field",
    ],
)
def test_bodies_that_are_not_a_json_object_are_400_and_change_nothing(web, raw):
    web.post("/api/counters/a/incr", json={"by": 3})
    data = raw.encode("latin-1")
    response = web.post("/api/counters/a/incr", data=data, content_type="application/json")
    assert_error(response, 400, "bad_request")
    assert value_of(web, "a") == 3


def test_5000_open_brackets_are_refused_before_parsing(web):
    response = web.post("/api/counters/a/incr", data="[" * 5000, content_type="application/json")
    assert_error(response, 413, "request_entity_too_large")  # over 4096 bytes: never parsed
    assert value_of(web, "a") == 0


@pytest.mark.parametrize(
    "raw", ["[" * 50_000, "[" * 50_000 + "]" * 50_000, '{"by":' * 20_000 + "1" + "}" * 20_000]
)
def test_very_deep_json_is_400_not_a_crash(make_app, store_settings, raw):
    """Past Python's recursion limit the parser raises RecursionError: still the client's mistake."""
    web = make_app(store_settings("filesystem"), MAX_CONTENT_LENGTH=1_000_000).test_client()
    response = web.post("/api/counters/a/incr", data=raw, content_type="application/json")
    assert_error(response, 400, "bad_request")
    assert value_of(web, "a") == 0


def test_a_body_with_the_wrong_content_type_is_415_and_changes_nothing(web):
    web.post("/api/counters/a/incr", json={"by": 3})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        response = web.post("/api/counters/a/incr", data='{"by": 1}', content_type=content_type)
        assert_error(response, 415, "unsupported_media_type")
    assert value_of(web, "a") == 3


def test_an_empty_body_with_any_content_type_steps_by_one(web):
    assert web.post("/api/counters/a/incr", data="", content_type="text/plain").get_json()["value"] == 1


def test_a_body_over_max_content_length_is_413_and_changes_nothing(web, fs_app):
    assert fs_app.config["MAX_CONTENT_LENGTH"] == 4096
    web.post("/api/counters/a/incr", json={"by": 3})
    padded = '{"by": 1' + " " * 5000 + "}"
    response = web.post("/api/counters/a/incr", data=padded, content_type="application/json")
    assert_error(response, 413, "request_entity_too_large")
    assert value_of(web, "a") == 3


def test_a_body_just_under_the_limit_is_read(web):
    padded = '{"by": 2' + " " * (4096 - 10) + "}"
    assert len(padded) < 4096
    response = web.post("/api/counters/a/incr", data=padded, content_type="application/json")
    assert response.get_json()["value"] == 2


def test_a_wrong_method_is_405_with_an_allow_header(web):
    response = web.post("/api/counters/a")  # PUT and DELETE exist; POST does not
    assert_error(response, 405, "method_not_allowed")
    allowed = {method.strip() for method in response.headers["Allow"].split(",")}
    assert {"GET", "PUT", "DELETE"} <= allowed
    assert "POST" not in allowed
    response = web.get("/api/counters/a/incr")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]
    assert value_of(web, "a") == 0


def test_an_unknown_route_is_a_json_404(web):
    assert_error(web.get("/api/nothing-here"), 404, "not_found")
    assert_error(web.get("/api/counters/a/b"), 404, "not_found")  # a slash is never part of a name


@pytest.mark.parametrize("backend", ["filesystem", "memcached"])
def test_overflow_is_409_and_leaves_the_counter_at_the_top(make_app, store_settings, backend):
    app = make_app(store_settings(backend))
    web = app.test_client()
    top = app.extensions["tally"].max_value
    with app.app_context():
        counters.set("top", top - 1)
    assert web.post("/api/counters/top/incr").get_json()["value"] == top
    assert_error(web.post("/api/counters/top/incr"), 409, "overflow")
    assert_error(web.post("/api/counters/top/incr", json={"by": 2**40}), 409, "overflow")
    assert value_of(web, "top") == top


def test_underflow_is_409_and_changes_nothing(fs_app, web):
    bottom = fs_app.extensions["tally"].min_value
    with fs_app.app_context():
        counters.set("bottom", bottom + 1)
    assert_error(web.post("/api/counters/bottom/decr", json={"by": 2}), 409, "overflow")
    assert value_of(web, "bottom") == bottom + 1


# -- admin: PUT and DELETE -------------------------------------------------------------------------


def test_admin_routes_are_403_when_no_token_is_configured(fs_app, web):
    assert fs_app.config["TALLY_ADMIN_TOKEN"] == ""
    web.post("/api/counters/a/incr", json={"by": 3})
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
        assert_error(web.put("/api/counters/a", json={"value": 5}, headers=headers), 403, "forbidden")
        assert_error(web.delete("/api/counters/a", headers=headers), 403, "forbidden")
    assert value_of(web, "a") == 3


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Bearer s3cret-toke"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong", "prefix", "basic", "no-scheme", "empty"],
)
def test_admin_routes_are_401_without_the_right_bearer_token(admin, headers):
    admin.post("/api/counters/a/incr", json={"by": 3})
    for response in (
        admin.put("/api/counters/a", json={"value": 5}, headers=headers),
        admin.delete("/api/counters/a", headers=headers),
    ):
        assert_error(response, 401, "unauthorized")
        assert "WWW-Authenticate" in response.headers
    assert value_of(admin, "a") == 3


def test_the_401_challenge_names_the_bearer_scheme(admin):
    # Passed as a plain string, werkzeug once sent this header one character long ('"').
    response = admin.delete("/api/counters/a")
    assert response.status_code == 401
    [challenge] = response.headers.getlist("WWW-Authenticate")
    assert challenge.replace('"', "") == "Bearer realm=tally"


def test_a_chunked_body_over_the_limit_is_refused_not_cut(fs_app):
    """Werkzeug cuts a dechunked body at MAX_CONTENT_LENGTH silently; Tally answers 413 instead."""
    client = fs_app.test_client()
    chunked = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
    terminated = {"wsgi.input_terminated": True}
    for body, status in ((b'{"by": 5}' + b" " * 5000, 413), (b'{"by": 5}', 200)):
        response = client.post(
            "/api/counters/chunky/incr",
            input_stream=io.BytesIO(body),
            headers=chunked,
            environ_overrides=terminated,
        )
        assert response.status_code == status
    assert client.get("/api/counters/chunky").get_json()["value"] == 5


def test_admin_put_sets_and_delete_resets(admin):
    admin.post("/api/counters/a/incr", json={"by": 3})
    response = admin.put("/api/counters/a", json={"value": 5}, headers=ADMIN)
    assert response.status_code == 200
    assert response.get_json() == {"name": "a", "value": 5}
    assert response.headers["Cache-Control"] == "no-store"
    assert admin.post("/api/counters/a/incr").get_json()["value"] == 6
    response = admin.delete("/api/counters/a", headers=ADMIN)
    assert response.status_code == 200
    assert response.get_json() == {"name": "a", "value": 0}
    assert value_of(admin, "a") == 0
    assert admin.delete("/api/counters/a", headers=ADMIN).status_code == 200  # already gone: still fine


def test_admin_put_may_set_negative_values(admin):
    assert admin.put("/api/counters/a", json={"value": -4}, headers=ADMIN).get_json()["value"] == -4
    assert value_of(admin, "a") == -4


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"by": 5},
        {"value": 5, "extra": 1},
        {"value": "5"},
        {"value": 5.0},
        {"value": True},
        {"value": None},
    ],
    ids=["empty", "by-instead", "extra-field", "string", "float", "bool", "null"],
)
def test_admin_put_without_a_whole_value_is_400_and_changes_nothing(admin, body):
    admin.post("/api/counters/a/incr", json={"by": 3})
    assert_error(admin.put("/api/counters/a", json=body, headers=ADMIN), 400)
    assert value_of(admin, "a") == 3


def test_admin_put_without_any_body_is_400(admin):
    assert_error(admin.put("/api/counters/a", headers=ADMIN), 400, "bad_request")
    assert value_of(admin, "a") == 0


def test_admin_put_out_of_range_is_409_and_changes_nothing(admin, admin_app):
    store = admin_app.extensions["tally"]
    admin.post("/api/counters/a/incr", json={"by": 3})
    for value in (store.max_value + 1, store.min_value - 1, 2**100):
        assert_error(admin.put("/api/counters/a", json={"value": value}, headers=ADMIN), 409, "overflow")
    assert value_of(admin, "a") == 3


def test_admin_routes_refuse_invalid_names(admin):
    assert_error(admin.put("/api/counters/-x", json={"value": 1}, headers=ADMIN), 400, "invalid_name")
    assert_error(admin.delete("/api/counters/-x", headers=ADMIN), 400, "invalid_name")


# -- per-client counters ---------------------------------------------------------------------------


def test_the_demo_routes_answer_text(web):
    response = web.get("/inc")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True) == "counter is 1"
    assert response.headers["Cache-Control"] == "no-store"
    assert web.post("/inc").get_data(as_text=True) == "counter is 2"
    assert web.get("/dec").get_data(as_text=True) == "counter is 1"
    assert web.get("/reset").get_data(as_text=True) == "counter is 0"
    assert web.get("/dec").get_data(as_text=True) == "counter is -1"


def test_two_clients_have_separate_counters(fs_app):
    alice, bob = fs_app.test_client(), fs_app.test_client()
    alice.get("/inc")
    alice.get("/inc")
    assert bob.get("/inc").get_data(as_text=True) == "counter is 1"
    assert alice.get("/inc").get_data(as_text=True) == "counter is 3"
    assert bob.get("/reset").get_data(as_text=True) == "counter is 0"
    assert alice.get("/dec").get_data(as_text=True) == "counter is 2"


def test_my_counters_as_json(web):
    response = web.get("/api/me/counters/clicks")
    assert response.status_code == 200
    assert response.get_json() == {"name": "clicks", "value": 0}
    assert response.headers["Cache-Control"] == "no-store"
    assert web.post("/api/me/counters/clicks/incr").get_json() == {"name": "clicks", "value": 1}
    assert web.post("/api/me/counters/clicks/incr", json={"by": 4}).get_json()["value"] == 5
    assert web.post("/api/me/counters/clicks/decr", json={"by": 2}).get_json()["value"] == 3
    assert web.get("/api/me/counters/clicks").get_json() == {"name": "clicks", "value": 3}
    assert web.delete("/api/me/counters/clicks").get_json() == {"name": "clicks", "value": 0}
    assert web.get("/api/me/counters/clicks").get_json()["value"] == 0


def test_the_demo_counter_is_my_counter_named_counter(web):
    web.get("/inc")
    web.get("/inc")
    assert web.get("/api/me/counters/counter").get_json()["value"] == 2


def test_a_client_counter_is_not_the_shared_counter_of_the_same_name(fs_app):
    alice, bob = fs_app.test_client(), fs_app.test_client()
    alice.post("/api/counters/clicks/incr", json={"by": 10})
    assert alice.post("/api/me/counters/clicks/incr").get_json()["value"] == 1
    assert bob.post("/api/me/counters/clicks/decr").get_json()["value"] == -1
    assert value_of(alice, "clicks") == 10
    assert alice.post("/api/counters/clicks/incr").get_json()["value"] == 11
    assert alice.get("/api/me/counters/clicks").get_json()["value"] == 1


def test_my_counters_refuse_bad_input_and_change_nothing(web):
    web.post("/api/me/counters/mine/incr", json={"by": 3})
    assert_error(web.post("/api/me/counters/mine/incr", json={"by": 0}), 400, "invalid_amount")
    assert_error(web.post("/api/me/counters/mine/decr", json={"by": "2"}), 400, "invalid_amount")
    assert_error(web.post("/api/me/counters/mine/incr", json={"step": 1}), 400, "bad_request")
    assert_error(web.post("/api/me/counters/mine/incr", data="x", content_type="text/plain"), 415)
    assert_error(web.get("/api/me/counters/-mine"), 400, "invalid_name")
    assert_error(web.post("/api/me/counters/" + "m" * 65 + "/incr"), 400, "invalid_name")
    assert web.get("/api/me/counters/mine").get_json()["value"] == 3


def test_the_session_cookie_is_httponly_and_samesite_lax(web):
    response = web.get("/inc")
    cookies = response.headers.getlist("Set-Cookie")
    assert len(cookies) == 1
    attributes = {part.strip().split("=")[0].lower(): part.strip() for part in cookies[0].split(";")}
    assert "session" in attributes
    assert "httponly" in attributes
    assert attributes["samesite"].lower() == "samesite=lax"
    assert "expires" in attributes  # permanent: the client keeps its counters across browser restarts


def test_a_forged_client_id_is_not_trusted(fs_app, web):
    """The session is signed: a cookie made without the key gives a fresh client, not someone else's."""
    web.get("/inc")
    web.get("/inc")
    stranger = fs_app.test_client()
    stranger.set_cookie("session", web.get_cookie("session").value + "x")
    assert stranger.get("/inc").get_data(as_text=True) == "counter is 1"


# -- the HTML page ---------------------------------------------------------------------------------


def visitor_number(response) -> int:
    match = re.search(r"You are visitor number (\d+)\.", response.get_data(as_text=True))
    assert match, response.get_data(as_text=True)
    return int(match.group(1))


def test_each_visit_of_the_page_gets_the_next_visitor_number(fs_app, web):
    response = web.get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert response.headers["Cache-Control"] == "no-store"
    assert visitor_number(response) == 1
    page = web.get("/").get_data(as_text=True)
    assert page.count("You are visitor number") == 1  # this visit's message only, none left over
    assert "You are visitor number 2." in page
    assert visitor_number(fs_app.test_client().get("/")) == 3  # shared by every visitor
    assert value_of(web, "hits") == 3


CSRF = "t" * 43


def with_csrf(web) -> str:
    """Give the test client's session a known form token, as GET / would (without a visit)."""
    with web.session_transaction() as session:
        session["csrf"] = CSRF
    return CSRF


def test_the_page_buttons_change_my_counter_and_redirect(web):
    token = with_csrf(web)
    response = web.post("/", data={"action": "inc", "csrf_token": token})
    assert response.status_code == 303
    assert response.headers["Location"] in ("/", "http://localhost/")
    web.post("/", data={"action": "inc", "csrf_token": token})
    web.post("/", data={"action": "inc", "csrf_token": token})
    web.post("/", data={"action": "dec", "csrf_token": token})
    assert web.get("/api/me/counters/counter").get_json()["value"] == 2
    page = web.get("/").get_data(as_text=True)
    assert re.search(r'<output id="mine">2</output>', page)
    assert web.post("/", data={"action": "reset", "csrf_token": token}).status_code == 303
    assert web.get("/api/me/counters/counter").get_json()["value"] == 0


def test_the_page_form_carries_its_csrf_token(web):
    page = web.get("/").get_data(as_text=True)
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert web.post("/", data={"action": "inc", "csrf_token": token}).status_code == 303
    assert web.get("/api/me/counters/counter").get_json()["value"] == 1


@pytest.mark.parametrize("token", [None, "", "x" * 43, CSRF[:-1]])
def test_a_form_post_without_the_right_csrf_token_is_refused(web, token):
    with_csrf(web)
    data = {"action": "inc"} if token is None else {"action": "inc", "csrf_token": token}
    assert_error(web.post("/", data=data), 403, "forbidden")
    assert web.get("/api/me/counters/counter").get_json()["value"] == 0


def test_the_json_api_needs_no_csrf_token(web):
    assert web.post("/api/counters/api/incr").status_code == 200  # curl -X POST works


@pytest.mark.parametrize("data", [{"action": "boom"}, {}, {"action": ""}])
def test_a_bad_page_action_is_400_and_changes_nothing(web, data):
    web.get("/inc")
    data = {**data, "csrf_token": with_csrf(web)}
    assert_error(web.post("/", data=data), 400, "bad_request")
    assert web.get("/api/me/counters/counter").get_json()["value"] == 1
    assert value_of(web, "hits") == 0  # posting never counts a visit


# -- health ----------------------------------------------------------------------------------------


def test_healthz_reports_the_backend_and_latency(admin):
    response = admin.get("/healthz", headers=ADMIN)  # the details are for the operator (test_metrics.py)
    assert response.status_code == 200
    body = response.get_json()
    assert body["backend"] == "filesystem"
    assert body["reachable"] is True
    assert body["status"] == "ok"
    assert isinstance(body["latency_ms"], (int, float)) and body["latency_ms"] >= 0
    assert response.headers["Cache-Control"] == "no-store"


def test_livez_answers(web):
    response = web.get("/livez")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


@pytest.mark.parametrize("backend", ["redis", "memcached"])
def test_a_store_that_is_down_is_a_quick_503(make_app, tmp_path, backend):
    port = free_port()  # nothing listens there
    if backend == "redis":
        down = {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": f"redis://{HOST}:{port}/0"}
    else:
        down = {"CACHE_TYPE": "MemcachedCache", "CACHE_MEMCACHED_SERVERS": [f"{HOST}:{port}"]}
    app = make_app(down, COUNTER_DIR=str(tmp_path / "counters"), COUNTER_TIMEOUT=0.5, TALLY_ADMIN_TOKEN=TOKEN)
    web = app.test_client()

    for request in (
        lambda: web.post("/api/counters/a/incr"),
        lambda: web.get("/api/counters/a"),
        lambda: web.get("/inc"),
        lambda: web.get("/"),
    ):
        began = time.monotonic()
        response = request()
        assert time.monotonic() - began < 5
        assert_error(response, 503, "store_unavailable")

    began = time.monotonic()
    response = web.get("/healthz", headers=ADMIN)
    assert time.monotonic() - began < 5
    assert response.status_code == 503
    body = response.get_json()
    assert body["backend"] == backend
    assert body["reachable"] is False
    assert body["status"] == "unavailable"
    assert body["detail"]

    assert web.get("/livez").status_code == 200  # the process itself is fine


# -- CLI -------------------------------------------------------------------------------------------


@pytest.fixture
def cli(fs_app):
    runner = fs_app.test_cli_runner()

    def invoke(*args: str):
        return runner.invoke(args=["counters", *args])

    return invoke


def test_cli_counts_and_prints_values(cli, web):
    assert cli("get", "x").output == "0\n"
    result = cli("incr", "x", "--by", "3")
    assert result.exit_code == 0, result.output
    assert result.output == "3\n"
    assert cli("incr", "x").output == "4\n"
    assert cli("decr", "x", "--by", "6").output == "-2\n"
    assert cli("decr", "x").output == "-3\n"
    assert cli("get", "x").output == "-3\n"
    assert value_of(web, "x") == -3  # the same counter the HTTP API serves


def test_cli_set_and_reset(cli):
    assert cli("set", "x", "41").output == "41\n"
    assert cli("incr", "x").output == "42\n"
    result = cli("reset", "x")
    assert result.exit_code == 0
    assert result.output == "True\n"
    assert cli("reset", "x").output == "False\n"
    assert cli("get", "x").output == "0\n"
    assert cli("set", "apples", "-5").output == "-5\n"  # a negative number, not an option
    assert cli("get", "apples").output == "-5\n"


@pytest.mark.parametrize(
    "args",
    [
        ("get", "_x"),
        ("incr", "a b"),
        ("decr", "x" * 65),
        ("reset", "é"),
        ("set", "../x", "1"),
        ("get", "--", "-x"),
    ],
)
def test_cli_refuses_an_invalid_name_with_a_clear_message(cli, args):
    result = cli(*args)
    assert result.exit_code != 0
    assert "counter names are 1-64 characters" in result.output
    assert "Traceback" not in result.output


def test_cli_refuses_bad_amounts_and_changes_nothing(cli):
    cli("set", "x", "7")
    for args in (("incr", "x", "--by", "0"), ("decr", "x", "--by", "-2"), ("incr", "x", "--by", "two")):
        result = cli(*args)
        assert result.exit_code != 0
        assert "by" in result.output.lower()
    assert cli("get", "x").output == "7\n"


def test_cli_reports_overflow(cli, fs_app):
    top = fs_app.extensions["tally"].max_value
    cli("set", "x", str(top))
    result = cli("incr", "x")
    assert result.exit_code != 0
    assert "range" in result.output or "overflow" in result.output.lower()
    assert cli("get", "x").output == f"{top}\n"


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,bad,backend",
    [
        ("CACHE_TYPE", "Nope", "filesystem"),
        ("COUNTER_FSYNC", "yes", "filesystem"),
        ("COUNTER_TIMEOUT", 0, "filesystem"),
        ("COUNTER_POOL_SIZE", 0, "filesystem"),
        ("CACHE_MEMCACHED_SERVERS", "127.0.0.1:11211", "memcached"),
        ("CACHE_REDIS_URL", "127.0.0.1:6379", "redis"),
        ("MAX_CONTENT_LENGTH", True, "filesystem"),
        ("PERMANENT_SESSION_LIFETIME", "31 days", "filesystem"),
        ("TALLY_ADMIN_TOKEN", None, "filesystem"),
    ],
)
def test_a_bad_setting_fails_at_start_up_naming_the_key(make_app, store_settings, key, bad, backend):
    with pytest.raises(ConfigError, match=key):
        make_app(store_settings(backend), **{key: bad})


def test_a_counter_prefix_equal_to_the_cache_prefix_is_refused(make_app, store_settings):
    with pytest.raises(ConfigError, match="COUNTER_KEY_PREFIX.*CACHE_KEY_PREFIX"):
        make_app(store_settings("redis"), COUNTER_KEY_PREFIX="shared_", CACHE_KEY_PREFIX="shared_")


def test_counter_dir_equal_to_cache_dir_is_refused(make_app, tmp_path):
    same = str(tmp_path / "both")
    with pytest.raises(ConfigError, match="COUNTER_DIR"):
        make_app(CACHE_DIR=same, COUNTER_DIR=same)
    with pytest.raises(ConfigError, match="COUNTER_DIR"):
        make_app(CACHE_DIR=same, COUNTER_DIR=same + "/./")  # the same directory, spelled otherwise


def test_an_environment_variable_overrides_settings_toml(make_app, store_settings, monkeypatch):
    monkeypatch.setenv("FLASK_COUNTER_TIMEOUT", "0.25")
    monkeypatch.setenv("FLASK_COUNTER_FSYNC", "true")
    app = make_app(store_settings("filesystem"))
    assert app.config["COUNTER_TIMEOUT"] == 0.25
    assert app.config["COUNTER_FSYNC"] is True


def test_a_bad_environment_variable_fails_at_start_up(make_app, store_settings, monkeypatch):
    monkeypatch.setenv("FLASK_COUNTER_POOL_SIZE", "many")
    with pytest.raises(ConfigError, match="COUNTER_POOL_SIZE"):
        make_app(store_settings("filesystem"))


def test_tally_settings_layers_a_toml_file_on_top(make_app, store_settings, tmp_path, monkeypatch):
    extra = tmp_path / "site.toml"
    extra.write_text('COUNTER_TIMEOUT = 1.5\nTALLY_ADMIN_TOKEN = "from-file"\nMAX_CONTENT_LENGTH = 100\n')
    monkeypatch.setenv("TALLY_SETTINGS", str(extra))
    app = make_app(store_settings("filesystem"))
    assert app.config["COUNTER_TIMEOUT"] == 1.5
    assert app.config["TALLY_ADMIN_TOKEN"] == "from-file"
    assert app.config["COUNTER_POOL_SIZE"] == 16  # untouched keys keep settings.toml's value
    web = app.test_client()
    headers = {"Authorization": "Bearer from-file"}
    assert web.put("/api/counters/a", json={"value": 5}, headers=headers).status_code == 200
    response = web.post(
        "/api/counters/a/incr", data='{"by": 1' + " " * 200 + "}", content_type="application/json"
    )
    assert_error(response, 413)


def test_the_environment_wins_over_the_tally_settings_file(make_app, store_settings, tmp_path, monkeypatch):
    extra = tmp_path / "site.toml"
    extra.write_text("COUNTER_TIMEOUT = 1.5\n")
    monkeypatch.setenv("TALLY_SETTINGS", str(extra))
    monkeypatch.setenv("FLASK_COUNTER_TIMEOUT", "0.25")
    assert make_app(store_settings("filesystem")).config["COUNTER_TIMEOUT"] == 0.25


@pytest.mark.parametrize("content", [None, "COUNTER_TIMEOUT = \n"], ids=["missing", "not-toml"])
def test_a_missing_or_broken_tally_settings_file_fails_at_start_up(make_app, tmp_path, monkeypatch, content):
    path = tmp_path / "site.toml"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("TALLY_SETTINGS", str(path))
    with pytest.raises(ConfigError, match="TALLY_SETTINGS"):
        make_app()


def test_a_bad_value_in_the_tally_settings_file_names_the_key(make_app, tmp_path, monkeypatch):
    path = tmp_path / "site.toml"
    path.write_text('COUNTER_FSYNC = "yes"\n')
    monkeypatch.setenv("TALLY_SETTINGS", str(path))
    with pytest.raises(ConfigError, match="COUNTER_FSYNC"):
        make_app()


# -- the secret key --------------------------------------------------------------------------------


def test_without_a_secret_key_one_is_generated_once_and_kept(make_app, store_settings, tmp_path):
    first = make_app(store_settings("filesystem"), SECRET_KEY="")
    key_file = os.path.join(first.instance_path, "secret_key")
    assert first.instance_path == str(tmp_path / "instance")
    with open(key_file, encoding="ascii") as file:
        stored = file.read().strip()
    assert first.config["SECRET_KEY"] == stored
    assert len(stored) >= 32
    assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600

    second = make_app(store_settings("filesystem"), SECRET_KEY="")
    assert second.config["SECRET_KEY"] == stored
    assert [name for name in os.listdir(first.instance_path) if name.startswith("secret_key")] == [
        "secret_key"
    ]  # no temporary files left behind


def _generate_key_at(instance: str, start_at: float, keys) -> None:
    from flask import Flask

    from settings import ensure_secret_key

    app = Flask("racer", instance_path=instance)
    while time.time() < start_at:
        time.sleep(0.001)
    ensure_secret_key(app)
    keys.put(app.config["SECRET_KEY"])


def test_workers_starting_together_all_get_the_same_generated_key(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    keys = context.Queue()
    start_at = time.time() + 0.5
    racers = [
        context.Process(target=_generate_key_at, args=(str(tmp_path), start_at, keys)) for _ in range(8)
    ]
    for racer in racers:
        racer.start()
    found = {keys.get(timeout=30) for _ in racers}
    for racer in racers:
        racer.join(timeout=30)
    with open(tmp_path / "secret_key", encoding="ascii") as file:
        assert found == {file.read().strip()}
    assert stat.S_IMODE(os.stat(tmp_path / "secret_key").st_mode) == 0o600
    assert os.listdir(tmp_path) == ["secret_key"]


def test_a_session_from_one_worker_is_valid_in_another(make_app, store_settings):
    """Two apps on one instance folder stand for two gunicorn workers: the same key, the same client."""
    settings = store_settings("filesystem")
    first, second = make_app(settings, SECRET_KEY=""), make_app(settings, SECRET_KEY="")
    web = first.test_client()
    web.get("/inc")
    web.get("/inc")
    other = second.test_client()
    other.set_cookie("session", web.get_cookie("session").value)
    assert other.get("/inc").get_data(as_text=True) == "counter is 3"


def test_a_configured_secret_key_is_used_and_no_file_is_written(make_app, store_settings):
    app = make_app(store_settings("filesystem"), SECRET_KEY="configured-" + "x" * 40)
    assert app.config["SECRET_KEY"] == "configured-" + "x" * 40
    assert not os.path.exists(os.path.join(app.instance_path, "secret_key"))


def test_an_unusable_key_file_fails_at_start_up(make_app, store_settings, tmp_path):
    instance = tmp_path / "instance"
    instance.mkdir()
    (instance / "secret_key").write_text("short\n")
    with pytest.raises(ConfigError, match="secret_key"):
        make_app(store_settings("filesystem"), SECRET_KEY="")


def test_errors_are_json_with_no_store(web):
    response = web.get("/api/counters/-x")
    assert response.headers["Cache-Control"] == "no-store"
    assert json.loads(response.get_data(as_text=True))["error"] == "invalid_name"


# -- shared values over HTTP -----------------------------------------------------------------------


def test_a_shared_set_over_http(web):
    assert web.get("/api/shared/team").get_json() == {"key": "team", "value": None}
    assert web.post("/api/shared/team/add", json={"member": "bo"}).get_json() == {
        "key": "team",
        "value": ["bo"],
    }
    web.post("/api/shared/team/add", json={"member": "al"})
    response = web.post("/api/shared/team/add", json={"member": "bo"})  # a set: no second "bo"
    assert response.get_json()["value"] == ["al", "bo"]
    assert response.headers["Cache-Control"] == "no-store"
    assert web.get("/api/shared/team").get_json()["value"] == ["al", "bo"]


def test_adding_a_member_to_a_value_that_is_not_a_set_is_400_and_changes_nothing(admin):
    admin.put("/api/shared/config", json={"value": {"a": 1}}, headers=ADMIN)
    assert_error(admin.post("/api/shared/config/add", json={"member": "x"}), 400)
    assert admin.get("/api/shared/config").get_json()["value"] == {"a": 1}


def test_admin_put_and_delete_of_a_shared_value(admin):
    nested = {"list": [1, 2.5, "three", None, True], "dict": {"é": "ü"}}
    response = admin.put("/api/shared/blob", json={"value": nested}, headers=ADMIN)
    assert response.status_code == 200 and response.get_json() == {"key": "blob", "value": nested}
    assert admin.get("/api/shared/blob").get_json()["value"] == nested
    assert admin.delete("/api/shared/blob", headers=ADMIN).get_json() == {"key": "blob", "value": None}
    assert admin.get("/api/shared/blob").get_json()["value"] is None


def test_shared_value_admin_routes_are_403_without_a_configured_token(web):
    web.post("/api/shared/team/add", json={"member": "bo"})
    for headers in ({}, {"Authorization": "Bearer anything"}):
        assert_error(web.put("/api/shared/team", json={"value": []}, headers=headers), 403, "forbidden")
        assert_error(web.delete("/api/shared/team", headers=headers), 403, "forbidden")
    assert web.get("/api/shared/team").get_json()["value"] == ["bo"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": TOKEN}])
def test_shared_value_admin_routes_are_401_without_the_right_token(admin, headers):
    admin.post("/api/shared/team/add", json={"member": "bo"})
    assert_error(admin.put("/api/shared/team", json={"value": []}, headers=headers), 401, "unauthorized")
    assert_error(admin.delete("/api/shared/team", headers=headers), 401, "unauthorized")
    assert admin.get("/api/shared/team").get_json()["value"] == ["bo"]


def test_a_damaged_shared_value_file_is_a_500_never_read_as_missing(fs_app, web):
    web.post("/api/shared/team/add", json={"member": "bo"})
    path = os.path.join(fs_app.config["COUNTER_DIR"], ".values", "data", "team")
    with open(path, "r+b") as file:
        file.seek(-2, os.SEEK_END)
        file.write(b"!!")
    assert_error(web.get("/api/shared/team"), 500, "corrupt_value")
    assert_error(web.post("/api/shared/team/add", json={"member": "al"}), 500, "corrupt_value")


# -- the page --------------------------------------------------------------------------------------


def test_the_page_lists_the_last_ten_visitors_once_each_newest_first(fs_app):
    def visit(browser) -> tuple[str, list[str]]:
        page = browser.get("/").get_data(as_text=True)
        me = re.search(r"you are <code>([0-9a-f]{8})</code>", page).group(1)
        return me, re.findall(r"<li><code>([0-9a-f]{8})</code></li>", page)

    browsers = [fs_app.test_client() for _ in range(12)]
    ids = [visit(browser)[0] for browser in browsers]
    assert len(set(ids)) == 12
    me, listed = visit(browsers[3])  # a second visit moves it to the front, listed once
    assert me == ids[3]
    assert listed == [ids[3], *ids[11:3:-1], ids[2]]


def test_the_page_names_the_store_and_loads_nothing_from_elsewhere(make_app, store_settings, backend):
    page = make_app(store_settings(backend)).test_client().get("/").get_data(as_text=True)
    names = {"filesystem": "filesystem", "memory": "memory", "memcached": "memcached", "redis": "redis"}
    names.update({"redis-sentinel": "redis-sentinel", "redis-cluster": "redis-cluster"})
    names.update(sqlite="sql", postgresql="sql", manager="manager")
    assert f"<strong>{names[backend]}</strong> store" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no CDN: the machine may be offline
    assert '<html lang="en">' in page and "<main>" in page
    assert all(f'aria-label="{label}"' in page for label in ("add one", "take one away"))


def test_every_response_carries_the_security_headers(web):
    """The page loads nothing from elsewhere and runs no inline script: a strict policy costs nothing."""
    for response in (web.get("/"), web.get("/api/counters/x"), web.get("/static/style.css")):
        csp = response.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"
        assert response.headers["X-Frame-Options"] == "DENY"
    page = web.get("/").get_data(as_text=True)
    assert "<script>" not in page and " style=" not in page and "<style" not in page  # nothing inline


def test_the_race_routes_are_off_unless_enabled(web, make_app, store_settings):
    assert web.post("/race/naive/incr").status_code == 404
    assert web.post("/race/tally/incr").status_code == 404
    assert "race-form" not in web.get("/").get_data(as_text=True)
    client = make_app(store_settings("filesystem"), RACE_DEMO=True).test_client()
    assert "race-form" in client.get("/").get_data(as_text=True)
    naive = [client.post("/race/naive/incr").get_json()["value"] for _ in range(3)]
    assert naive == [naive[0], naive[0] + 1, naive[0] + 2]  # one process: it counts (the race needs several)
    assert [client.post("/race/tally/incr").get_json()["value"] for _ in range(3)] == [1, 2, 3]
    assert client.post("/race/tally/incr").headers["Connection"] == "close"
    assert client.get("/race/naive/incr").status_code == 405
