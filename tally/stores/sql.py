"""Counters and shared values in a SQL database through SQLAlchemy 2 Core: SQLite (the processes of one
host) or PostgreSQL through psycopg 3 (every host using the server).

Every counter step is one statement, atomic in the database::

    INSERT INTO tally_counters (name, value, expires_at) VALUES (:name, :delta, :expires_at)
    ON CONFLICT (name) DO UPDATE SET value = tally_counters.value + :delta, expires_at = ...
    WHERE tally_counters.value BETWEEN :lowest AND :highest
    RETURNING value

``:lowest``/``:highest`` are the values from which adding ``delta`` stays in int64, computed in
Python, so the sum is never formed when it would overflow: no row comes back, the value is unchanged,
and ``Overflow`` is raised.  (SQLite would otherwise turn ``9223372036854775807 + 1`` into the REAL
``9.223372036854776e18``, silently, UPSERT included.)  A per-client row whose ``expires_at`` has passed
counts as missing.  Shared values are updated inside one transaction that holds the row: ``BEGIN
IMMEDIATE`` on SQLite (the database's write lock), ``SELECT ... FOR UPDATE`` on PostgreSQL (a row
lock, after an ``INSERT ... ON CONFLICT DO NOTHING`` so that a new key has a row to lock): no lost
update and no retries.

Time bounds.  SQLite waits at most ``timeout`` for a lock (a short ``busy_timeout``, tried again every
few milliseconds until ``timeout``: SQLite's own handler is unfair between processes).  On PostgreSQL the
server is told ``statement_timeout`` and ``lock_timeout`` = ``timeout``, but a server that is hung
(SIGSTOP, a dead host behind a live TCP stack) answers nothing, not even a timeout; so every call also
has a client-side deadline: when a call is still running ``timeout`` seconds after it started, its
socket is shut down (``SocketDeadlines``), the driver fails at once, the connection is discarded and
the caller gets ``StoreUnavailable``.  Connecting is bounded the same way (libpq's own
``connect_timeout`` cannot go below 2 s).  The next call opens a new connection, so service returns by
itself when the server does.

Durability is the database's: a step is acknowledged after its commit, so it survives a crash of the
server (PostgreSQL) or of every process (SQLite; with ``fsync`` also a power loss: ``synchronous =
FULL``).  SQLite in WAL mode is one host only: WAL does not work over a network filesystem.
"""

from __future__ import annotations

import heapq
import os
import random
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    LargeBinary,
    MetaData,
    String,
    Table,
    and_,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    exc,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError

from ..errors import ConfigError, Overflow, StoreUnavailable
from .base import INT64_MAX, INT64_MIN, CounterStore, KeyLocks, SchemaSupport, counter_name

#: The schema, for ``metadata.create_all`` or an app's own migrations (Alembic: include ``metadata``).
metadata = MetaData()

counters_table = Table(
    "tally_counters",
    metadata,
    Column("name", String(255), primary_key=True),  # a counter name, or "@<client id>.<name>"
    Column("value", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),  # unix seconds; NULL: never (shared counters)
    Index("tally_counters_expires_at", "expires_at"),
)

values_table = Table(
    "tally_values",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("data", LargeBinary, nullable=True),  # NULL: a row made only to be locked; reads as missing
    Column("expires_at", BigInteger, nullable=True),
)

#: The database of COUNTER_STORE = "sql" when SQLALCHEMY_DATABASE_URI is not set (in the instance folder).
DEFAULT_DATABASE_URI = "sqlite:///tally.db"
SQLITE_MIN_VERSION = (3, 35, 0)  # RETURNING
SQLITE_BUSY, SQLITE_LOCKED = 5, 6
#: SQLite's own wait for a lock before Tally tries again (see ``_execute``).
BUSY_SLICE_MS = 10
#: The statements that only read (every other one takes SQLite's write lock).
READS = frozenset({"read", "names", "get_value"})
#: The longest key prefix: a name column holds 255 characters, and a key is at most 100.
MAX_PREFIX = 155


def _dialect_insert(dialect: str) -> Any:
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert
    return insert


def _statements(dialect: str, prefix: str) -> dict[str, Any]:
    """Every statement the store runs, built once per store (``prefix``: the store's key prefix)."""
    insert = _dialect_insert(dialect)
    c, v = counters_table.c, values_table.c
    live = or_(c.expires_at.is_(None), c.expires_at > bindparam("now"))
    expired = and_(c.expires_at.is_not(None), c.expires_at <= bindparam("now"))

    step = insert(counters_table).values(
        name=bindparam("name"), value=bindparam("delta", type_=BigInteger), expires_at=bindparam("expires_at")
    )
    step = step.on_conflict_do_update(
        index_elements=[c.name],
        set_={"value": _value_after_step(step, c, expired), "expires_at": step.excluded.expires_at},
        where=or_(expired, c.value.between(bindparam("lowest"), bindparam("highest"))),
    ).returning(c.value)

    replace = insert(counters_table).values(
        name=bindparam("name"), value=bindparam("value", type_=BigInteger), expires_at=bindparam("expires_at")
    )
    replace = replace.on_conflict_do_update(
        index_elements=[c.name],
        set_={"value": replace.excluded.value, "expires_at": replace.excluded.expires_at},
    )

    put_value = insert(values_table).values(
        key=bindparam("key"), data=bindparam("data"), expires_at=bindparam("expires_at")
    )
    put_value = put_value.on_conflict_do_update(
        index_elements=[v.key],
        set_={"data": put_value.excluded.data, "expires_at": put_value.excluded.expires_at},
    )
    value_live = or_(v.expires_at.is_(None), v.expires_at > bindparam("now"))
    return {
        "step": step,
        "read": select(c.value).where(c.name == bindparam("name"), live),
        "renew": update(counters_table)
        .where(c.name == bindparam("counter"), live)
        .values(expires_at=bindparam("new_expires_at"))
        .returning(c.value),
        "replace": replace,
        "delete": delete(counters_table).where(c.name == bindparam("name")).returning(c.expires_at),
        "names": select(c.name)
        .where(c.name.startswith(prefix, autoescape=True), live)
        .limit(bindparam("limit")),
        "sweep": delete(counters_table).where(c.expires_at.is_not(None), c.expires_at <= bindparam("now")),
        "get_value": select(v.data).where(v.key == bindparam("key"), v.data.is_not(None), value_live),
        "put_value": put_value,
        "delete_value": delete(values_table).where(v.key == bindparam("key")).returning(v.data, v.expires_at),
        "hold_value": insert(values_table)
        .values(key=bindparam("key"), data=null(), expires_at=null())
        .on_conflict_do_nothing(index_elements=[v.key]),
        "lock_value": select(v.data, v.expires_at).where(v.key == bindparam("key")).with_for_update(),
        "sweep_values": delete(values_table).where(
            v.expires_at.is_not(None), v.expires_at <= bindparam("now")
        ),
    }


def _value_after_step(step: Any, c: Any, expired: Any) -> Any:
    """An expired per-client row starts again from the step itself; any other row adds it."""
    return case((expired, step.excluded.value), else_=c.value + step.excluded.value)


class SocketDeadlines:
    """Shuts down the socket of a database call still running at its deadline (one daemon thread).

    ``watch(fd, seconds)`` before the call, ``done(token)`` after it; a call that ends in time costs a
    heap push and a flag.  The shutdown makes the driver's next read or write fail at once, whatever
    the server is doing; the connection is then discarded.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, list[Any]]] = []
        self._sequence = 0
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def watch(self, fd: int, seconds: float) -> list[Any]:
        token = [fd, True]  # [descriptor, still running]
        with self._condition:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._heap = []
                self._thread = threading.Thread(target=self._run, name="tally-sql-deadlines", daemon=True)
                self._thread.start()
            self._sequence += 1
            heapq.heappush(self._heap, (time.monotonic() + seconds, self._sequence, token))
            if self._heap[0][2] is token:
                self._condition.notify()
        return token

    @staticmethod
    def done(token: list[Any]) -> None:
        token[1] = False

    def _run(self) -> None:
        with self._condition:
            while True:
                while self._heap and not self._heap[0][2][1]:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._condition.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._condition.wait(wait)
                    continue
                _, _, token = heapq.heappop(self._heap)
                if token[1]:
                    _shut_down(token[0])


def _shut_down(fd: int) -> None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()  # the driver still owns the descriptor and closes it


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


class SqlCounterStore(CounterStore, SchemaSupport):
    """Atomic in the database: one ``INSERT ... ON CONFLICT ... RETURNING`` per step.

    SQLite: the processes of one host (WAL, a lock waited for up to ``timeout``); PostgreSQL: every
    host.  Every call returns or fails within ``timeout`` seconds (plus the time to shut a socket
    down); an unreachable or hung database raises ``StoreUnavailable``, never a guessed value, and the
    next call reconnects.  Counters never expire; per-client rows expire at ``expires_at`` and are swept at
    most every ``sweep_interval`` seconds.
    """

    backend = "sql"
    extra = "sql"
    multi_process = True

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], instance_path: str) -> SqlCounterStore:
        return cls(
            settings["SQLALCHEMY_DATABASE_URI"],
            key_prefix=settings["COUNTER_KEY_PREFIX"],
            timeout=settings["COUNTER_TIMEOUT"],
            pool_size=settings["COUNTER_POOL_SIZE"],
            fsync=settings["COUNTER_FSYNC"],
            sweep_interval=settings["COUNTER_SWEEP_INTERVAL"],
        )

    @classmethod
    def check_settings(
        cls, config: Mapping[str, Any], settings: Mapping[str, Any], instance_path: str
    ) -> dict[str, Any]:
        """``SQLALCHEMY_DATABASE_URI`` (Flask-SQLAlchemy's key; unset: ``tally.db`` in the instance
        folder)."""
        uri = config.get("SQLALCHEMY_DATABASE_URI") or DEFAULT_DATABASE_URI
        return {"SQLALCHEMY_DATABASE_URI": database_uri(uri, instance_path)}

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "tally:",
        timeout: float = 0.5,
        pool_size: int = 16,
        fsync: bool = False,
        sweep_interval: float = 300.0,
    ) -> None:
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        self.url = parsed.render_as_string(hide_password=True)
        self._where = (
            parsed.database or ""
            if self.dialect == "sqlite"
            else (f"{parsed.host or ''}:{parsed.port or ''}/{parsed.database or ''}")
        )
        if len(key_prefix) > MAX_PREFIX:
            raise ConfigError(f"COUNTER_KEY_PREFIX must be at most {MAX_PREFIX} characters for the sql store")
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.sweep_interval = sweep_interval
        self._next_sweep = 0.0
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._statements = _statements(self.dialect, key_prefix)
        self._deadlines = SocketDeadlines() if self.dialect == "postgresql" else None
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}
        if self.dialect == "sqlite":
            self._engine = self._sqlite_engine(parsed, pool_size, fsync)
        else:
            self._engine = self._postgresql_engine(parsed, pool_size)
        self._driver_error = self._engine.dialect.loaded_dbapi.Error
        # PostgreSQL: a step is a round trip, concurrent ones may share it (tally.combining).
        self.combines_adds = self.dialect == "postgresql"
        self._writer = threading.Lock()
        self._update_locks = KeyLocks()
        self._pid = os.getpid()

    def where(self) -> str:
        return self._where

    # -- engines -------------------------------------------------------------------------------------

    def _sqlite_engine(self, url: Any, pool_size: int, fsync: bool) -> Engine:
        if sqlite3.sqlite_version_info < SQLITE_MIN_VERSION:
            raise StoreUnavailable(
                f"SQLite {sqlite3.sqlite_version} has no RETURNING; Tally needs SQLite 3.35 or later"
                " (a newer Python, or pysqlite3)"
            )
        timeout_ms = max(1, int(self.timeout * 1000))
        engine = create_engine(
            url,
            isolation_level="AUTOCOMMIT",  # each statement commits; update_value says BEGIN IMMEDIATE
            pool_size=pool_size,
            max_overflow=0,
            pool_timeout=self.timeout,
            connect_args={"timeout": self.timeout, "check_same_thread": False},
        )

        @event.listens_for(engine, "connect")
        def configure(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.execute(f"PRAGMA busy_timeout={timeout_ms}")  # WAL may wait for a lock
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute(f"PRAGMA busy_timeout={BUSY_SLICE_MS}")  # then Tally retries
            dbapi_connection.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")

        return engine

    def _postgresql_engine(self, url: Any, pool_size: int) -> Engine:
        import psycopg

        timeout_ms = max(1, int(self.timeout * 1000))
        options = (
            f"-c statement_timeout={timeout_ms} -c lock_timeout={timeout_ms}"
            f" -c idle_in_transaction_session_timeout={max(1000, 4 * timeout_ms)}"
        )
        conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        timeout = self.timeout

        def connect() -> Any:
            """psycopg's connect, waited for at most ``timeout`` (libpq's connect_timeout is >= 2 s): a
            late connection is closed by the thread that made it."""
            outcome: dict[str, Any] = {}
            gave_up = threading.Event()

            def attempt() -> None:
                try:
                    connection = psycopg.connect(
                        conninfo, autocommit=True, connect_timeout=2, options=options
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
            pool_timeout=self.timeout,
        )

    # -- one call: a connection, a deadline, errors mapped --------------------------------------------

    @contextmanager
    def _sqlite_writer(self) -> Iterator[None]:
        """SQLite lets one connection write at a time, and its busy handler is not fair: under 32
        threads a waiter can sleep past its timeout while others keep winning.  The threads of one
        process therefore take turns here, so that SQLite arbitrates only between processes."""
        if not self._writer.acquire(timeout=self.timeout):
            raise StoreUnavailable(f"SQLite {self.url}: no turn to write within {self.timeout} s")
        try:
            yield
        finally:
            self._writer.release()

    @contextmanager
    def _connection(self, write: bool = False) -> Iterator[Connection]:
        if self._pid != os.getpid():
            # Forked: a connection made by the parent would be shared with it.
            self._engine.dispose(close=False)
            self._writer = threading.Lock()
            self._pid = os.getpid()
        if write and self.dialect == "sqlite":
            with self._sqlite_writer(), self._connection_with_deadline() as connection:
                yield connection
            return
        with self._connection_with_deadline() as connection:
            yield connection

    @contextmanager
    def _connection_with_deadline(self) -> Iterator[Connection]:
        try:
            with self._engine.connect() as connection:
                token = None
                if self._deadlines is not None:
                    token = self._deadlines.watch(
                        connection.connection.dbapi_connection.fileno(), self.timeout
                    )
                try:
                    yield connection
                except exc.DBAPIError:
                    connection.invalidate()  # a broken or shut-down connection is never reused
                    raise
                finally:
                    if token is not None:
                        self._deadlines.done(token)
        except exc.DBAPIError as error:
            if getattr(error.orig, "sqlstate", None) == "22003":
                raise Overflow(f"the result leaves the database's integer range: {error.orig}") from None
            raise StoreUnavailable(f"{self.dialect} database {self.url}: {_first_line(error)}") from error
        except exc.TimeoutError as error:
            raise StoreUnavailable(
                f"all connections of this process to {self.url} stayed busy for {self.timeout} s;"
                " raise COUNTER_POOL_SIZE to at least the gunicorn threads"
            ) from error
        except exc.SQLAlchemyError as error:  # a connection SQLAlchemy will not use again, and the like
            raise StoreUnavailable(f"{self.dialect} database {self.url}: {error}") from error

    @contextmanager
    def _cursor(self, write: bool) -> Iterator[Any]:
        """A driver cursor on a pooled connection, for one call: the fast path of every operation
        (SQLAlchemy compiled the statements once; running them through the driver saves most of a
        step's time).  On SQLite a writer takes its process's turn first; on PostgreSQL the call gets
        its socket deadline.  Driver errors become ``Overflow`` (SQLSTATE 22003) or
        ``StoreUnavailable``, and the connection is discarded."""
        if self._pid != os.getpid():
            self._engine.dispose(close=False)  # forked: the parent's connections stay the parent's
            self._writer = threading.Lock()
            self._pid = os.getpid()
        writer = self._writer if write and self.dialect == "sqlite" else None
        if writer is not None and not writer.acquire(timeout=self.timeout):
            raise StoreUnavailable(f"SQLite {self.url}: no turn to write within {self.timeout} s")
        try:
            try:
                raw = self._engine.raw_connection()
            except exc.TimeoutError as error:
                raise StoreUnavailable(
                    f"all connections of this process to {self.url} stayed busy for {self.timeout} s;"
                    " raise COUNTER_POOL_SIZE to at least the gunicorn threads"
                ) from error
            except exc.DBAPIError as error:
                raise StoreUnavailable(f"{self.dialect} database {self.url}: {_first_line(error)}") from error
            except self._driver_error as error:  # raw_connection() passes the driver's own errors on
                raise StoreUnavailable(f"{self.dialect} database {self.url}: {error}") from error
            token = None
            if self._deadlines is not None:
                token = self._deadlines.watch(raw.dbapi_connection.fileno(), self.timeout)
            try:
                yield raw.cursor()
            except self._driver_error as error:
                if getattr(error, "sqlstate", None) == "22003":
                    raise Overflow(f"the result leaves the database's integer range: {error}") from None
                raw.invalidate()  # broken, shut down at its deadline, or in an unknown state
                first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                raise StoreUnavailable(f"{self.dialect} database {self.url}: {first}") from error
            finally:
                if token is not None:
                    self._deadlines.done(token)
                raw.close()  # back to the pool (an invalidated one is closed)
        finally:
            if writer is not None:
                writer.release()

    def _sql(self, statement: str) -> tuple[str, tuple[str, ...] | None, dict[str, Any]]:
        """The driver's SQL text of a statement, for positional parameters their names in order, and
        the values of the parameters the statement fixes itself (a ``LIKE`` prefix, a NULL)."""
        found = self._compiled.get(statement)
        if found is None:
            compiled = self._statements[statement].compile(dialect=self._engine.dialect)
            positional = self._engine.dialect.positional
            fixed = {name: bind.value for name, bind in compiled.binds.items() if not bind.required}
            found = (compiled.string, tuple(compiled.positiontup or ()) if positional else None, fixed)
            self._compiled[statement] = found
        return found

    def _run(self, statement: str, /, **params: Any) -> list[Any]:
        """Run one of the store's statements (one autocommitted step) and return its rows."""
        self._ensure_schema()
        params["now"] = int(time.time())
        began = time.monotonic()
        with self._cursor(write=statement not in READS) as cursor:
            self._execute(cursor, began, statement, params)
            return cursor.fetchall() if cursor.description else []

    def _execute(
        self, cursor: Any, began: float, statement: str, params: dict[str, Any] | None = None
    ) -> None:
        """Run ``statement`` (a name, or SQL text without parameters); on SQLite, a statement refused
        for a busy database (it changed nothing) is tried again every few milliseconds until
        ``timeout`` after ``began``: SQLite's own busy handler sleeps up to 100 ms at a time, so
        waiters from several processes would miss their turn and time out under a load the database
        can carry."""
        if params is None:
            sql, args = statement, ()
        else:
            sql, order, fixed = self._sql(statement)
            if fixed:
                params = {**fixed, **params}
            args = params if order is None else tuple(params.get(name) for name in order)
        while True:
            try:
                cursor.execute(sql, args)
                return
            except sqlite3.OperationalError as error:
                busy = getattr(error, "sqlite_errorcode", None) in (SQLITE_BUSY, SQLITE_LOCKED)
                if not busy or time.monotonic() - began > self.timeout:
                    raise
                time.sleep(random.uniform(0, 0.002))

    def _ensure_schema(self) -> None:
        """The tables, created on first use (or ahead with ``flask counters init-db``)."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                self.create_schema()
                self._schema_ready = True

    def create_schema(self) -> None:
        """``CREATE TABLE`` for whichever tables are missing; safe to run from several processes at
        once (one that loses the race to create a table checks again and finds it)."""
        for attempt in range(3):
            try:
                with self._connection(write=True) as connection:
                    metadata.create_all(connection, checkfirst=True)
                return
            except StoreUnavailable as error:
                if attempt == 2 or not isinstance(error.__cause__, exc.DBAPIError):
                    raise

    # -- counters --------------------------------------------------------------------------------------

    def _expires_at(self, ttl: int | None) -> int | None:
        return int(time.time()) + ttl + 1 if ttl else None

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        lowest = INT64_MIN - delta if delta < 0 else INT64_MIN
        highest = INT64_MAX - delta if delta > 0 else INT64_MAX
        rows = self._run(
            "step",
            name=self.key_prefix + key,
            delta=delta,
            expires_at=self._expires_at(ttl),
            lowest=lowest,
            highest=highest,
        )
        if ttl:
            self._maybe_sweep()
        if not rows:
            raise Overflow(f"adding {delta} would leave the int64 range; the counter is unchanged")
        return int(rows[0][0])

    def get(self, key: str, ttl: int | None = None) -> int:
        if ttl:
            rows = self._run("renew", counter=self.key_prefix + key, new_expires_at=self._expires_at(ttl))
        else:
            rows = self._run("read", name=self.key_prefix + key)
        return int(rows[0][0]) if rows else 0

    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        self.check_range(value)
        self._run("replace", name=self.key_prefix + key, value=value, expires_at=self._expires_at(ttl))

    def delete(self, key: str) -> bool:
        rows = self._run("delete", name=self.key_prefix + key)
        return bool(rows) and (rows[0][0] is None or rows[0][0] > time.time())

    def names(self, limit: int) -> list[str]:
        rows = self._run("names", limit=limit)
        size = len(self.key_prefix)
        return [name[size:] for (name,) in rows if counter_name(name[size:])]

    def _maybe_sweep(self) -> None:
        """Delete expired per-client rows, at most every ``sweep_interval`` s per process."""
        now = time.monotonic()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.sweep_interval
        self._run("sweep")
        self._run("sweep_values")

    # -- shared values -------------------------------------------------------------------------------

    def get_value(self, key: str) -> bytes | None:
        rows = self._run("get_value", key=self.key_prefix + key)
        return bytes(rows[0][0]) if rows else None

    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        self._run("put_value", key=self.key_prefix + key, data=data, expires_at=self._expires_at(ttl))

    def delete_value(self, key: str) -> bool:
        rows = self._run("delete_value", key=self.key_prefix + key)
        return bool(rows) and rows[0][0] is not None and (rows[0][1] is None or rows[0][1] > time.time())

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        """One transaction holding the row (SQLite's write lock; PostgreSQL's row lock): ``change`` is
        called once, and no concurrent update is lost."""
        self._ensure_schema()
        begin = "BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN"
        # Threads of one process take turns on a key before they queue on its row lock.
        with self._update_locks(key):
            return self._update_value(key, change, ttl, begin)

    def _update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None, begin: str
    ) -> bytes:
        began = time.monotonic()
        params = {"key": self.key_prefix + key, "now": int(time.time())}
        with self._cursor(write=True) as cursor:
            self._execute(cursor, began, begin)
            try:
                self._execute(cursor, began, "hold_value", params)
                self._execute(cursor, began, "lock_value", params)
                data, expires_at = cursor.fetchone()
                live = data is not None and (expires_at is None or expires_at > params["now"])
                new = change(bytes(data) if live else None)
                stored = {**params, "data": new, "expires_at": self._expires_at(ttl)}
                self._execute(cursor, began, "put_value", stored)
                self._execute(cursor, began, "COMMIT")
            except BaseException:
                # A connection broken mid-transaction (its deadline passed) has nothing to roll back:
                # either way the first error is the one to raise.
                with suppress(self._driver_error):
                    cursor.execute("ROLLBACK")
                raise
        return new

    def health(self) -> dict[str, Any]:
        started = time.monotonic()
        with self._connection() as connection:
            connection.exec_driver_sql("SELECT 1")
            version = connection.dialect.server_version_info
        return {
            "database": self.url,
            "dialect": self.dialect,
            "server_version": ".".join(str(part) for part in version or ()),
            "ping_ms": round((time.monotonic() - started) * 1000, 3),
        }

    def close(self) -> None:
        self._engine.dispose()


def _first_line(error: exc.DBAPIError) -> str:
    return str(error.orig).strip().splitlines()[0] if error.orig is not None else str(error)
