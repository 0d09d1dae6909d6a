"""The sql store's rows of ``make bench``: the helper's ``incr`` against the driver's own upsert, call by
call (sqlite3; psycopg), and four processes on one hot row (SQLite; PostgreSQL)."""

from __future__ import annotations

import sqlite3
import tempfile
from collections.abc import Callable

from tally.stores.sql import SqlCounterStore

RAW_UPSERT = (
    "INSERT INTO raw_counters (name, value) VALUES ({p}, 1)"
    " ON CONFLICT (name) DO UPDATE SET value = raw_counters.value + 1 RETURNING value"
)
RAW_TABLE = "CREATE TABLE IF NOT EXISTS raw_counters (name VARCHAR(255) PRIMARY KEY, value BIGINT NOT NULL)"


def _raw_sqlite(path: str) -> Callable[[], object]:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute(RAW_TABLE)
    statement = RAW_UPSERT.format(p="?")
    return lambda: connection.execute(statement, ("raw",)).fetchone()


def _raw_postgresql(conninfo: str) -> Callable[[], object]:
    import psycopg

    connection = psycopg.connect(conninfo, autocommit=True)
    connection.execute(RAW_TABLE)
    statement = RAW_UPSERT.format(p="%s")
    return lambda: connection.execute(statement, ("raw",)).fetchone()


def sql_rows(row, interleaved, four_processes, seconds: float, postgres=None, sqlite: bool = True) -> None:
    """Append the sql store's rows through ``row``; ``postgres`` is a running tests.servers.Postgres."""
    databases = []
    if sqlite:
        databases.append(("SQLite", f"sqlite:///{tempfile.mkdtemp(prefix='bench-sql-')}/tally.db", None))
    if postgres is not None:
        databases.append(("PostgreSQL", postgres.url, postgres.conninfo))
    for name, url, conninfo in databases:
        store = SqlCounterStore(url, key_prefix="bench:", timeout=5.0)
        raw = _raw_sqlite(url.removeprefix("sqlite:///")) if conninfo is None else _raw_postgresql(conninfo)
        driver = "sqlite3" if conninfo is None else "psycopg"
        helper_rate, raw_rate, ratio = interleaved(lambda store=store: store.add("c", 1), raw, seconds)
        row(f"sql ({name}) raw {driver} upsert (median call)", raw_rate, "ops/s")
        row(
            f"sql ({name}) helper incr (median call)",
            helper_rate,
            "ops/s",
            f"raw {driver} upsert, call by call",
            f"{ratio:.2f}x",
            ">= 0.90x",
        )
        row(
            f"sql ({name}) helper incr, 4 processes, one hot row",
            four_processes(
                lambda url=url: SqlCounterStore(url, key_prefix="bench4:", timeout=5.0, pool_size=1), seconds
            ),
            "ops/s (sum)",
        )
        store.close()
