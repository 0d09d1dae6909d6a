"""``Counters``: the Flask extension that views and the CLI call for every counter operation."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

from flask import Flask, current_app
from werkzeug.local import LocalProxy

from . import metrics
from .combining import Combiner
from .config import store_settings
from .errors import ConfigError, InvalidAmount, InvalidName, NotSetUp, StoreUnavailable, TallyError
from .handlers import register_error_handler
from .names import CLIENT_ID_PATTERN, VALID_NAMES, client_key, validate_name
from .stores import INT64_MAX, CounterStore, build_store

EXTENSION_KEY = "tally"
#: The resolved settings the store was built with (backend, servers, COUNTER_* keys).
SETTINGS_KEY = "tally.settings"
#: What ``Counters.incr``/``decr`` call: the store's ``add``, or a ``Combiner``'s (COUNTER_COMBINE on a
#: store that asks for it, see ``tally.combining``).
ADD_KEY = "tally.add"
#: ``(incr, decr, get)``: the steps ``Counters`` calls on every request (``ADD_KEY``'s add twice, the
#: store's get), each counted and timed by ``metrics.measured`` with its labels resolved once.
STEPS_KEY = "tally.steps"
#: Where ``Counters.for_session`` keeps this browser's client id in its session.
SESSION_CLIENT_ID = "tally_client_id"

#: The app of the current app context (``RuntimeError`` outside one, as ``current_app`` raises): the
#: object itself, without the proxy's attribute look-up on each use, which costs more than a name check.
_current_app: Callable[[], Flask] = cast("LocalProxy[Flask]", current_app)._get_current_object


#: Called with the app once its store is set up: what layers above this one add to every app
#: (``tally.cli`` adds ``flask counters``); filled when ``tally`` is imported.
SET_UP_HOOKS: list[Callable[[Flask], None]] = []


def set_up_store(app: Flask, cache: Any = None) -> CounterStore:
    """The app's counter store, built once per app from its settings (and ``cache``'s backend when
    given); ``Counters`` and ``SharedValues`` share it.  Raises ``ConfigError`` at start-up for any
    bad setting or a backend Tally cannot make atomic."""
    if EXTENSION_KEY in app.extensions:
        return _app_store(app)
    backend = None
    if cache is not None:
        try:
            backend = app.extensions["cache"][cache]
        except (KeyError, TypeError):
            raise ConfigError(
                "call cache.init_app(app) before counters.init_app(app): Counters(cache) keeps its"
                " counters on the store that cache was set up with"
            ) from None
    settings = store_settings(app, backend)
    store = build_store(settings, app.instance_path)
    app.extensions[SETTINGS_KEY] = settings
    app.extensions[EXTENSION_KEY] = store
    combine = settings["COUNTER_COMBINE"] and store.combines_adds
    add = app.extensions[ADD_KEY] = Combiner(store.add).add if combine else store.add
    app.extensions[STEPS_KEY] = (
        metrics.measured(store, "incr", add),
        metrics.measured(store, "decr", add),
        metrics.measured(store, "get", store.get),
    )
    register_error_handler(app)
    for hook in SET_UP_HOOKS:
        hook(app)
    return store


def _not_set_up(app: Flask) -> NotSetUp:
    return NotSetUp(
        f"Tally is not set up on app {app.name!r}: call counters.init_app(app) in the app factory"
        " (after cache.init_app(app) when Counters(cache) follows a Flask-Caching Cache)"
    )


def _app_store(app: Flask) -> CounterStore:
    """The counter store ``set_up_store`` built for ``app``; ``NotSetUp`` naming ``init_app`` when it
    never ran for this app."""
    try:
        store: CounterStore = app.extensions[EXTENSION_KEY]
    except KeyError:
        raise _not_set_up(app) from None
    return store


_Steps = tuple[Callable[[str, int], int], Callable[[str, int], int], Callable[[str], int]]


def _app_steps(app: Flask) -> _Steps:
    try:
        steps: _Steps = app.extensions[STEPS_KEY]
    except KeyError:
        raise _not_set_up(app) from None
    return steps


class _Extension:
    """``X(app)``, ``X(cache)`` then ``init_app(app)``, or ``X()`` then ``init_app(app)``."""

    def __init__(self, app_or_cache: Any = None) -> None:
        self._cache = None
        #: The app given at construction (``X(app)`` or ``X(Cache(app))``), as Flask-Caching keeps it:
        #: what the ``tally://`` limits storage uses outside an app context.  ``None`` otherwise.
        self.app: Flask | None = None
        if isinstance(app_or_cache, Flask):
            self.app = app_or_cache
            self.init_app(app_or_cache)
        elif app_or_cache is not None:
            if not hasattr(app_or_cache, "init_app"):
                raise TypeError(f"expected a Flask app or a Flask-Caching Cache, got {app_or_cache!r}")
            self._cache = app_or_cache
            bound = getattr(app_or_cache, "app", None)  # Cache(app): already set up for that app
            if isinstance(bound, Flask):
                self.app = bound
                self.init_app(bound)

    def init_app(self, app: Flask) -> None:
        set_up_store(app, self._cache)


def _check_amount(by: object) -> int:
    if isinstance(by, bool) or not isinstance(by, int):
        raise InvalidAmount(f"'by' must be a whole number, got {type(by).__name__}")
    if not 1 <= by <= INT64_MAX:
        raise InvalidAmount(f"'by' must be between 1 and {INT64_MAX}, got {by}")
    return by


def _check_value(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidAmount(f"'value' must be a whole number, got {type(value).__name__}")
    return value


class Counters(_Extension):
    """Shared counters for a Flask app, on the store its Flask-Caching configuration names.

    ``Counters(app)`` reads Flask-Caching's keys in ``app.config`` (``CACHE_TYPE`` in any spelling;
    none at all: the filesystem store in the instance folder).  ``Counters(cache)`` follows whatever
    backend that ``Cache`` was set up with, wherever its settings were given.  Tally's own keys
    (``COUNTER_*``, ``VALUE_MAX_BYTES``) get defaults with ``app.config.setdefault``; a bad value or an
    unsupported backend raises ``ConfigError`` at ``init_app``.

    Every method is one atomic step of the store (see ``CounterStore.add``): correct across threads,
    and across processes and hosts on the stores that share state.  Failures raise ``TallyError``
    subclasses (``InvalidName``, ``InvalidAmount``, ``Overflow``, ``StoreUnavailable``,
    ``CorruptCounter``), never return a guessed value.  Counters never expire.  Each step is counted
    and timed by ``tally.metrics`` (a no-op without prometheus_client); names are never recorded.
    """

    @property
    def store(self) -> CounterStore:
        return _app_store(_current_app())

    def incr(self, name: str, by: int = 1) -> int:
        """Add ``by`` (1 .. 2**63-1) to counter ``name`` and return the new value.  Concurrent calls
        on one counter may share one store step (COUNTER_COMBINE, ``tally.combining``); each is still
        counted and timed as its own step."""
        # The checks' usual outcome, then the look-ups, inline (a function call costs as much as each):
        # a name already found valid (``validate_name`` remembers plain str only), a plain int in range.
        key = name if type(name) is str and name in VALID_NAMES else validate_name(name)
        amount = by if type(by) is int and 0 < by <= INT64_MAX else _check_amount(by)
        app = _current_app()
        try:
            incr: Callable[[str, int], int] = app.extensions[STEPS_KEY][0]
        except KeyError:
            raise _not_set_up(app) from None
        return incr(key, amount)

    def decr(self, name: str, by: int = 1) -> int:
        """Subtract ``by`` from counter ``name`` and return the new value (may go below zero)."""
        key = name if type(name) is str and name in VALID_NAMES else validate_name(name)
        amount = -by if type(by) is int and 0 < by <= INT64_MAX else -_check_amount(by)
        app = _current_app()
        try:
            decr: Callable[[str, int], int] = app.extensions[STEPS_KEY][1]
        except KeyError:
            raise _not_set_up(app) from None
        return decr(key, amount)

    def get(self, name: str) -> int:
        """The current value of ``name``; 0 for a counter never written."""
        get = _app_steps(_current_app())[2]
        return get(validate_name(name))

    def set(self, name: str, value: int) -> int:
        """Replace the value of ``name`` (admin operation) and return it."""
        store = self.store
        key = validate_name(name)
        _check_value(value)

        def replace(key: str) -> None:  # the range check is part of the step: an overflow is counted
            store.set(key, store.check_range(value))

        metrics.measure(store, "set", key, replace)
        return value

    def reset(self, name: str) -> bool:
        """Delete ``name`` so that it reads 0 again; return whether it existed."""
        store = self.store
        return metrics.measure(store, "reset", validate_name(name), store.delete)

    def for_client(self, client_id: str, lifetime: int) -> ClientCounters:
        """The counters of one client, which expire ``lifetime`` s after their last use.

        ``client_id`` is 32 lowercase hex digits (``secrets.token_hex(16)``), kept where the client
        keeps its identity, typically its session: ``for_session`` does exactly that.  A bad id or
        lifetime raises ``InvalidName`` / ``InvalidAmount`` here, not at the first step."""
        return ClientCounters(self, client_id, lifetime)

    def for_session(self, lifetime: int | None = None) -> ClientCounters:
        """The counters of this browser: its id is ``session["tally_client_id"]``, made (a random
        ``secrets.token_hex(16)``) the first time; ``lifetime`` defaults to the app's
        ``PERMANENT_SESSION_LIFETIME``, so the counters live as long as the session.  Needs a request
        context and a session (a ``SECRET_KEY``, or Flask-Session)."""
        import secrets

        from flask import session

        client_id = session.get(SESSION_CLIENT_ID)
        if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
            client_id = session[SESSION_CLIENT_ID] = secrets.token_hex(16)
        if lifetime is None:
            lifetime = int(current_app.permanent_session_lifetime.total_seconds())
        return ClientCounters(self, client_id, lifetime)

    def health(self) -> dict[str, Any]:
        """Backend name, reachability and round-trip latency; never raises for an outage.  An
        unreachable store starts an outage in ``tally.metrics`` (logged once), a reachable one may end
        it."""
        store = self.store
        started = time.perf_counter()
        try:
            details = store.health()
        except TallyError as error:
            if isinstance(error, StoreUnavailable):
                metrics.store_unavailable(store, error)
            return {"backend": store.backend, "reachable": False, "detail": str(error)}
        metrics.store_reachable(store)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        return {"backend": store.backend, "reachable": True, "latency_ms": latency_ms, **details}


class ClientCounters:
    """Counters private to one client id; each expires ``lifetime`` seconds after its last use."""

    def __init__(self, counters: Counters, client_id: str, lifetime: int) -> None:
        if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
            raise InvalidName(
                f"client ids are 32 lowercase hex digits (secrets.token_hex(16)), kept in the client's"
                f" session; got {client_id!r:.60}"
            )
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime < 1:
            raise InvalidAmount(f"'lifetime' must be a whole number of seconds >= 1, got {lifetime!r:.60}")
        self._counters = counters
        self._client_id = client_id
        self._lifetime = lifetime

    def _key(self, name: str) -> str:
        return client_key(self._client_id, name)

    def incr(self, name: str, by: int = 1) -> int:
        store = self._counters.store
        key = self._key(name)
        return metrics.measure(store, "client_incr", key, store.add, _check_amount(by), self._lifetime)

    def decr(self, name: str, by: int = 1) -> int:
        store = self._counters.store
        key = self._key(name)
        return metrics.measure(store, "client_decr", key, store.add, -_check_amount(by), self._lifetime)

    def get(self, name: str) -> int:
        """The value; reading renews the counter's lifetime, as every request renews the session."""
        store = self._counters.store
        return metrics.measure(store, "client_get", self._key(name), store.get, self._lifetime)

    def reset(self, name: str) -> bool:
        store = self._counters.store
        return metrics.measure(store, "client_reset", self._key(name), store.delete)
