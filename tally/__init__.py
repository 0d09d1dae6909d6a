"""Tally: shared counters for Flask that stay correct across threads, processes and hosts."""

from .config import ConfigError
from .errors import (
    Conflict,
    CorruptCounter,
    CorruptValue,
    InvalidAmount,
    InvalidName,
    InvalidValue,
    NotOneProcess,
    Overflow,
    ReplicationUnconfirmed,
    StoreUnavailable,
    TallyError,
    ValueTooLarge,
)
from .extension import ClientCounters, Counters
from .values import SharedValues

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
    "Overflow",
    "ReplicationUnconfirmed",
    "SharedValues",
    "StoreUnavailable",
    "TallyError",
    "ValueTooLarge",
]
