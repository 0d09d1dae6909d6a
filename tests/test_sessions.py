"""Sessions in a signed cookie (default) or on the server, in the configured store (Flask-Session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from settings import ConfigError
from tests.conftest import SHARED_BACKENDS


@pytest.mark.parametrize("session_backend", ["cookie", "server"])
def test_each_mode_keeps_one_clients_counter(make_app, store_settings, backend, session_backend):
    app = make_app(store_settings(backend), SESSION_BACKEND=session_backend)
    mine, theirs = app.test_client(), app.test_client()
    assert [mine.get("/inc").get_data(as_text=True) for _ in range(3)][-1] == "counter is 3"
    assert theirs.get("/inc").get_data(as_text=True) == "counter is 1"
    assert mine.get("/api/me/counters/counter").get_json()["value"] == 3


def test_a_server_side_session_cookie_carries_only_an_id(make_app, store_settings, backend):
    app = make_app(store_settings(backend), SESSION_BACKEND="server")
    client = app.test_client()
    client.get("/inc")
    cookie = client.get_cookie("session")
    assert cookie is not None and "." not in cookie.value  # a random id, not signed session data
    assert "HttpOnly" in client.get("/inc").headers["Set-Cookie"]


def test_an_unknown_session_backend_stops_the_app(make_app, store_settings):
    with pytest.raises(ConfigError, match="SESSION_BACKEND"):
        make_app(store_settings("filesystem"), SESSION_BACKEND="database")


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_a_session_written_by_one_instance_is_read_by_another(make_app, store_settings, backend):
    """Two app instances on the same store (two hosts): a browser's server-side session, and with it
    its per-client counters, is the same whichever instance answers; it lives in the counters' store
    (on SQL a row of the database, on the manager an entry of its table), never on one host's disk."""
    settings = store_settings(backend)
    first = make_app(settings, SESSION_BACKEND="server", SESSION_KEY_PREFIX="shared-test:")
    second = make_app(settings, SESSION_BACKEND="server", SESSION_KEY_PREFIX="shared-test:")
    browser = first.test_client()
    assert browser.get("/inc").get_data(as_text=True) == "counter is 1"
    cookie = browser.get_cookie("session")
    elsewhere = second.test_client()
    elsewhere.set_cookie("session", cookie.value)
    assert elsewhere.get("/inc").get_data(as_text=True) == "counter is 2"
    assert browser.get("/api/me/counters/counter").get_json()["value"] == 2
    assert not any((Path(first.instance_path) / "sessions").glob("*"))  # nothing on this host's disk


def test_sessions_on_a_store_without_session_servers_are_shared_values(make_app, store_settings):
    from tally.sessions import SESSION_MARK, ValueSessionClient

    app = make_app(store_settings("sqlite"), SESSION_BACKEND="server")
    client = app.test_client()
    client.get("/inc")
    store = app.extensions["tally"]
    key = "tally-session:" + client.get_cookie("session").value
    assert ValueSessionClient._key(key).startswith(SESSION_MARK)
    assert store.get_value(ValueSessionClient._key(key)) is not None
    client.get("/reset")  # the session stays; only the counter is reset
    assert store.get_value(ValueSessionClient._key(key)) is not None
