"""Counter stores, one module (or package) per store; each registers itself by defining its class
(``base.REGISTRY``).

Importing this package imports every store module in it, so the registry lists every store whose
client library is installed; a module whose library is missing is remembered in ``MISSING`` with the
``pip install`` that brings it.  ``store_class`` and ``build_store`` are how the rest of Tally finds a
store: by its name, never by branching on it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .base import INT64_MAX, INT64_MIN, REGISTRY, CounterStore

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "MISSING",
    "REGISTRY",
    "CounterStore",
    "build_store",
    "cache_type_stores",
    "store_class",
]

#: The client library (top-level module) each extra brings, for the message about a missing one.
_EXTRA_OF_LIBRARY = {"pymemcache": "memcached", "redis": "redis", "sqlalchemy": "sql", "psycopg": "sql"}
#: Store modules that could not be imported here, by module, with why (the library that is missing).
MISSING: dict[str, str] = {}


def _import_every_store() -> None:
    for module in pkgutil.iter_modules(__path__, __name__ + "."):
        try:
            importlib.import_module(module.name)
        except ModuleNotFoundError as error:
            library = (error.name or "").split(".")[0]
            if library in ("", "tally"):
                raise  # Tally's own module is missing: a broken install, never skipped quietly
            extra = _EXTRA_OF_LIBRARY.get(library)
            hint = f": pip install 'flask-tally[{extra}]'" if extra else ""
            MISSING[module.name] = f"{module.name} needs {library}, which is not installed{hint}"


_import_every_store()


def missing_note() -> str:
    """What cannot be used here and how to install it, for a ``ConfigError`` ("" when nothing)."""
    return "; ".join(MISSING.values())


def store_class(name: Any) -> type[CounterStore]:
    """The store registered under ``name``, or ``ConfigError`` listing the registered ones."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        note = missing_note()
        raise ConfigError(
            f"no counter store is named {name!r}; the stores are {', '.join(REGISTRY)}"
            + (f" (not available here: {note})" if note else "")
        ) from None


def cache_type_stores() -> dict[str, type[CounterStore]]:
    """Flask-Caching backend (class name) -> the store that follows it."""
    return {cache_type: cls for cls in REGISTRY.values() for cache_type in cls.cache_types}


def build_store(settings: Mapping[str, Any], instance_path: str) -> CounterStore:
    """The store named by ``settings["STORE"]``, built from the checked settings."""
    return store_class(settings["STORE"]).from_settings(settings, instance_path)
