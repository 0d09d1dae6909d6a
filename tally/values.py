"""``SharedValues``: any small JSON value shared by every worker and host, updated atomically.

The general answer to "how do I share data between requests": a dict, a list of recent visitors, a
settings blob.  ``update(key, fn)`` applies ``fn`` to the current value and stores the result as one
atomic step of the configured store (file lock, memcached gets/cas, a Redis compare-and-set script,
a row lock in SQL, a version check in the manager, a lock in memory), so two concurrent updates never
lose one another.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from . import metrics
from .errors import CorruptValue, InvalidValue, ValueTooLarge
from .extension import _app_store, _current_app, _Extension
from .names import validate_name
from .stores import CounterStore


def _encode(value: Any) -> bytes:
    try:
        data = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidValue(
            f"shared values must be JSON (dict, list, str, int, float, bool, None): {error}"
        ) from None
    encoded = data.encode()
    limit = _current_app().config["VALUE_MAX_BYTES"]
    if len(encoded) > limit:
        raise ValueTooLarge(f"the value takes {len(encoded)} bytes as JSON; the limit is {limit}")
    return encoded


def _decode(key: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise CorruptValue(f"shared value {key!r} is not valid JSON in the store") from None


class SharedValues(_Extension):
    """JSON values in the app's counter store: ``SharedValues(app)``, or ``SharedValues(cache)`` then
    ``init_app(app)``, set up like ``Counters`` (and sharing its store when both are used).

    Values are stored as JSON, so a value written by one host is readable by every other and nothing
    is ever unpickled from the store.  They never expire unless a ``timeout`` (seconds) is given.
    Errors are ``TallyError``s: ``InvalidName``, ``InvalidValue``, ``ValueTooLarge`` (over
    ``VALUE_MAX_BYTES``), ``Conflict``, ``StoreUnavailable``, ``CorruptValue``.  Each store step is
    counted and timed by ``tally.metrics`` (operations ``value_get``, ``value_set``, ``value_delete``,
    ``value_update``); keys are never recorded.
    """

    @property
    def store(self) -> CounterStore:
        return _app_store(_current_app())

    def get_value(self, key: str, default: Any = None) -> Any:
        """The current value of ``key``, or ``default`` when it is missing or expired."""
        store = self.store
        data = metrics.measure(store, "value_get", validate_name(key), store.get_value)
        return default if data is None else _decode(key, data)

    def set_value(self, key: str, value: Any, timeout: int | None = None) -> Any:
        """Replace the value of ``key``; readers see the old value or the new one, never a mix."""
        store = self.store
        metrics.measure(store, "value_set", validate_name(key), store.set_value, _encode(value), timeout)
        return value

    def delete_value(self, key: str) -> bool:
        """Remove ``key``; return whether it existed."""
        store = self.store
        return metrics.measure(store, "value_delete", validate_name(key), store.delete_value)

    def update(
        self, key: str, fn: Callable[[Any], Any], default: Any = None, timeout: int | None = None
    ) -> Any:
        """Store ``fn(current)`` (``current`` is ``default`` when missing) as one atomic step; return it.

        No concurrent update is lost, on any store.  ``fn`` may be called more than once: on
        memcached and Redis a conflicting write makes the update run again on the newer value, so
        ``fn`` must be a pure function of its argument (no side effects, no counting its calls).
        After 100 conflicts in a row ``Conflict`` is raised and nothing is written.  ``fn`` gets a
        fresh copy each time and may change it in place, as long as it returns the new value.
        """
        validate_name(key)

        def change(data: bytes | None) -> bytes:
            current = json.loads(json.dumps(default)) if data is None else _decode(key, data)
            return _encode(fn(current))

        store = self.store
        return _decode(key, metrics.measure(store, "value_update", key, store.update_value, change, timeout))
