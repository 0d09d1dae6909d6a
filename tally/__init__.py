"""Tally: shared counters for Flask that stay correct across threads, processes and hosts."""

from .errors import (
    Conflict,
    CorruptCounter,
    InvalidAmount,
    InvalidName,
    Overflow,
    StoreUnavailable,
    TallyError,
)
from .extension import ClientCounters, Counters

__all__ = [
    "ClientCounters",
    "Conflict",
    "CorruptCounter",
    "Counters",
    "InvalidAmount",
    "InvalidName",
    "Overflow",
    "StoreUnavailable",
    "TallyError",
]
