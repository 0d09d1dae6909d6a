"""Hostile input on every route and every store: each malformed request answers a 4xx JSON error, none
a 5xx, and nothing changes — no counter, no shared value, no file (the store is snapshotted before and
compared after).  A table of a few hundred hand-picked cases, then hypothesis's random ones."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tally.names import NAME_PATTERN
from tests.conftest import BACKENDS, settings_env

TOKEN = "hostile-test-token"
#: Sent with every request: the admin routes must refuse bad input on its own merits, not for want
#: of a token.
HEADERS = {"Authorization": f"Bearer {TOKEN}"}

BAD_NAMES = [
    "..",
    ".",
    "../etc",
    "..\\..\\x",
    ".hidden",
    "-dash",
    "_under",
    "@0123456789abcdef0123456789abcdef.counter",  # a per-client key, addressed as a shared one
    "=value",  # the shared values' namespace
    "a b",
    " a",
    "a\x00b",
    "\x00",
    "a\nb",
    "a\r\nX-Injected: 1",
    "a;b",
    "a?b",
    "a#b",
    "a%2e",
    "ünïcödé",
    "日本",
    "a\u202eb",
    "x" * 65,
    "y" * 1000,
    "a/b",
    "../../../../tmp/escape",
]

#: (method, path template) of every route that takes a name; ``{}`` is the quoted name.
NAMED_ROUTES = [
    ("GET", "/api/counters/{}"),
    ("POST", "/api/counters/{}/incr"),
    ("POST", "/api/counters/{}/decr"),
    ("PUT", "/api/counters/{}"),
    ("DELETE", "/api/counters/{}"),
    ("GET", "/api/me/counters/{}"),
    ("POST", "/api/me/counters/{}/incr"),
    ("POST", "/api/me/counters/{}/decr"),
    ("DELETE", "/api/me/counters/{}"),
    ("GET", "/api/shared/{}"),
    ("POST", "/api/shared/{}/add"),
    ("PUT", "/api/shared/{}"),
    ("DELETE", "/api/shared/{}"),
]

#: A valid body for each named route, so that a bad name is the only thing wrong with the request.
VALID_BODY = {
    "/api/shared/{}/add": b'{"member": "m"}',
    ("PUT", "/api/shared/{}"): b'{"value": 1}',
    ("PUT", "/api/counters/{}"): b'{"value": 1}',
}

STEP_ROUTES = [
    "/api/counters/a/incr",
    "/api/counters/a/decr",
    "/api/me/counters/a/incr",
    "/api/me/counters/a/decr",
]
BAD_STEP_BODIES = [
    b'{"by": "1"}',
    b'{"by": 1.0}',
    b'{"by": 1.5}',
    b'{"by": true}',
    b'{"by": false}',
    b'{"by": null}',
    b'{"by": []}',
    b'{"by": {}}',
    b'{"by": 0}',
    b'{"by": -1}',
    b'{"by": -9223372036854775808}',
    b'{"by": 9223372036854775808}',
    b'{"by": 1e400}',
    b'{"by": NaN}',
    b'{"by": Infinity}',
    b'{"by": ' + b"9" * 5000 + b"}",
    b'{"by": 1, "extra": 2}',
    b'{"value": 1}',
    b'{"by": 1, "by": "x"}',
    b"[1]",
    b'"by"',
    b"1",
    b"null",
    b"{",
    b'{"by": 1',
    b"{'by': 1}",
    b"\xff\xfe{}",
    b"[" * 5000,
    b'{"by": ' + b"[" * 200 + b"]" * 200 + b"}",
]

PUT_ROUTES = ["/api/counters/a", "/api/shared/s"]
BAD_PUT_BODIES = [
    b"{}",
    b'{"value": 1, "extra": 1}',
    b"[]",
    b"{",
    b'{"value": NaN}',
    b'{"value": Infinity}',
]
BAD_COUNTER_VALUES = [b'{"value": "1"}', b'{"value": 1.5}', b'{"value": true}', b'{"value": null}']
BAD_COUNTER_VALUES += [b'{"value": 9223372036854775808}', b'{"value": -9223372036854775809}']

BAD_MEMBER_BODIES = [
    b"{}",
    b'{"member": ""}',
    b'{"member": "' + b"m" * 201 + b'"}',
    b'{"member": 5}',
    b'{"member": null}',
    b'{"member": ["m"]}',
    b'{"member": {"m": 1}}',
    b'{"member": true}',
    b'{"member": "m", "other": 1}',
]

#: (method, path) pairs that no route answers: 405 or 404.
WRONG_METHODS = [
    ("PATCH", "/api/counters/a"),
    ("POST", "/api/counters/a"),
    ("GET", "/api/counters/a/incr"),
    ("PUT", "/api/counters/a/incr"),
    ("DELETE", "/api/counters/a/decr"),
    ("TRACE", "/api/counters/a"),
    ("PROPFIND", "/api/counters/a"),
    ("BREW", "/api/counters/a/incr"),
    ("PATCH", "/api/shared/s"),
    ("GET", "/api/shared/s/add"),
    ("PUT", "/api/me/counters/a"),
    ("PUT", "/inc"),
    ("DELETE", "/reset"),
    ("PUT", "/"),
    ("POST", "/healthz"),
    ("DELETE", "/livez"),
    ("GET", "/api/counters"),
    ("GET", "/api/counters/"),
    ("GET", "/api/counters/a/b/c"),
    ("POST", "/api/counters/a/reset"),
    ("GET", "/admin"),
    ("GET", "/static/../settings.toml"),
    ("GET", "/static/..%2fsettings.toml"),
    ("GET", "/static/%2e%2e/app.py"),
]


def hostile_requests() -> list[tuple[str, str, bytes, str]]:
    """(method, path, body, content type) of every malformed request in the table."""
    cases = []
    for name in BAD_NAMES:
        for method, template in NAMED_ROUTES:
            body = VALID_BODY.get((method, template), VALID_BODY.get(template, b""))
            cases.append((method, template.format(quote(name, safe="")), body, "application/json"))
    for path in STEP_ROUTES:
        cases += [("POST", path, body, "application/json") for body in BAD_STEP_BODIES]
        cases.append(("POST", path, b'{"by": 1}', "text/plain"))
        cases.append(("POST", path, b"by=1", "application/x-www-form-urlencoded"))
        cases.append(("POST", path, b'{"by": 1}' + b" " * 5000, "application/json"))  # over 4096
    for path in PUT_ROUTES:
        cases += [("PUT", path, body, "application/json") for body in BAD_PUT_BODIES]
        cases.append(("PUT", path, b"", "application/json"))
        cases.append(("PUT", path, b'{"value": 1}', "text/plain"))
    cases += [("PUT", "/api/counters/a", body, "application/json") for body in BAD_COUNTER_VALUES]
    cases += [("POST", "/api/shared/s/add", body, "application/json") for body in BAD_MEMBER_BODIES]
    cases += [(method, path, b"", "application/json") for method, path in WRONG_METHODS]
    # The page's form: no CSRF token, or a bad action with no token.
    cases.append(("POST", "/", b"action=inc", "application/x-www-form-urlencoded"))
    cases.append(("POST", "/", b"action=boom&csrf_token=forged", "application/x-www-form-urlencoded"))
    return cases


def test_the_table_is_large_enough():
    assert len(hostile_requests()) >= 200


# -- what "nothing changed" means on each store -------------------------------------------------------


def files_under(root: Path) -> dict[str, str]:
    """Every file below ``root`` (relative path -> SHA-256 of its bytes)."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder, name)
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def redis_items(primaries, prefix: str) -> dict[bytes, tuple[bytes | None, int]]:
    """Keys under ``prefix`` on every primary (one, or each shard of a cluster), with their value and
    expiry time (absolute: a write would move it)."""
    return {
        key: (client.get(key), client.execute_command("EXPIRETIME", key))
        for client in primaries
        for key in client.scan_iter(f"{prefix}*")
    }


def sql_rows(store) -> dict[str, list[tuple]]:
    """Both tables' rows under the store's key prefix, in key order."""
    from sqlalchemy import select

    from tally.stores.sql import counters_table, values_table

    with store._connection() as connection:
        return {
            table.name: [
                tuple(row)
                for row in connection.execute(
                    select(table).where(table.c[key].startswith(store.key_prefix)).order_by(table.c[key])
                )
            ]
            for table, key in ((counters_table, "name"), (values_table, "key"))
        }


def manager_entries(store, client_id: str) -> dict:
    """What the manager's own protocol shows of the test's entries, read without changing any: the
    table's numbers of counters and of values (an entry added or removed anywhere shows there), the
    value of every shared counter ``names`` lists and of the fixture's per-client counters (read with
    no ``ttl``, which would renew them), and each shared value with its version (a write, even of the
    same bytes, gives it a new one).  Not shown: when a per-client counter expires."""
    from routes.clients import DEMO_COUNTER
    from routes.pages import RECENT_VISITORS
    from tally.names import client_key

    health = store.health()
    keys = store.names(1000) + [client_key(client_id, name) for name in ("a", DEMO_COUNTER)]
    return {
        "sizes": (health["counters"], health["values"]),
        "counters": {key: store.get(key) for key in keys},
        "values": {key: store._call("read_value", store._key(key)) for key in ("s", RECENT_VISITORS)},
    }


def snapshot(app, backend: str, root: Path, memcached_server=None, client_id: str | None = None):
    """Everything a request could have changed: the files under the test's folder (counters, values,
    sessions, page cache, secret key) and, for a server store, its keys under the counter prefix
    (the manager: what its protocol shows of them, ``manager_entries``).
    A SQLite database is compared by its rows: a read changes its -shm file, and a checkpoint moves
    pages between the WAL and the database file."""
    state = {"files": files_under(root)}
    store = app.extensions["tally"]
    if backend in ("sqlite", "postgresql"):
        state["files"] = {name: digest for name, digest in state["files"].items() if "tally.db" not in name}
        state["sql"] = sql_rows(store)
    if backend == "memory":
        state["memory"] = (dict(store._values), dict(store._shared))
    elif backend.startswith("redis"):  # the store's own clients of its primaries
        state["redis"] = redis_items(store._primaries(), app.config["COUNTER_KEY_PREFIX"])
        assert state["redis"], "the fixture's counters are on the primaries"
    elif backend == "memcached":
        items = memcached_server.items(app.config["COUNTER_KEY_PREFIX"])
        state["memcached"] = {key: (facts["exp"], facts["cas"]) for key, facts in items.items()}
    elif backend == "manager":  # the counts, every known counter, the values and their versions
        state["manager"] = manager_entries(store, client_id)
        assert any(state["manager"]["counters"].values()), "the fixture's counters are in the manager"
    return state


@pytest.fixture(params=list(BACKENDS))
def hostile(request, make_app, store_settings, tmp_path):
    """A client of an app on one store, with counters, a shared value and a per-client counter in
    place, and the snapshot taken after them."""
    backend = request.param
    app = make_app(store_settings(backend), TALLY_ADMIN_TOKEN=TOKEN)
    client = app.test_client()
    for path, body in [
        ("/api/counters/a/incr", {"by": 5}),
        ("/api/counters/b/decr", {"by": 3}),
        ("/api/shared/s/add", {"member": "first"}),
        ("/api/me/counters/a/incr", {"by": 2}),
        ("/api/me/counters/counter/incr", None),
    ]:
        assert client.post(path, json=body).status_code == 200
    assert client.get("/").status_code == 200  # the session, hits and recent visitors exist too

    server = request.getfixturevalue("memcached_server") if backend == "memcached" else None
    client_id = None
    if backend == "manager":  # the per-client counters' keys, for reading them
        with client.session_transaction() as session:
            client_id = session["cid"]

    def unchanged_since() -> object:
        return snapshot(app, backend, tmp_path, server, client_id)

    before = unchanged_since()
    assert before["files"] if backend == "filesystem" else True
    return client, before, unchanged_since


def assert_json_4xx(response, what: str) -> None:
    assert 400 <= response.status_code < 500, f"{what}: {response.status_code} {response.data[:200]!r}"
    assert response.mimetype == "application/json", f"{what}: {response.mimetype}"
    body = response.get_json()
    assert set(body) == {"error", "detail"} and body["error"], f"{what}: {body}"


def send(client, method: str, path: str, body: bytes, content_type: str):
    return client.open(path, method=method, data=body, content_type=content_type, headers=HEADERS)


def test_every_malformed_request_is_a_4xx_json_error_and_changes_nothing(hostile, tmp_path):
    client, before, now = hostile
    outside_before = sorted(os.listdir(tmp_path.parent))
    for method, path, body, content_type in hostile_requests():
        response = send(client, method, path, body, content_type)
        assert_json_4xx(response, f"{method} {path!r} {body[:60]!r}")
    assert now() == before
    assert sorted(os.listdir(tmp_path.parent)) == outside_before  # nothing created beside the test


# -- random input: hypothesis -------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def a_valid_step(body: object) -> bool:
    if body == {}:
        return True
    if not isinstance(body, dict) or set(body) != {"by"}:
        return False
    by = body["by"]
    return isinstance(by, int) and not isinstance(by, bool) and 1 <= by < 2**63


def json_round_trips(value: object) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


SLOW = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SLOW
@given(name=st.text(min_size=1, max_size=80).filter(lambda n: not NAME_PATTERN.fullmatch(n)))
def test_any_invalid_name_is_refused_on_every_named_route(hostile, name):
    client, before, now = hostile
    for method, template in NAMED_ROUTES:
        body = VALID_BODY.get((method, template), VALID_BODY.get(template, b""))
        path = template.format(quote(name, safe=""))
        assert_json_4xx(send(client, method, path, body, "application/json"), f"{method} {path!r}")
    assert now() == before


@SLOW
@given(body=json_values.filter(lambda b: not a_valid_step(b)), route=st.sampled_from(STEP_ROUTES))
def test_any_json_that_is_not_a_valid_step_is_refused(hostile, body, route):
    client, before, now = hostile
    raw = json.dumps(body).encode()
    if len(raw) > 4096:
        raw = raw[:4096]  # stays malformed; the size limit has its own cases
    assert_json_4xx(send(client, "POST", route, raw, "application/json"), f"{route} {raw[:80]!r}")
    assert now() == before


@SLOW
@given(raw=st.binary(min_size=1, max_size=300), route=st.sampled_from(STEP_ROUTES + PUT_ROUTES))
def test_random_bytes_as_a_body_are_refused(hostile, raw, route):
    client, before, now = hostile
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if route in STEP_ROUTES:
        valid = a_valid_step(parsed)
    elif route == "/api/counters/a":
        value = parsed.get("value") if isinstance(parsed, dict) and set(parsed) == {"value"} else None
        valid = isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63
    else:  # a shared value: any JSON that can be written back as JSON
        valid = isinstance(parsed, dict) and set(parsed) == {"value"} and json_round_trips(parsed["value"])
    if valid or not raw.strip():
        return  # a well-formed request (or an empty body, which means "by 1") is not hostile
    method = "POST" if route in STEP_ROUTES else "PUT"
    assert_json_4xx(send(client, method, route, raw, "application/json"), f"{route} {raw[:80]!r}")
    assert now() == before


# -- the same through a real server: raw request lines that an HTTP library would tidy up -------------

RAW_PATHS = [
    b"/api/counters/../../settings.toml",
    b"/api/counters/../counters/a/incr",
    b"/api/counters/%2e%2e/incr",
    b"/api/counters/%2E%2E%2Fetc/incr",
    b"/api/counters/a%00b/incr",
    b"/api/counters/%00/incr",
    b"/api/counters/a%0d%0aX-Injected:%201/incr",
    b"/api/counters/a%20b/incr",
    b"/api/counters/%C3%BC/incr",
    b"/api/counters/" + b"x" * 65 + b"/incr",
    b"/api/counters/a//incr",
    b"/api/counters/a/incr/",
    b"/api/counters/.a/incr",
    b"/api/shared/%2e%2e/add",
    b"/api/me/counters/..%2f..%2fa/incr",
]
#: Request lines that are not valid HTTP never reach the app: gunicorn answers 400 itself (its own
#: page, not Tally's JSON).
NOT_HTTP = [b"/api/counters/\xc3\xbc/incr", b"/api/counters/a\x00b/incr", b"/api/counters/a b/incr"]


def raw_request(port: int, request_line: bytes, body: bytes = b"") -> tuple[int, str]:
    """Send one request exactly as given; return its status and Content-Type."""
    head = request_line + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    head += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    headers = rest.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    content_type = next(
        (line.split(":", 1)[1].strip() for line in headers.splitlines() if line.startswith("content-type:")),
        "",
    )
    return int(status_line.split()[1]), content_type


@pytest.mark.slow
def test_raw_hostile_paths_through_gunicorn_are_4xx_json_and_change_nothing(serve, store_settings, tmp_path):
    settings = store_settings("filesystem")
    server = serve(settings_env(settings), workers=2, threads=2)
    assert raw_request(server.port, b"POST /api/counters/a/incr HTTP/1.1") == (200, "application/json")
    before = files_under(Path(settings["COUNTER_DIR"]))
    outside = sorted(os.listdir(tmp_path.parent))
    for path in RAW_PATHS:
        for method, body in ((b"POST", b""), (b"POST", b'{"by": 1}'), (b"GET", b"")):
            status, content_type = raw_request(server.port, method + b" " + path + b" HTTP/1.1", body)
            assert 400 <= status < 500 and content_type == "application/json", (method, path, status)
    for path in NOT_HTTP:
        assert raw_request(server.port, b"POST " + path + b" HTTP/1.1")[0] == 400, path
    assert files_under(Path(settings["COUNTER_DIR"])) == before
    assert sorted(os.listdir(tmp_path.parent)) == outside
