"""What a PostgreSQL connection's own state says, without a round trip: whether the server closed it
while it sat idle in the pool, whether its server refuses writes now (a standby, a demoted primary),
its socket, whether the server warned during a call, and an error's first line."""

from __future__ import annotations

import select
import weakref
from typing import Any

from sqlalchemy.engine.interfaces import DBAPIConnection

#: PostgreSQL's read_only_sql_transaction: a write on a standby, or on a primary turned read-only.
READ_ONLY_SQLSTATE = "25006"


#: The WARNINGs each PostgreSQL connection received since they were last taken (``take_warnings``).
_WARNINGS: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()


def collect_warnings(dbapi_connection: Any) -> None:
    """Keep the WARNINGs the server sends on this connection.  The one that matters: a commit that
    waited for its synchronous standby and was cancelled (``pg_cancel_backend``, a cancel request)
    ends with "canceling wait for synchronous replication ... has already committed locally, but
    might not have been replicated", and then reports success."""
    seen: list[str] = []
    _WARNINGS[dbapi_connection] = seen

    def on_notice(diagnostic: Any) -> None:
        if diagnostic.severity_nonlocalized == "WARNING":
            seen.append(f"{diagnostic.sqlstate}: {diagnostic.message_primary}")

    dbapi_connection.add_notice_handler(on_notice)


def take_warnings(raw: Any) -> list[str]:
    """The WARNINGs received on this pooled connection since the last call, which are forgotten."""
    seen = _WARNINGS.get(raw.dbapi_connection)
    if not seen:
        return []
    taken = seen[:]
    seen.clear()
    return taken


def read_only(raw: Any) -> bool:
    """Whether the server of this connection now refuses writes: PostgreSQL 14 and later report
    ``in_hot_standby`` and ``default_transaction_read_only`` to the client as they change (the
    report reaches the client with the next answer, so a read is checked after it ran)."""
    info = raw.dbapi_connection.info
    return "on" in (
        info.parameter_status("in_hot_standby"),
        info.parameter_status("default_transaction_read_only"),
    )


def closed_by_server(raw: Any) -> bool:
    """Whether the server closed (or sent something on) this idle connection: a ``poll`` of its
    socket that does not wait (any descriptor number; the socket's own flags, which libpq owns, are
    left as they are)."""
    poller = select.poll()
    poller.register(fileno(raw.dbapi_connection), select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


def fileno(dbapi_connection: DBAPIConnection | None) -> int:
    """The socket of a checked-out connection, which always has its driver's connection."""
    assert dbapi_connection is not None
    return int(dbapi_connection.fileno())


def error_line(error: Exception) -> str:
    """The first line of a driver's error (of SQLAlchemy's wrapper: of the driver's error inside)."""
    error = getattr(error, "orig", None) or error
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
