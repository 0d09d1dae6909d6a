"""``SqlCounterStore``: every call on a pooled connection of its engine, through the driver's cursor
with the statements SQLAlchemy compiled once, within ``timeout`` (SQLite's lock retried in short
slices, PostgreSQL's socket deadline), every driver error mapped to ``Overflow`` or
``StoreUnavailable``.
"""

from __future__ import annotations

import math
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

from sqlalchemy import exc
from sqlalchemy.engine import Connection, make_url

from ...errors import ConfigError, OutcomeUnknown, Overflow, StoreUnavailable
from ..base import (
    INT64_MAX,
    INT64_MIN,
    CounterStore,
    KeyLocks,
    SchemaSupport,
    WindowSupport,
    counter_name,
)
from ..deadlines import SocketDeadlines
from .connections import (
    READ_ONLY_SQLSTATE,
    closed_by_server,
    error_line,
    fileno,
    read_only,
    take_warnings,
)
from .engines import CALL_DEADLINE, DEFAULT_DATABASE_URI, database_uri, postgresql_engine, sqlite_engine
from .schema import MAX_PREFIX, READS, expiries_in_seconds, metadata, now_ms, statements

SQLITE_BUSY, SQLITE_LOCKED = 5, 6


class SqlCounterStore(CounterStore, SchemaSupport, WindowSupport):
    """Atomic in the database: one ``INSERT ... ON CONFLICT ... RETURNING`` per step.

    SQLite: the processes of one host (WAL, a lock waited for up to ``timeout``); PostgreSQL: every
    host.  Every call returns or fails within ``timeout`` seconds (plus the time to shut a socket
    down); an unreachable or hung database raises ``StoreUnavailable``, never a guessed value, and the
    next call reconnects.  Counters never expire; per-client rows expire at ``expires_at`` and are swept at
    most every ``sweep_interval`` seconds.
    """

    backend = "sql"
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
        hosts = parsed.query.get("host")  # libpq's multi-host form: ?host=a:5432&host=b:5432
        servers = (
            ",".join(hosts)
            if isinstance(hosts, tuple)
            else hosts or f"{parsed.host or ''}:{parsed.port or ''}"
        )
        self._where = (
            parsed.database or "" if self.dialect == "sqlite" else f"{servers}/{parsed.database or ''}"
        )
        if len(key_prefix) > MAX_PREFIX:
            raise ConfigError(f"COUNTER_KEY_PREFIX must be at most {MAX_PREFIX} characters for the sql store")
        self.key_prefix = key_prefix
        self.timeout = timeout
        self.sweep_interval = sweep_interval
        self._next_sweep = 0.0
        self._schema_ready = False
        self._schema_lock = threading.Lock()
        self._statements = statements(self.dialect, key_prefix)
        self._deadlines = SocketDeadlines() if self.dialect == "postgresql" else None
        self._sent = threading.local()  # this thread's statement in flight and whether in a transaction
        self._pool_size = pool_size
        self._compiled: dict[str, tuple[str, tuple[str, ...] | None, dict[str, Any]]] = {}
        if self.dialect == "sqlite":
            self._engine = sqlite_engine(parsed, pool_size, fsync, timeout)
        else:
            self._engine = postgresql_engine(parsed, pool_size, timeout)
        self._driver_error = self._engine.dialect.loaded_dbapi.Error
        # PostgreSQL: a step is a round trip, concurrent ones may share it (tally.combining).
        self.combines_adds = self.dialect == "postgresql"
        self._writer = threading.Lock()
        self._update_locks = KeyLocks()
        self._pid = os.getpid()

    def where(self) -> str:
        return self._where

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

    def _after_fork(self) -> None:
        if self._pid != os.getpid():  # forked: the parent's connections stay the parent's
            self._engine.dispose(close=False)
            self._writer = threading.Lock()
            self._pid = os.getpid()

    @contextmanager
    def _connection(self, write: bool = False) -> Iterator[Connection]:
        self._after_fork()
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
                    fd = fileno(connection.connection.dbapi_connection)
                    token = self._deadlines.watch(fd, self.timeout)
                try:
                    yield connection
                except exc.DBAPIError:
                    connection.invalidate()  # a broken or shut-down connection is never reused
                    raise
                finally:
                    if token is not None:
                        SocketDeadlines.done(token)
        except exc.DBAPIError as error:
            if getattr(error.orig, "sqlstate", None) == "22003":
                raise Overflow(f"the result leaves the database's integer range: {error.orig}") from None
            raise self._unavailable(error) from error
        except exc.TimeoutError as error:
            raise self._pool_busy() from error
        except exc.SQLAlchemyError as error:  # a connection SQLAlchemy will not use again, and the like
            raise self._unavailable(error) from error

    @contextmanager
    def _cursor(self, write: bool) -> Iterator[Any]:
        """A driver cursor on a pooled connection, for one call: the fast path of every operation
        (SQLAlchemy compiled the statements once; running them through the driver saves most of a
        step's time).  On SQLite a writer takes its process's turn first; on PostgreSQL the call gets
        its socket deadline.  Driver errors become ``Overflow`` (SQLSTATE 22003) or
        ``StoreUnavailable``, and the connection is discarded."""
        self._after_fork()
        writer = self._writer if write and self.dialect == "sqlite" else None
        if writer is not None and not writer.acquire(timeout=self.timeout):
            raise StoreUnavailable(f"SQLite {self.url}: no turn to write within {self.timeout} s")
        # One budget for the call: pool wait, connect and statement (each given all of it: 2x).
        ends_at = time.monotonic() + self.timeout
        CALL_DEADLINE.at = ends_at
        try:
            try:
                raw = self._engine.raw_connection()
            except exc.TimeoutError as error:
                raise self._pool_busy() from error
            except exc.DBAPIError as error:
                raise self._unavailable(error) from error
            except self._driver_error as error:  # raw_connection() passes the driver's own errors on
                raise self._unavailable(error) from error
            if self._deadlines is not None:
                raw = self._live(raw)
            CALL_DEADLINE.at = None
            self._sent.statement, self._sent.in_transaction = None, False  # set by _execute, _update_value
            token = None
            if self._deadlines is not None:
                left = ends_at - time.monotonic()
                if left <= 0:
                    raw.close()  # unused: back to the pool
                    raise StoreUnavailable(f"{self.dialect} database {self.url}: no connection in time")
                take_warnings(raw)  # what an earlier call left is not this call's
                token = self._deadlines.watch(fileno(raw.dbapi_connection), left)
            try:
                yield raw.cursor()
                if write and self._deadlines is not None and (warnings := take_warnings(raw)):
                    # A cancelled wait for the synchronous standby reports success after a WARNING:
                    # committed on the primary, perhaps on no standby.  Never a number.
                    raise OutcomeUnknown(
                        f"{self.dialect} database {self.url}: the server warned during a write"
                        f" ({warnings[0]}): it committed locally but may not have been replicated"
                    )
                if not write and self._deadlines is not None and read_only(raw):
                    # A read answered by a server that is read-only now (demoted, or a standby): it
                    # may be stale.  (A write there fails by itself, with READ_ONLY_SQLSTATE.)
                    raw.invalidate()
                    self._engine.dispose()  # every pooled connection to it goes; libpq finds the new primary
                    raise StoreUnavailable(
                        f"{self.dialect} database {self.url}: the server is read-only now (a standby, or"
                        " demoted); its answer was not used"
                    )
            except self._driver_error as error:
                if getattr(error, "sqlstate", None) == "22003":
                    raise Overflow(f"the result leaves the database's integer range: {error}") from None
                if getattr(error, "sqlstate", None) == READ_ONLY_SQLSTATE:
                    self._engine.dispose()  # the same server for every pooled connection: reconnect all
                raw.invalidate()  # broken, shut down at its deadline, or in an unknown state
                if write and self._deadlines is not None and self._outcome_unknown(error):
                    raise OutcomeUnknown(
                        f"{self.dialect} database {self.url}: the connection broke while a write ran"
                        f" ({error_line(error)}): it may or may not have been applied"
                    ) from error
                raise self._unavailable(error) from error
            finally:
                if token is not None:
                    SocketDeadlines.done(token)
                raw.close()  # back to the pool (an invalidated one is closed)
        finally:
            CALL_DEADLINE.at = None
            if writer is not None:
                writer.release()

    def _unavailable(self, error: Exception) -> StoreUnavailable:
        return StoreUnavailable(f"{self.dialect} database {self.url}: {error_line(error)}")

    def _pool_busy(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"all connections of this process to {self.url} stayed busy for {self.timeout} s;"
            " raise COUNTER_POOL_SIZE to at least the gunicorn threads"
        )

    def _outcome_unknown(self, error: Exception) -> bool:
        """Whether a failed write may have been applied: the server gave no answer (no SQLSTATE: the
        connection broke, or was shut at its deadline) to an autocommitted write, or to the COMMIT of
        a transaction.  A statement inside a transaction that did not reach its COMMIT changed
        nothing, and an answer with a SQLSTATE (a timeout, a refusal) is a known failure."""
        if getattr(error, "sqlstate", None) is not None:
            return False
        statement = getattr(self._sent, "statement", None)
        if getattr(self._sent, "in_transaction", False):
            return statement == "COMMIT"
        return statement is not None and statement not in READS

    def _live(self, raw: Any) -> Any:
        """``raw``, or, when PostgreSQL closed it while it sat idle in the pool (a restart, a
        failover, an idle timeout), a fresh connection in its place: one non-blocking peek at its
        socket, since an idle PostgreSQL connection has nothing to read unless the server ended it.
        Without it, every pooled connection would answer one 503 after the database came back."""
        for _ in range(self._pool_size + 1):
            if not closed_by_server(raw):
                return raw
            raw.invalidate()
            raw.close()
            try:
                raw = self._engine.raw_connection()
            except (exc.DBAPIError, exc.TimeoutError, self._driver_error) as error:
                raise self._unavailable(error) from error
        return raw

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
        params["now"] = now_ms()
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
        args: dict[str, Any] | tuple[Any, ...]
        self._sent.statement = statement  # what a lost answer was the answer to (_outcome_unknown)
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
        """``CREATE TABLE`` for whichever tables are missing, and expiries a version before this one
        wrote in seconds turned into milliseconds; safe to run from several processes at once (one
        that loses the race to create a table checks again and finds it)."""
        for attempt in range(3):
            try:
                with self._connection(write=True) as connection:
                    metadata.create_all(connection, checkfirst=True)
                    for find, convert in expiries_in_seconds():
                        if connection.execute(find).first() is not None:
                            connection.execute(convert)
                return
            except StoreUnavailable as error:
                if attempt == 2 or not isinstance(error.__cause__, exc.DBAPIError):
                    raise

    # -- counters --------------------------------------------------------------------------------------

    @staticmethod
    def _expires_at(ttl: float | None) -> int | None:
        """The ``expires_at`` of a row that must live at least ``ttl`` seconds: unix milliseconds."""
        return math.ceil((time.time() + ttl) * 1000) if ttl else None

    def _step(self, statement: str, key: str, delta: int, expires_at: int | None) -> list[Any]:
        """Run a counter step (``step`` or ``window_step``) and return its one row: the bounds are
        computed here so that the sum is never formed when it would leave int64; no row back is an
        ``Overflow``, the value unchanged.  A step with a lifetime may start a sweep."""
        rows = self._run(
            statement,
            name=self.key_prefix + key,
            delta=delta,
            expires_at=expires_at,
            lowest=INT64_MIN - delta if delta < 0 else INT64_MIN,
            highest=INT64_MAX - delta if delta > 0 else INT64_MAX,
        )
        if expires_at is not None:
            self._maybe_sweep()
        if not rows:
            raise Overflow(f"adding {delta} would leave the int64 range; the counter is unchanged")
        return list(rows[0])

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        return int(self._step("step", key, delta, self._expires_at(ttl))[0])

    def add_in_window(self, key: str, delta: int, window: float) -> tuple[int, float]:
        """One upsert, as ``add``: a live row keeps its ``expires_at`` (the window's end, to the
        millisecond)."""
        value, ends = self._step("window_step", key, delta, self._expires_at(window))
        return int(value), ends / 1000

    def read_window(self, key: str) -> tuple[int, float] | None:
        rows = self._run("window_read", name=self.key_prefix + key)
        return (int(rows[0][0]), rows[0][1] / 1000) if rows else None

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
        return bool(rows) and (rows[0][0] is None or rows[0][0] > now_ms())

    def names(self, limit: int) -> list[str]:
        return [name for name, _ in self.counts(limit)]

    def counts(self, limit: int) -> list[tuple[str, int]]:
        """``names`` and values in one ``SELECT`` (one snapshot of the table)."""
        size = len(self.key_prefix)
        rows = self._run("counts", limit=limit)
        return [(name[size:], int(value)) for name, value in rows if counter_name(name[size:])]

    def _maybe_sweep(self) -> None:
        """Delete expired per-client rows and expired shared values (limits' keys, sessions), at most
        every ``sweep_interval`` s per process."""
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
        if ttl:
            self._maybe_sweep()

    def delete_value(self, key: str) -> bool:
        rows = self._run("delete_value", key=self.key_prefix + key)
        return bool(rows) and rows[0][0] is not None and (rows[0][1] is None or rows[0][1] > now_ms())

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        """One transaction holding the row (SQLite's write lock; PostgreSQL's row lock): ``change`` is
        called once, and no concurrent update is lost."""
        self._ensure_schema()
        begin = "BEGIN IMMEDIATE" if self.dialect == "sqlite" else "BEGIN"
        # Threads of one process take turns on a key before they queue on its row lock.
        with self._update_locks(key):
            data = self._update_value(key, change, ttl, begin)
        if ttl:
            self._maybe_sweep()
        return data

    def _update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None, begin: str
    ) -> bytes:
        began = time.monotonic()
        params = {"key": self.key_prefix + key, "now": now_ms()}
        with self._cursor(write=True) as cursor:
            self._sent.in_transaction = True
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
