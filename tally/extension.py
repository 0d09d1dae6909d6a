"""``Counters``: the Flask extension that views and the CLI call for every counter operation."""

from __future__ import annotations

import time
from typing import Any

from flask import Flask, current_app

from .errors import InvalidAmount, TallyError
from .names import client_key, validate_name
from .stores import INT64_MAX, CounterStore, build_store

EXTENSION_KEY = "tally"


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


class Counters:
    """Shared counters for a Flask app, on the store its Flask-Caching configuration names.

    Every method is one atomic step of the store (see ``CounterStore.add``): correct across threads,
    and across processes and hosts on the stores that share state.  Failures raise ``TallyError``
    subclasses (``InvalidName``, ``InvalidAmount``, ``Overflow``, ``StoreUnavailable``,
    ``CorruptCounter``), never return a guessed value.  Counters never expire.
    """

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        app.extensions[EXTENSION_KEY] = build_store(app.config, app.instance_path)

    @property
    def store(self) -> CounterStore:
        return current_app.extensions[EXTENSION_KEY]

    def incr(self, name: str, by: int = 1) -> int:
        """Add ``by`` (1 .. 2**63-1) to counter ``name`` and return the new value."""
        return self.store.add(validate_name(name), _check_amount(by))

    def decr(self, name: str, by: int = 1) -> int:
        """Subtract ``by`` from counter ``name`` and return the new value (may go below zero)."""
        return self.store.add(validate_name(name), -_check_amount(by))

    def get(self, name: str) -> int:
        """The current value of ``name``; 0 for a counter never written."""
        return self.store.get(validate_name(name))

    def set(self, name: str, value: int) -> int:
        """Replace the value of ``name`` (admin operation) and return it."""
        self.store.set(validate_name(name), self.store.check_range(_check_value(value)))
        return value

    def reset(self, name: str) -> bool:
        """Delete ``name`` so that it reads 0 again; return whether it existed."""
        return self.store.delete(validate_name(name))

    def for_client(self, client_id: str, lifetime: int) -> ClientCounters:
        """The counters of one client (browser session), which expire ``lifetime`` s after last use."""
        return ClientCounters(self, client_id, lifetime)

    def health(self) -> dict[str, Any]:
        """Backend name, reachability and round-trip latency; never raises for an outage."""
        store = self.store
        started = time.perf_counter()
        try:
            details = store.health()
        except TallyError as error:
            return {"backend": store.backend, "reachable": False, "detail": str(error)}
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        return {"backend": store.backend, "reachable": True, "latency_ms": latency_ms, **details}


class ClientCounters:
    """Counters private to one client id; each expires ``lifetime`` seconds after its last use."""

    def __init__(self, counters: Counters, client_id: str, lifetime: int) -> None:
        self._counters = counters
        self._client_id = client_id
        self._lifetime = lifetime

    def _key(self, name: str) -> str:
        return client_key(self._client_id, name)

    def incr(self, name: str, by: int = 1) -> int:
        return self._counters.store.add(self._key(name), _check_amount(by), ttl=self._lifetime)

    def decr(self, name: str, by: int = 1) -> int:
        return self._counters.store.add(self._key(name), -_check_amount(by), ttl=self._lifetime)

    def get(self, name: str) -> int:
        """The value; reading renews the counter's lifetime, as every request renews the session."""
        return self._counters.store.get(self._key(name), ttl=self._lifetime)

    def reset(self, name: str) -> bool:
        return self._counters.store.delete(self._key(name))
