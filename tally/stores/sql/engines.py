"""Reaching the database: ``SQLALCHEMY_DATABASE_URI`` resolved for the sql store (``database_uri``:
SQLite files under the instance folder, PostgreSQL through psycopg 3, nothing else), and one
SQLAlchemy engine per dialect with the store's time bounds set where the database and its driver take
them (SQLite's busy wait; PostgreSQL's server-side timeouts and a connect waited for at most
``timeout``).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from ...errors import ConfigError, StoreUnavailable

#: The database of COUNTER_STORE = "sql" when SQLALCHEMY_DATABASE_URI is not set (in the instance folder).
DEFAULT_DATABASE_URI = "sqlite:///tally.db"
SQLITE_MIN_VERSION = (3, 35, 0)  # RETURNING

#: SQLite's own wait for a lock before Tally tries again (see ``SqlCounterStore._execute``).
BUSY_SLICE_MS = 10


def database_uri(uri: Any, instance_path: str) -> str:
    """``SQLALCHEMY_DATABASE_URI`` for the sql store: ``sqlite:///relative.db`` resolved under the
    instance folder, ``postgresql://`` driven by psycopg 3; anything else is a ``ConfigError``."""
    try:
        url = make_url(os.fspath(uri) if isinstance(uri, os.PathLike) else uri)
    except (ArgumentError, TypeError, ValueError) as error:
        raise ConfigError(
            f"setting SQLALCHEMY_DATABASE_URI must be a database URL; got {uri!r}: {error}"
        ) from None
    if url.drivername in ("sqlite", "sqlite+pysqlite"):
        if not url.database or url.database == ":memory:":
            raise ConfigError(
                "SQLALCHEMY_DATABASE_URI: an in-memory SQLite database is private to one connection;"
                " name a file (sqlite:///tally.db is created in the instance folder)"
            )
        path = os.path.abspath(os.path.join(instance_path, url.database))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return url.set(drivername="sqlite", database=path).render_as_string(hide_password=False)
    if url.drivername in ("postgresql", "postgresql+psycopg"):
        return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    raise ConfigError(
        f"SQLALCHEMY_DATABASE_URI {url.render_as_string(hide_password=True)!r}: the sql store supports"
        " sqlite:///... and postgresql+psycopg://..."
    )


def sqlite_engine(url: URL, pool_size: int, fsync: bool, timeout: float) -> Engine:
    """An engine for a SQLite file: WAL, a short busy wait (the store tries again until ``timeout``),
    ``synchronous = FULL`` with ``fsync``; every connection of the pool autocommits."""
    if sqlite3.sqlite_version_info < SQLITE_MIN_VERSION:
        raise StoreUnavailable(
            f"SQLite {sqlite3.sqlite_version} has no RETURNING; Tally needs SQLite 3.35 or later"
            " (a newer Python, or pysqlite3)"
        )
    timeout_ms = max(1, int(timeout * 1000))
    engine = create_engine(
        url,
        isolation_level="AUTOCOMMIT",  # each statement commits; update_value says BEGIN IMMEDIATE
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=timeout,
        connect_args={"timeout": timeout, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def configure(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute(f"PRAGMA busy_timeout={timeout_ms}")  # WAL may wait for a lock
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute(f"PRAGMA busy_timeout={BUSY_SLICE_MS}")  # then Tally retries
        dbapi_connection.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")

    return engine


def postgresql_engine(url: URL, pool_size: int, timeout: float) -> Engine:
    """An engine for PostgreSQL through psycopg 3: the server is told ``statement_timeout`` and
    ``lock_timeout`` = ``timeout``, connecting is waited for at most ``timeout``, and every connection
    autocommits."""
    import psycopg

    timeout_ms = max(1, int(timeout * 1000))
    options = (
        f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}"
        f" -c idle_in_transaction_session_timeout={max(1000, 4 * timeout_ms)}"
    )
    # SQLAlchemy's own reading of the URL, so that what works for its engine works here: libpq's
    # multi-host form (?host=a:5432&host=b:5432&target_session_attrs=read-write) becomes host="a,b"
    # port="5432,5432", which libpq tries in turn; a host:port read as one host name failed to resolve.
    _, params = url.set(drivername="postgresql+psycopg").get_dialect()().create_connect_args(url)
    if params.get("options"):
        options = f"{params.pop('options')} {options}"

    def connect() -> Any:
        """psycopg's connect, waited for at most ``timeout`` in all, every host of a multi-host URL
        included (libpq's connect_timeout, per host, is >= 2 s): a late connection is closed by the
        thread that made it."""
        outcome: dict[str, Any] = {}
        gave_up = threading.Event()

        def attempt() -> None:
            try:
                connection = psycopg.connect(
                    **{"connect_timeout": 2, **params}, autocommit=True, options=options
                )
            except Exception as error:  # handed to the waiting caller
                outcome["error"] = error
                return
            outcome["connection"] = connection
            if gave_up.is_set():
                connection.close()

        thread = threading.Thread(target=attempt, name="tally-sql-connect", daemon=True)
        thread.start()
        thread.join(timeout)
        if "connection" in outcome:
            return outcome["connection"]
        gave_up.set()
        if "connection" in outcome:  # arrived between the join and the flag
            return outcome["connection"]
        if "error" in outcome:
            raise outcome["error"]
        raise psycopg.OperationalError(f"no connection to PostgreSQL within {timeout} s")

    return create_engine(
        "postgresql+psycopg://",
        creator=connect,
        isolation_level="AUTOCOMMIT",  # each step is one statement; update_value says BEGIN
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=timeout,
    )
