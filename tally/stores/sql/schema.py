"""The sql store's two tables (``metadata``, for ``create_all`` or an app's migrations) and every
statement the store runs, built once per store for its dialect and key prefix: the counter step as one
``INSERT ... ON CONFLICT ... RETURNING`` that never forms a sum outside int64, reads that skip expired
per-client rows, the sweeps, and the shared values' row lock.
"""

from __future__ import annotations

import time
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
    delete,
    null,
    or_,
    select,
    update,
)

#: The schema, for ``metadata.create_all`` or an app's own migrations (Alembic: include ``metadata``).
metadata = MetaData()

counters_table = Table(
    "tally_counters",
    metadata,
    Column("name", String(255), primary_key=True),  # a counter name, or "@<client id>.<name>"
    Column("value", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=True),  # unix milliseconds; NULL: never (shared counters)
    Index("tally_counters_expires_at", "expires_at"),
)

values_table = Table(
    "tally_values",
    metadata,
    Column("key", String(255), primary_key=True),
    Column("data", LargeBinary, nullable=True),  # NULL: a row made only to be locked; reads as missing
    Column("expires_at", BigInteger, nullable=True),
)

#: ``expires_at`` held unix seconds before it held milliseconds: no time in milliseconds since 1973
#: is below this, and no time in seconds before the year 5138 reaches it.
SECONDS_BELOW = 10**11


def now_ms() -> int:
    """Now, in the unit of every ``expires_at``: unix milliseconds."""
    return int(time.time() * 1000)


def expiries_in_seconds() -> list[tuple[Any, Any]]:
    """For each table, a query that finds a row whose expiry was written in seconds, and the update
    that turns such expiries into milliseconds.  A row already in milliseconds is left alone, so the
    update may run any number of times, from several processes; the query only reads, so that a
    store that finds nothing to convert (every start but the first after an upgrade) takes no lock
    that writers wait for."""
    return [
        (
            select(table.c.expires_at).where(table.c.expires_at < SECONDS_BELOW).limit(1),
            update(table)
            .where(table.c.expires_at < SECONDS_BELOW)
            .values(expires_at=table.c.expires_at * 1000),
        )
        for table in (counters_table, values_table)
    ]


#: The statements that only read (every other one takes SQLite's write lock).
READS = frozenset({"read", "counts", "get_value", "window_read"})
#: The longest key prefix: a name column holds 255 characters, and a key is at most 100.
MAX_PREFIX = 155


def _dialect_insert(dialect: str) -> Any:
    """The dialect's ``insert``, which has ``on_conflict_do_update`` (SQLite's and PostgreSQL's differ
    in type, not in how the statements use them)."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert
    from sqlalchemy.dialects.postgresql import insert as postgresql_insert

    return postgresql_insert


def statements(dialect: str, prefix: str) -> dict[str, Any]:
    """Every statement the store runs, built once per store (``prefix``: the store's key prefix)."""
    insert = _dialect_insert(dialect)
    c, v = counters_table.c, values_table.c
    live = or_(c.expires_at.is_(None), c.expires_at > bindparam("now"))
    expired = and_(c.expires_at.is_not(None), c.expires_at <= bindparam("now"))

    step = _counter_step(insert, c, expired, keep_end=False).returning(c.value)
    # A fixed window (tally.ratelimits): as "step", but a live row keeps its end; an ended one starts
    # again from the step, in a new window.
    window_step = _counter_step(insert, c, expired, keep_end=True).returning(c.value, c.expires_at)

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
        "window_step": window_step,
        "window_read": select(c.value, c.expires_at).where(
            c.name == bindparam("name"), c.expires_at.is_not(None), c.expires_at > bindparam("now")
        ),
        "read": select(c.value).where(c.name == bindparam("name"), live),
        "renew": update(counters_table)
        .where(c.name == bindparam("counter"), live)
        .values(expires_at=bindparam("new_expires_at"))
        .returning(c.value),
        "replace": replace,
        "delete": delete(counters_table).where(c.name == bindparam("name")).returning(c.expires_at),
        "counts": select(c.name, c.value)
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


def _counter_step(insert: Any, c: Any, expired: Any, keep_end: bool) -> Any:
    """The upsert of one counter step: add ``delta`` (an expired row starts again from it) unless the
    sum would leave ``lowest`` .. ``highest``; ``expires_at`` is the step's, or with ``keep_end`` a
    live row's own."""
    step = insert(counters_table).values(
        name=bindparam("name"), value=bindparam("delta", type_=BigInteger), expires_at=bindparam("expires_at")
    )
    new_end = step.excluded.expires_at
    return step.on_conflict_do_update(
        index_elements=[c.name],
        set_={
            "value": _value_after_step(step, c, expired),
            "expires_at": case((expired, new_end), else_=c.expires_at) if keep_end else new_end,
        },
        where=or_(expired, c.value.between(bindparam("lowest"), bindparam("highest"))),
    )


def _value_after_step(step: Any, c: Any, expired: Any) -> Any:
    """An expired per-client row starts again from the step itself; any other row adds it."""
    return case((expired, step.excluded.value), else_=c.value + step.excluded.value)
