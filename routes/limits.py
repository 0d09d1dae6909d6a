"""Rate limits (RATELIMIT_DEFAULT) on every route that changes something, through Flask-Limiter.

Reads (a counter's value, a shared value, health, static files) are never limited, so monitoring and
pages keep working for a client that hit its write limit.
"""

from flask import Flask, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from settings import rate_limit_storage, rate_limit_storage_options
from tally.extension import SETTINGS_KEY

READ_ONLY_ENDPOINTS = frozenset(
    {
        "static",
        "api.read",
        "clients.me_read",
        "shared.read",
        "health.healthz",
        "health.livez",
        "leaderboard.leaderboard",
    }
)


def reads_are_not_limited() -> bool:
    return request.endpoint in READ_ONLY_ENDPOINTS


def init_limits(app: Flask) -> Limiter:
    """A Limiter of this app's own.  Flask-Limiter keeps what ``init_app`` reads (limits, storage,
    options, key prefix) on the instance and keeps the first value it saw, so one instance shared by
    two apps in a process would apply the first app's limits to the second."""
    store = app.extensions[SETTINGS_KEY]  # what Tally resolved: the counters' backend and servers
    app.config["RATELIMIT_STORAGE_URI"] = rate_limit_storage(app.config, store)
    app.config.setdefault(
        "RATELIMIT_STORAGE_OPTIONS",
        rate_limit_storage_options(app.config["RATELIMIT_STORAGE_URI"], store["COUNTER_TIMEOUT"]),
    )
    limiter = Limiter(key_func=get_remote_address)
    limiter.request_filter(reads_are_not_limited)
    limiter.init_app(app)
    return limiter
