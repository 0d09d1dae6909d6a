"""Tally's own exceptions: every failure of a counter operation is one of these, never a ``None``."""

from __future__ import annotations


class TallyError(Exception):
    """Base of every error a counter operation raises. ``status`` is the HTTP status it maps to."""

    status = 500
    code = "tally_error"


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


class ReplicationUnconfirmed(StoreUnavailable):
    """The step reached the primary but fewer replicas than ``COUNTER_MIN_REPLICAS`` confirmed it in
    time: it may survive a failover or be lost with the primary, so its result is never returned."""

    code = "outcome_unknown"


class NotOneProcess(TallyError):
    """The in-process memory store is used by a process that cannot be the only one counting (a fork
    of the process that built it, or one of several processes of the app); nothing was read or
    written."""

    status = 500
    code = "store_not_shared"


class CorruptCounter(TallyError):
    """The stored record of a counter cannot be read as a valid value; it is reported, never read as 0."""

    status = 500
    code = "corrupt_counter"


class CorruptValue(TallyError):
    """The stored bytes of a shared value are damaged or not JSON; reported, never read as missing."""

    status = 500
    code = "corrupt_value"


class InvalidValue(TallyError, ValueError):
    """A shared value that JSON cannot represent; nothing was written."""

    status = 400
    code = "invalid_value"


class ValueTooLarge(TallyError, ValueError):
    """A shared value whose encoding exceeds VALUE_MAX_BYTES; nothing was written."""

    status = 413
    code = "value_too_large"
