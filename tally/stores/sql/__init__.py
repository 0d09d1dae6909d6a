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

The package's modules: ``schema`` (the tables and the statements), ``engines`` (the database URL and
one engine per dialect), ``deadlines`` (the client-side socket deadlines), ``connections`` (a
connection's own state: closed while idle, its server read-only now) and ``store``
(``SqlCounterStore``).  Every name callers use is importable from the package itself; importing it
registers the store.
"""

from __future__ import annotations

from ..deadlines import SocketDeadlines
from .engines import BUSY_SLICE_MS, DEFAULT_DATABASE_URI, SQLITE_MIN_VERSION, database_uri
from .schema import MAX_PREFIX, READS, counters_table, metadata, values_table
from .store import SqlCounterStore

__all__ = [
    "BUSY_SLICE_MS",
    "DEFAULT_DATABASE_URI",
    "MAX_PREFIX",
    "READS",
    "SQLITE_MIN_VERSION",
    "SocketDeadlines",
    "SqlCounterStore",
    "counters_table",
    "database_uri",
    "metadata",
    "values_table",
]
