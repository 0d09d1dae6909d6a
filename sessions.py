"""Where the session lives: Flask's signed cookie (default) or, as the seed's Flask-Session answer
shows, a server-side store — the same one the counters use.

Either way the session holds only the client's random id (and the form's CSRF token); per-client
counters live in the counter store under that id, so they stay atomic in both modes.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Request, Response, request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface, SessionMixin
from flask_session import Session

from settings import ConfigError
from tally import StoreUnavailable
from tally.extension import SETTINGS_KEY

SESSION_BACKENDS = ("cookie", "server")


def _server_session_store(app: Flask) -> tuple[dict, tuple[type[BaseException], ...]]:
    """Flask-Session settings for the configured store (thread-safe clients of the same servers,
    with the counters' timeout and no hidden retries), and the errors its client raises when the
    store cannot be reached."""
    config = app.extensions[SETTINGS_KEY]  # what Tally resolved: the counters' backend and servers
    backend = config["CACHE_TYPE"]
    lifetime = int(app.permanent_session_lifetime.total_seconds())
    timeout = config["COUNTER_TIMEOUT"]
    if backend in ("RedisSentinelCache", "RedisClusterCache"):
        # The counter store's own way to the primary: followed through a failover, never a replica.
        client = app.extensions["tally"].session_client()
        return {"SESSION_TYPE": "redis", "SESSION_REDIS": client}, (StoreUnavailable,)
    if backend == "RedisCache":
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            config["CACHE_REDIS_URL"],
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
        return {"SESSION_TYPE": "redis", "SESSION_REDIS": client}, (redis.ConnectionError, redis.TimeoutError)
    if backend == "MemcachedCache":
        # The counter store's own connections: a deadline per command, and a server that is down is
        # never replaced by another (where the session would not be found).
        client = app.extensions["tally"].session_client()
        return {"SESSION_TYPE": "memcached", "SESSION_MEMCACHED": client}, (StoreUnavailable,)
    from cachelib import FileSystemCache, SimpleCache

    if backend == "SimpleCache":
        return {"SESSION_TYPE": "cachelib", "SESSION_CACHELIB": SimpleCache(default_timeout=lifetime)}, ()
    directory = os.path.join(app.instance_path, "sessions")
    # threshold 0: cachelib never prunes live sessions to make room; expired ones go as they expire.
    store = FileSystemCache(directory, threshold=0, default_timeout=lifetime, mode=0o600)
    return {"SESSION_TYPE": "cachelib", "SESSION_CACHELIB": store}, ()


#: Where a session store's error waits (in the WSGI environ) for the first before-request hook.
SESSION_ERROR = "tally.session_error"


class UnreachableStoreIs503:
    """A Flask-Session interface whose store errors become ``StoreUnavailable``: a request whose
    session cannot be read or saved answers 503 within the store timeout, as a counter would,
    instead of a 500 after the client's own retries.

    Flask opens the session before its error handlers apply, so a failed open hands the request a
    null session and leaves the error for ``raise_session_store_error`` to raise before any view.
    """

    def __init__(self, inner: Any, errors: tuple[type[BaseException], ...]) -> None:
        self._inner = inner
        self._errors = errors

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def open_session(self, app: Flask, request: Request) -> SessionMixin | None:
        try:
            return self._inner.open_session(app, request)
        except self._errors as error:
            request.environ[SESSION_ERROR] = StoreUnavailable(f"the session store did not answer: {error}")
            return self._inner.make_null_session(app)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        try:
            self._inner.save_session(app, session, response)
        except self._errors as error:
            raise StoreUnavailable(f"the session store did not answer: {error}") from error


def raise_session_store_error() -> None:
    """Before every request: the session could not be opened, so the request fails with 503."""
    error = request.environ.pop(SESSION_ERROR, None)
    if error is not None:
        raise error


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
        app.session_interface = SignedCookieSessions()
        return
    settings, errors = _server_session_store(app)
    app.config.update(settings)
    app.config.setdefault("SESSION_KEY_PREFIX", "tally-session:")
    Session(app)
    if errors:
        app.session_interface = UnreachableStoreIs503(app.session_interface, errors)
        app.before_request(raise_session_store_error)
