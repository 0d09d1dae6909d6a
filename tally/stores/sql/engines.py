"""Reaching the database: ``SQLALCHEMY_DATABASE_URI`` resolved for the sql store (``database_uri``:
SQLite files under the instance folder, PostgreSQL through psycopg 3, nothing else), and one
SQLAlchemy engine per dialect with the store's time bounds set where the database and its driver take
them (SQLite's busy wait; PostgreSQL's server-side timeouts and a connect waited for at most
``timeout``).
"""

from __future__ import annotations

import os
import queue
import sqlite3
import threading
import time
from collections.abc import Mapping
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError

from ...errors import ConfigError, StoreUnavailable
from .connections import collect_warnings

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


#: ``at``: the monotonic time by which the store call this thread is making must end (set by the
#: store around a pool checkout): a connection made for it is waited for no longer than that.
CALL_DEADLINE = threading.local()


def one_host_each(params: Mapping[str, Any]) -> list[dict[str, Any]]:
    """libpq's multi-host parameters (host="a,b", port="p1,p2" or one port for all) as one set of
    parameters per host; anything else (one host, hostaddr lists) as it is."""
    hosts = str(params.get("host", "")).split(",")
    if len(hosts) < 2 or "hostaddr" in params:
        return [dict(params)]
    ports = str(params.get("port", "")).split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    if len(ports) != len(hosts):
        return [dict(params)]  # libpq reports the mismatch itself
    return [{**params, "host": host, "port": port} for host, port in zip(hosts, ports, strict=True)]


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
    # port="5432,5432" (a host:port read as one host name failed to resolve), and connect() below
    # tries those hosts at the same time.
    _, params = url.set(drivername="postgresql+psycopg").get_dialect()().create_connect_args(url)
    if params.get("options"):
        options = f"{params.pop('options')} {options}"

    attempts = one_host_each(params)

    def connect() -> Any:
        """A connection within ``timeout`` in all (libpq's connect_timeout is per host and >= 2 s).
        Each host of a multi-host URL is tried at the same time, in a thread of its own, and the
        first that accepts (and, with target_session_attrs=read-write, is writable) is used: tried in
        turn, a host cut off by a partition would take the whole deadline while the new primary
        waited behind it.  A connection that arrives after the caller was answered is closed by the
        thread that made it."""
        arrived: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        lock = threading.Lock()
        answered = False

        def attempt(host_params: dict[str, Any]) -> None:
            nonlocal answered
            try:
                connection = psycopg.connect(
                    **{"connect_timeout": 2, **host_params}, autocommit=True, options=options
                )
            except Exception as error:  # handed to the waiting caller
                arrived.put(("error", error))
                return
            collect_warnings(connection)
            with lock:
                if not answered:
                    answered = True
                    arrived.put(("connection", connection))
                    return
            connection.close()

        for host_params in attempts:
            thread = threading.Thread(target=attempt, args=(host_params,), name="tally-sql-connect")
            thread.daemon = True
            thread.start()
        call_ends_at = getattr(CALL_DEADLINE, "at", None)
        deadline = time.monotonic() + timeout
        if call_ends_at is not None:
            deadline = min(deadline, call_ends_at)
        errors: list[Exception] = []
        while len(errors) < len(attempts):
            try:
                kind, found = arrived.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if kind == "connection":
                return found
            errors.append(found)
        with lock:
            late = answered  # a connection was handed over just now: it is in the queue
            answered = True
        while late:
            kind, found = arrived.get()
            if kind == "connection":
                return found
        if errors:
            raise (
                errors[-1]
                if len(errors) == 1
                else psycopg.OperationalError(
                    "; ".join(str(error).strip().splitlines()[0] for error in errors if str(error).strip())
                )
            )
        raise psycopg.OperationalError(f"no connection to PostgreSQL within {timeout} s")

    return create_engine(
        "postgresql+psycopg://",
        creator=connect,
        isolation_level="AUTOCOMMIT",  # each step is one statement; update_value says BEGIN
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=timeout,
    )
