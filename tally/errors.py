"""Tally's own exceptions: every failure of a counter operation is one of these, never a ``None``.

The bottom layer of the library: this module imports nothing else from Tally."""

from __future__ import annotations

from typing import ClassVar


class TallyError(Exception):
    """Base of every error a counter operation raises. ``status`` is the HTTP status it maps to.

    The message is for the operator's log.  What an HTTP client may be told is ``public_detail()``:
    the message itself for errors that only describe the caller's own input (a name, an amount, a
    value), and a fixed sentence for errors of the store, whose messages name servers, ports, paths,
    users and database URLs.
    """

    status = 500
    code = "tally_error"
    #: The detail every client is given, when the message must stay in the log; ``None``: the message.
    public_message: ClassVar[str | None] = None

    def public_detail(self) -> str:
        """What an HTTP response may say of this error: never an address, a path or a URL."""
        return self.public_message if self.public_message is not None else str(self)


class InvalidName(TallyError, ValueError):
    """A counter name outside ``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``; nothing was read or written."""

    status = 400
    code = "invalid_name"


class InvalidAmount(TallyError, ValueError):
    """An amount or value that is not an int in the allowed range; nothing was written."""

    status = 400
    code = "invalid_amount"


class Overflow(TallyError):
    """The result would leave the store's signed range; the stored value is unchanged."""

    status = 409
    code = "overflow"


class Conflict(TallyError):
    """An optimistic update lost its race more times than the retry bound allows; nothing was written."""

    status = 409
    code = "conflict"


class StoreUnavailable(TallyError):
    """The store could not be reached or did not answer in time; the outcome is not guessed."""

    status = 503
    code = "store_unavailable"
    public_message = (
        "the counter store could not be reached or did not answer in time; no value was guessed: retry later"
    )


class StoreRefused(TallyError):
    """The store answered, but refused to keep the data: an item over memcached's size limit, a
    server out of memory, a full disk.  The store is up (this is no outage: service does not wait
    for it to come back), nothing was written, and the same request fails again until the data or
    the store's settings change."""

    status = 507
    code = "store_refused"
    public_message = "the counter store is up but refused to keep this data; nothing was written"


class OutcomeUnknown(StoreUnavailable):
    """A write was sent, but its answer never came back (the connection broke, or the deadline
    passed while it ran): it may or may not have been applied.  Its result is never guessed, and it
    is never sent again."""

    code = "outcome_unknown"
    public_message = (
        "the step was sent to the store but its answer was lost: its outcome is unknown;"
        " read the value before trying again"
    )


class ReplicationUnconfirmed(OutcomeUnknown):
    """The step reached the primary but fewer replicas than ``COUNTER_MIN_REPLICAS`` confirmed it in
    time: it may survive a failover or be lost with the primary, so its result is never returned."""

    code = "outcome_unknown"
    public_message = (
        "the step reached the store, but too few replicas confirmed it in time: its"
        " outcome is unknown; read the value before trying again"
    )


class NotOneProcess(TallyError):
    """The in-process memory store is used by a process that cannot be the only one counting (a fork
    of the process that built it, or one of several processes of the app); nothing was read or
    written."""

    status = 500
    code = "store_not_shared"
    public_message = (
        "this server keeps counters in one process's memory but runs as several"
        " processes; its operator must configure a shared store"
    )


class CorruptCounter(TallyError):
    """The stored record of a counter cannot be read as a valid value; it is reported, never read as 0."""

    status = 500
    code = "corrupt_counter"
    public_message = "the stored record of this counter is damaged; it was reported, never read as 0"


class CorruptValue(TallyError):
    """The stored bytes of a shared value are damaged or not JSON; reported, never read as missing."""

    status = 500
    code = "corrupt_value"
    public_message = (
        "the stored bytes of this shared value are damaged; they were reported, never read as missing"
    )


class InvalidValue(TallyError, ValueError):
    """A shared value that JSON cannot represent; nothing was written."""

    status = 400
    code = "invalid_value"


class ValueTooLarge(TallyError, ValueError):
    """A shared value whose encoding exceeds VALUE_MAX_BYTES; nothing was written."""

    status = 413
    code = "value_too_large"


class NotSetUp(RuntimeError):
    """A ``Counters`` or ``SharedValues`` used in an app whose factory never called its ``init_app``:
    a programming error, raised before anything is read or written."""


class ConfigError(ValueError):
    """A setting has the wrong type or value, or names a store that cannot be used here; raised at
    ``init_app`` (start-up), never at the first request.  The message names the key and what it
    expects."""
