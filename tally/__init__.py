"""Tally: shared counters for Flask that stay correct across threads, processes and hosts."""

from . import cli as _cli  # noqa: E402, F401 - init_app adds ``flask counters`` to every app
from .config import ConfigError
from .errors import (
    Conflict,
    CorruptCounter,
    CorruptValue,
    InvalidAmount,
    InvalidName,
    InvalidValue,
    NotOneProcess,
    NotSetUp,
    OutcomeUnknown,
    Overflow,
    ReplicationUnconfirmed,
    StoreRefused,
    StoreUnavailable,
    TallyError,
    ValueTooLarge,
)
from .extension import ClientCounters, Counters
from .values import SharedValues

try:  # with limits installed (the "limits" extra), importing tally registers the tally:// storage
    import limits as _limits  # noqa: F401
except ImportError:
    pass
else:
    from . import ratelimits as _ratelimits  # noqa: F401

__all__ = [
    "ClientCounters",
    "ConfigError",
    "Conflict",
    "CorruptCounter",
    "CorruptValue",
    "Counters",
    "InvalidAmount",
    "InvalidName",
    "InvalidValue",
    "NotOneProcess",
    "NotSetUp",
    "OutcomeUnknown",
    "Overflow",
    "ReplicationUnconfirmed",
    "SharedValues",
    "StoreRefused",
    "StoreUnavailable",
    "TallyError",
    "ValueTooLarge",
]
