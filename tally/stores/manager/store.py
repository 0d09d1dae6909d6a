"""``ManagerCounterStore``, the counter store on a manager: a per-process pool of connections (a
forked child starts a pool of its own), every call bounded by ``timeout`` with every failure a
``StoreUnavailable``, and ``update_value`` as compare-and-set on the table's versions, ``change``
running here and never in the manager.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable, Mapping
from multiprocessing import AuthenticationError
from typing import Any

from ... import metrics
from ...errors import Conflict, CorruptCounter, StoreUnavailable
from ..base import VALUE_RETRIES, CounterStore, KeyLocks, close_idle, forks, pause_after_conflict
from .protocol import _Connection
from .settings import manager_settings


class ManagerCounterStore(CounterStore):
    """Atomic across every process of the host connected to one manager: each step is one round trip
    to the manager, done under its lock.

    Every call finishes or fails within ``timeout`` seconds (waiting for a pooled connection, connecting
    and the exchange included; ``update_value``: each of its round trips): a manager that is down, hung
    or shutting down raises ``StoreUnavailable`` (the step may or may not have been applied: nothing is
    guessed), and the next call reconnects.  Values are lost with the manager unless it keeps a
    snapshot (``serve``); ``health`` flags a manager that started after this store was built.
    """

    backend = "manager"
    multi_process = True
    combines_adds = True  # a step is a round trip: concurrent ones may share it (tally.combining)
    optimistic_updates = True  # a version check in the manager

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], instance_path: str) -> ManagerCounterStore:
        return cls(
            settings["COUNTER_MANAGER_ADDRESS"],
            settings["COUNTER_MANAGER_AUTHKEY"],
            key_prefix=settings["COUNTER_KEY_PREFIX"],
            timeout=settings["COUNTER_TIMEOUT"],
            pool_size=settings["COUNTER_POOL_SIZE"],
        )

    @classmethod
    def check_settings(
        cls, config: Mapping[str, Any], settings: Mapping[str, Any], instance_path: str
    ) -> dict[str, Any]:
        return manager_settings(config, instance_path)

    def where(self) -> str:
        return self.address

    def __init__(
        self,
        address: str,
        authkey: bytes,
        *,
        key_prefix: str = "tally:",
        timeout: float = 0.5,
        pool_size: int = 16,
    ) -> None:
        self.address = address
        self.key_prefix = key_prefix  # apps sharing one manager keep apart, as on memcached and Redis
        self.timeout = timeout
        self._authkey = authkey
        self._pool_size = pool_size
        self._built_at = time.time()
        self._update_locks = KeyLocks()
        self._reset_pool()

    def _reset_pool(self) -> None:
        self._generation = forks()
        # Last in, first out: a few threads keep reusing the same few open connections, so the manager
        # serves no more connections (a thread each) than the threads that really call at once.
        self._free: queue.LifoQueue[_Connection] = queue.LifoQueue()
        for _ in range(self._pool_size):
            self._free.put(_Connection(self.address, self._authkey))

    def _call(self, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + self.timeout
        if self._generation != forks():
            self._reset_pool()
        try:
            connection = self._free.get(timeout=self.timeout)
        except queue.Empty:
            raise StoreUnavailable(
                f"all {self._pool_size} manager connections of this process stayed busy for"
                f" {self.timeout} s; raise COUNTER_POOL_SIZE to at least the threads per worker"
            ) from None
        try:
            return connection.call(method, args, deadline)
        except (TimeoutError, BlockingIOError):  # a wait ran out; or, past the deadline, nothing to read
            raise StoreUnavailable(
                f"counter manager {self.address} did not answer within {self.timeout} s"
            ) from None
        except AuthenticationError as error:  # the stdlib's challenge failed, one way or the other
            raise StoreUnavailable(
                f"counter manager {self.address}: authentication failed ({error}): the manager and"
                " the app must use the same COUNTER_MANAGER_AUTHKEY"
            ) from None
        except Exception as error:  # anything else that went wrong in the exchange: loud, never a guess
            detail = f"{type(error).__name__}: {error}"
            raise StoreUnavailable(f"counter manager {self.address}: {detail}") from None
        finally:
            self._free.put(connection)

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    def _counter(self, key: str, reply: Any) -> int:
        if type(reply) is not int:
            raise CorruptCounter(f"counter {key!r}: the manager answered {reply!r:.40}, not an integer")
        return reply

    # -- the contract ------------------------------------------------------------------------------

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        return self.check_range(self._counter(key, self._call("add", self._key(key), delta, ttl)))

    def get(self, key: str, ttl: int | None = None) -> int:
        return self._counter(key, self._call("get", self._key(key), ttl))

    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        self._call("set", self._key(key), self.check_range(value), ttl)

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", self._key(key)))

    def get_value(self, key: str) -> bytes | None:
        data: bytes | None = self._call("get_value", self._key(key))
        return data

    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        self._call("set_value", self._key(key), bytes(data), ttl)

    def delete_value(self, key: str) -> bool:
        return bool(self._call("delete_value", self._key(key)))

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        """Read the bytes and their version, run ``change`` here, and store the result only if the
        version is unchanged (compare-and-set in the manager), retried after a conflict."""
        with self._update_locks(key):
            for attempt in range(VALUE_RETRIES):
                current, version = self._call("read_value", self._key(key))
                data = bytes(change(current))
                if self._call("replace_value", self._key(key), version, data, ttl):
                    return data
                metrics.update_retried(self.backend)
                pause_after_conflict(attempt)
        raise Conflict(f"shared value {key!r} changed under {VALUE_RETRIES} attempts to update it")

    def names(self, limit: int) -> list[str]:
        """The live shared counters in the manager (at most ``limit``: a partial list when there are
        more), one round trip; ``StoreUnavailable`` as for every call."""
        return list(self._call("names", self.key_prefix, limit))

    def health(self) -> dict[str, Any]:
        report = {"address": self.address, **self._call("health")}
        if report["started"] > self._built_at + 1 and not report.get("snapshot"):
            report["restarted"] = True
            report["warning"] = (
                f"started {round(report['uptime'])} s ago, after this app, with no snapshot: the"
                " counters it held before were lost"
            )
        return report

    def close(self) -> None:
        """Close the idle connections; each reopens if used again."""
        close_idle(self._free)
