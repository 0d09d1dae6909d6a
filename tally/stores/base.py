"""The one interface every counter store implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from ..errors import Overflow

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


class CounterStore(ABC):
    """Named signed integers, each changed by one atomic step.

    Keys reaching a store are already validated (``tally.names``): at most 100 characters of
    ``A-Za-z0-9_.-@``, never starting with ``.``.  A key that starts with ``@`` is a per-client counter
    and is the only kind ever given a ``ttl``; every other key is stored without expiry and no
    housekeeping of the store ever removes it.
    """

    #: Short name shown by ``/healthz`` and the CLI.
    backend: ClassVar[str]
    #: Whether several processes (gunicorn workers) may share the store.
    multi_process: ClassVar[bool]
    #: The inclusive range of values the store can hold; leaving it raises ``Overflow``.
    min_value: ClassVar[int] = INT64_MIN
    max_value: ClassVar[int] = INT64_MAX

    @abstractmethod
    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        """Atomically add ``delta`` (may be negative) and return the new value; a missing key is 0.

        Concurrent calls are linearizable: N calls adding 1 to value v return v+1 ... v+N, each once.
        Raises ``Overflow`` (value unchanged) when the result leaves the range.  ``ttl`` (seconds)
        makes the key expire that long after this call.
        """

    @abstractmethod
    def get(self, key: str) -> int:
        """The current value, 0 when the key is missing or expired."""

    @abstractmethod
    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        """Replace the value as one atomic step."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the key; return whether it existed.  The next ``add`` starts again from 0."""

    @abstractmethod
    def health(self) -> dict[str, Any]:
        """Facts about the store for ``/healthz``; raises ``StoreUnavailable`` when unreachable."""

    def close(self) -> None:  # noqa: B027 - most stores have nothing to release
        """Release connections and descriptors (tests and app teardown)."""

    @classmethod
    def check_range(cls, value: int) -> int:
        if not cls.min_value <= value <= cls.max_value:
            raise Overflow(
                f"{value} is outside the {cls.backend} store's range"
                f" [{cls.min_value}, {cls.max_value}]; the counter is unchanged"
            )
        return value
