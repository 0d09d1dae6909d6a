"""Sessions in a signed cookie (default) or on the server, in the configured store (Flask-Session)."""

from __future__ import annotations

import pytest

from settings import ConfigError


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
