"""Rate limits (RATELIMIT_DEFAULT) on every route that changes something, through Flask-Limiter.

Reads (a counter's value, a shared value, health, liveness, metrics, static files) are never limited,
so monitoring and pages keep working for a client that hit its write limit: each such view carries
the ``never_limited`` mark.
"""

from collections.abc import Callable
from typing import Any, TypeVar

from flask import Flask, current_app, request
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from common import counters
from settings import rate_limit_storage, rate_limit_storage_options
from tally.extension import SETTINGS_KEY

#: The views marked ``never_limited``; filled as the route modules are imported.
_NEVER_LIMITED: set[Callable[..., Any]] = set()

F = TypeVar("F", bound=Callable[..., Any])


def never_limited(view: F) -> F:
    """Mark a view that only reads or reports on the service (a counter's value, health, liveness,
    metrics): no rate limit ever applies to it, so a client over its write budget, or a Prometheus
    server scraping from the same address, still gets its answer.  The mark sits on the view itself,
    so a new read route cannot be left out of a list kept elsewhere."""
    _NEVER_LIMITED.add(view)
    return view


def is_never_limited(endpoint: str | None) -> bool:
    """Whether the view behind ``endpoint`` is marked (static files always are)."""
    if endpoint == "static":
        return True
    return current_app.view_functions.get(endpoint or "") in _NEVER_LIMITED


def reads_are_not_limited() -> bool:
    return is_never_limited(request.endpoint)


def init_limits(app: Flask) -> Limiter:
    """A Limiter of this app's own.  Flask-Limiter keeps what ``init_app`` reads (limits, storage,
    options, key prefix) on the instance and keeps the first value it saw, so one instance shared by
    two apps in a process would apply the first app's limits to the second."""
    store = app.extensions[SETTINGS_KEY]  # what Tally resolved: the counters' backend and servers
    uri = app.config["RATELIMIT_STORAGE_URI"] = rate_limit_storage(app.config)
    if uri.startswith("tally://"):
        app.config.setdefault("RATELIMIT_STORAGE_OPTIONS", {"counters": counters})
    else:  # a storage of its own: the counters' timeout and no hidden retries there too
        app.config.setdefault(
            "RATELIMIT_STORAGE_OPTIONS", rate_limit_storage_options(uri, store["COUNTER_TIMEOUT"])
        )
    limiter = Limiter(key_func=get_remote_address)
    limiter.request_filter(reads_are_not_limited)
    limiter.init_app(app)
    return limiter
