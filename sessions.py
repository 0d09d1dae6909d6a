"""Where the session lives: Flask's signed cookie (default) or, as the seed's Flask-Session answer
shows, a server-side store — the same one the counters use.

Either way the session holds only the client's random id (and the form's CSRF token); per-client
counters live in the counter store under that id, so they stay atomic in both modes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Request, Response
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionInterface, SessionMixin
from flask_session import Session

from settings import ConfigError
from tally import StoreUnavailable
from tally.sessions import flask_session_settings

SESSION_BACKENDS = ("cookie", "server")


def _server_session_store(app: Flask) -> dict[str, Any]:
    """Flask-Session settings that keep sessions on the counters' store, whichever it is
    (``tally.sessions``): its deadline, the primary only, and ``StoreUnavailable`` for every failure.
    On SQL every host reads the same sessions; on the manager, every worker."""
    return flask_session_settings(app.extensions["tally"])


class SessionOpenedOnFirstUse:
    """The request's session, opened from its store the first time the request uses it.

    A request that never touches ``session`` (the JSON API, health, metrics, static files) neither
    reads nor parses the cookie, nor reads, refreshes or writes the server-side session: its session
    stays exactly as it was.  Every dict operation and attribute (``permanent``, ``modified``, ``sid``)
    opens the real session and goes to it.  Opening raises ``StoreUnavailable`` (503) when a
    server-side session store does not answer, in the view that needed the session.
    """

    __slots__ = ("_open", "opened")

    def __init__(self, open_session: Callable[[], SessionMixin]) -> None:
        object.__setattr__(self, "_open", open_session)
        object.__setattr__(self, "opened", None)

    def _session(self) -> SessionMixin:
        opened = self.opened
        if opened is None:
            opened = self._open()
            object.__setattr__(self, "opened", opened)
        return opened

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._session(), name, value)

    def __getitem__(self, key: str) -> Any:
        return self._session()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._session()[key] = value

    def __delitem__(self, key: str) -> None:
        del self._session()[key]

    def __contains__(self, key: object) -> bool:
        return key in self._session()

    def __iter__(self) -> Iterator[str]:
        return iter(self._session())

    def __len__(self) -> int:
        return len(self._session())

    def __bool__(self) -> bool:
        return bool(self._session())

    def __repr__(self) -> str:
        return f"<session opened on first use: {self.opened!r}>"


class OpenOnFirstUse:
    """A session interface around Flask's or Flask-Session's: ``open_session`` costs nothing, the
    session is opened when a view first uses it, and saved only if it was opened.  ``errors``: the
    exceptions of a server-side store's client, which become ``StoreUnavailable`` (503 within the
    store timeout, as a counter step would, instead of a 500 after the client's own retries)."""

    def __init__(self, inner: SessionInterface, errors: tuple[type[BaseException], ...] = ()) -> None:
        self._inner = inner
        self._errors = errors

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def open_session(self, app: Flask, request: Request) -> SessionOpenedOnFirstUse:
        return SessionOpenedOnFirstUse(lambda: self._open_now(app, request))

    def _open_now(self, app: Flask, request: Request) -> SessionMixin:
        try:
            opened = self._inner.open_session(app, request)
        except self._errors as error:
            raise StoreUnavailable(f"the session store did not answer: {error}") from error
        return opened if opened is not None else self._inner.make_null_session(app)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        opened = session.opened if isinstance(session, SessionOpenedOnFirstUse) else session
        if opened is None or self._inner.is_null_session(opened):
            return  # never used by this request: left as it was
        try:
            self._inner.save_session(app, opened, response)
        except self._errors as error:
            raise StoreUnavailable(f"the session store did not answer: {error}") from error


class SignedCookieSessions(SecureCookieSessionInterface):
    """Flask's signed-cookie sessions, without building a signing serializer for a request that
    carries no session cookie (every API client, every first visit): it starts from an empty
    session, exactly as Flask's own would, and is signed only if a view writes to it."""

    def open_session(self, app: Flask, request: Request) -> SecureCookieSession | None:
        if not app.secret_key:
            return None
        if not request.cookies.get(self.get_cookie_name(app)):
            return self.session_class()
        return super().open_session(app, request)


def init_sessions(app: Flask) -> None:
    backend = app.config.get("SESSION_BACKEND", "cookie")
    if backend not in SESSION_BACKENDS:
        raise ConfigError(
            f"setting SESSION_BACKEND must be one of {', '.join(SESSION_BACKENDS)}; got {backend!r}"
        )
    if backend == "cookie":
        app.session_interface = OpenOnFirstUse(SignedCookieSessions())
        return
    app.config.update(_server_session_store(app))
    app.config.setdefault("SESSION_KEY_PREFIX", "tally-session:")
    Session(app)
    app.session_interface = OpenOnFirstUse(app.session_interface, (StoreUnavailable,))
