"""Where the session lives: Flask's signed cookie (default) or, as the seed's Flask-Session answer
shows, a server-side store — the same one the counters use.

Either way the session holds only the client's random id (and the form's CSRF token); per-client
counters live in the counter store under that id, so they stay atomic in both modes.
"""

from __future__ import annotations

import os

from flask import Flask, Request
from flask.sessions import SecureCookieSession, SecureCookieSessionInterface
from flask_session import Session

from settings import ConfigError

SESSION_BACKENDS = ("cookie", "server")


def _server_session_store(app: Flask) -> dict:
    """Flask-Session settings for the configured store: thread-safe clients of the same servers."""
    config = app.config
    backend = config["CACHE_TYPE"]
    lifetime = int(app.permanent_session_lifetime.total_seconds())
    if backend == "RedisCache":
        import redis

        return {"SESSION_TYPE": "redis", "SESSION_REDIS": redis.Redis.from_url(config["CACHE_REDIS_URL"])}
    if backend == "MemcachedCache":
        # pymemcache's pooled clients are thread-safe (one pylibmc client is not, under gthread).
        from pymemcache.client.hash import HashClient

        addresses = (server.rpartition(":") for server in config["CACHE_MEMCACHED_SERVERS"])
        servers = [(host, int(port)) for host, _, port in addresses]
        return {"SESSION_TYPE": "memcached", "SESSION_MEMCACHED": HashClient(servers, use_pooling=True)}
    from cachelib import FileSystemCache, SimpleCache

    if backend == "SimpleCache":
        return {"SESSION_TYPE": "cachelib", "SESSION_CACHELIB": SimpleCache(default_timeout=lifetime)}
    directory = os.path.join(app.instance_path, "sessions")
    # threshold 0: cachelib never prunes live sessions to make room; expired ones go as they expire.
    store = FileSystemCache(directory, threshold=0, default_timeout=lifetime, mode=0o600)
    return {"SESSION_TYPE": "cachelib", "SESSION_CACHELIB": store}


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
    app.config.update(_server_session_store(app))
    app.config.setdefault("SESSION_KEY_PREFIX", "tally-session:")
    Session(app)
