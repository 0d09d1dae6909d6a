"""The one interface every counter store implements, the abilities a store may declare, and the
registry every list of stores comes from.

A store is a ``CounterStore`` subclass that sets ``backend`` (its name); defining the class registers
it.  It declares, as class attributes and mixins, everything the rest of Tally needs to know about it:
the Flask-Caching backends it follows (``cache_types``), how it is built from settings
(``from_settings``, like Flask-Caching's ``factory``), and its abilities (``multi_process``,
``combines_adds``, ``optimistic_updates``, ``waits_for_replicas``, ``SessionStorage``,
``SchemaSupport``, ``ForkAdoption``).  Nothing outside a store's own module branches on which store it
is, and nothing probes a store with ``getattr``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import random
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar

from ..errors import CorruptCounter, InvalidName, Overflow
from ..names import validate_name

log = logging.getLogger(__name__)

#: How many times this process's line of descent has forked.  A client keeps the value it was made
#: under and starts again (new sockets, a new watcher thread) when ``forks()`` differs: whatever a
#: parent opened stays the parent's (a socket shared with it would hand each process the other's
#: replies).
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


def forks() -> int:
    """The number of forks between the first process and this one (0 in the first)."""
    return _forks


INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
#: How many times an optimistic update (memcached cas, Redis compare-and-set) is tried before ``Conflict``.
VALUE_RETRIES = 100


class KeyLocks:
    """Striped thread locks by key: threads of one process take turns updating a key, so that the
    optimistic stores' retries only ever race other processes, not a crowd of their own threads."""

    def __init__(self, stripes: int = 64) -> None:
        self._locks = [threading.Lock() for _ in range(stripes)]

    def __call__(self, key: str) -> threading.Lock:
        return self._locks[hash(key) % len(self._locks)]


class _Closable(Protocol):
    def close(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)


def close_idle(free: queue.Queue[_C] | queue.SimpleQueue[_C]) -> None:
    """Close every connection waiting in the pool queue ``free`` and put it back: each reopens when
    it is next used, so a pool can be closed while threads still hold (and later return) the rest."""
    idle = []
    while True:
        try:
            idle.append(free.get_nowait())
        except queue.Empty:
            break
    for connection in idle:
        connection.close()
        free.put(connection)


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether a connection to a server that never speaks first (memcached, the manager) has been
    closed or reset by it while idle: anything to read means end of stream or an error.

    One non-blocking peek, which works for every descriptor number (``select.select`` raises
    ``ValueError`` past 1023, where a busy worker's sockets live) and never waits under gevent.  The
    socket's own timeout is put back afterwards.
    """
    timeout = sock.gettimeout()
    try:
        sock.settimeout(0.0)
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return False  # nothing to read: open and idle
    except OSError:
        return True
    finally:
        with contextlib.suppress(OSError):  # closed meanwhile: nothing to restore
            sock.settimeout(timeout)
    return True


def pause_after_conflict(attempt: int) -> None:
    """A short random wait after a lost optimistic update, so that contenders stop colliding in step
    (at most 20 ms; 100 attempts take well under two seconds)."""
    time.sleep(random.uniform(0, min(0.0005 * (attempt + 1), 0.02)))


def counter_name(text: str) -> str | None:
    """``text`` if it passes ``validate_name`` (a shared counter's name), else ``None``: per-client
    keys (``@...``), shared values' keys (``=...``) and files that are no counter never do."""
    try:
        return validate_name(text)
    except InvalidName:
        return None


#: Every store class by its name (``backend``), in the order their modules were imported.
REGISTRY: dict[str, type[CounterStore]] = {}


class CounterStore(ABC):
    """Named signed integers, each changed by one atomic step; and shared values (bytes), each
    replaced or updated by one atomic step.

    Keys reaching a store are already validated (``tally.names``): at most 100 characters of
    ``A-Za-z0-9_.-@``, never starting with ``.``.  A key that starts with ``@`` is a per-client counter
    and is the only kind ever given a ``ttl``; every other key is stored without expiry and no
    housekeeping of the store ever removes it.
    """

    #: The store's name: its key in ``REGISTRY``, the value of ``COUNTER_STORE`` that selects it (for
    #: a store that follows no Flask-Caching backend), and what ``/healthz``, logs and the CLI show.
    backend: ClassVar[str]
    #: The Flask-Caching backends (class names, e.g. ``"RedisCache"``) whose ``CACHE_TYPE`` selects
    #: this store while ``COUNTER_STORE`` is unset.  Empty: only ``COUNTER_STORE = backend`` does.
    cache_types: ClassVar[tuple[str, ...]] = ()
    #: Whether several processes (gunicorn workers) may share the store.
    multi_process: ClassVar[bool]
    #: Whether concurrent ``add`` calls on one key pay for sharing one step (``tally.combining``): true
    #: where a step is a network round trip.  (An instance may decide from its settings.)
    combines_adds: bool = False
    #: Whether ``update_value`` is optimistic: it reads, computes and writes only if nothing changed,
    #: calling ``change`` again after a conflict (``Conflict`` after ``VALUE_RETRIES``).  False: the
    #: value is held under a lock while ``change`` runs, so it runs once and never conflicts.
    optimistic_updates: ClassVar[bool] = False
    #: Whether the store can wait for replicas to confirm each write (``COUNTER_MIN_REPLICAS``).
    waits_for_replicas: ClassVar[bool] = False
    #: Whether counters share a keyspace with the page cache on the same servers, kept apart only by
    #: ``COUNTER_KEY_PREFIX`` (which then must not overlap ``CACHE_KEY_PREFIX``).
    shares_cache_keyspace: ClassVar[bool] = False
    #: The inclusive range of values the store can hold; leaving it raises ``Overflow``.
    min_value: ClassVar[int] = INT64_MIN
    max_value: ClassVar[int] = INT64_MAX
    #: What the store prepends to every key on a server shared with others ("" where it has none).
    key_prefix: str = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("backend")
        if name is None:
            return  # a base for other stores, not a store of its own
        if name in REGISTRY and REGISTRY[name].__qualname__ != cls.__qualname__:
            raise TypeError(f"two stores are named {name!r}: {REGISTRY[name]!r} and {cls!r}")
        REGISTRY[name] = cls

    @classmethod
    @abstractmethod
    def from_settings(cls, settings: Mapping[str, Any], instance_path: str) -> CounterStore:
        """The store the checked ``settings`` describe (``tally.config.store_settings``)."""

    @classmethod
    def check_settings(
        cls, config: Mapping[str, Any], settings: Mapping[str, Any], instance_path: str
    ) -> dict[str, Any]:
        """This store's own keys, resolved and checked at ``init_app`` (``config``: the app's config;
        ``settings``: what is resolved so far); returned to be merged into ``settings``.  Raises
        ``ConfigError`` naming the key."""
        return {}

    def where(self) -> str:
        """Where the store keeps its data (servers, socket, database host or file, directory), for
        log lines, ``/healthz`` with a token and cache scopes: never a password."""
        return ""

    @abstractmethod
    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        """Atomically add ``delta`` (may be negative) and return the new value; a missing key is 0.

        Concurrent calls are linearizable: N calls adding 1 to value v return v+1 ... v+N, each once.
        Raises ``Overflow`` (value unchanged) when the result leaves the range.  ``ttl`` (seconds)
        makes the key expire that long after this call.
        """

    @abstractmethod
    def get(self, key: str, ttl: int | None = None) -> int:
        """The current value, 0 when the key is missing or expired.  With ``ttl`` a live key's
        lifetime is renewed: it now expires ``ttl`` seconds after this read (a missing key stays
        missing)."""

    @abstractmethod
    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        """Replace the value as one atomic step."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the key; return whether it existed.  The next ``add`` starts again from 0."""

    # -- shared values: opaque bytes, in a namespace of their own ------------------------------------

    @abstractmethod
    def get_value(self, key: str) -> bytes | None:
        """The stored bytes of shared value ``key``, ``None`` when missing or expired."""

    @abstractmethod
    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        """Replace shared value ``key`` as one atomic step (readers see the old or the new bytes)."""

    @abstractmethod
    def delete_value(self, key: str) -> bool:
        """Remove shared value ``key``; return whether it existed."""

    @abstractmethod
    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        """Replace the bytes of ``key`` by ``change(current)`` as one atomic step; return them.

        No concurrent update is lost.  ``change`` may be called more than once (optimistic stores
        retry it after a conflict) and must not have side effects; after ``VALUE_RETRIES`` conflicts
        ``Conflict`` is raised and nothing is written.
        """

    @abstractmethod
    def names(self, limit: int) -> list[str]:
        """The names of the shared counters that exist now, at most ``limit`` of them, in no order.

        Only shared counters: never per-client keys (``@...``), never shared values; every name passes
        ``tally.names.validate_name``.  Enumeration stops once ``limit`` names are found, so with
        ``limit`` names the list may be partial (which ones are left out is arbitrary).  A counter
        written or deleted while the enumeration runs may or may not be listed.  Raises
        ``StoreUnavailable`` when the store cannot be reached or does not answer in time, like every
        other call; a list is never guessed.
        """

    def counts(self, limit: int) -> list[tuple[str, int]]:
        """``(name, value)`` of the shared counters that exist now, at most ``limit`` of them, with
        the promises of ``names``; each value is read at or after the call began.  A counter that
        cannot be read (``CorruptCounter``) is left out and logged (its own reads report it).
        Stores that list names and values in one pass (a directory, a table) override this; here,
        ``names`` then a ``get`` each."""
        rows = []
        for name in self.names(limit):
            try:
                rows.append((name, self.get(name)))
            except CorruptCounter as error:
                log.warning("counter %r left out of a listing: %s", name, error)
        return rows

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


# -- abilities a store may add -------------------------------------------------------------------------


class SessionStorage(ABC):
    """A store that can keep server-side sessions on its own servers, under whole keys outside the
    counters' prefix, with the same deadline and the same ``StoreUnavailable`` as a counter step
    (``tally.sessions`` adapts it to Flask-Session)."""

    #: The Flask-Session interface the adapter speaks: ``"redis"`` or ``"memcached"``.
    session_protocol: ClassVar[str]

    @abstractmethod
    def session_get(self, key: str) -> bytes | None:
        """The session stored under ``key``, ``None`` when missing or expired."""

    @abstractmethod
    def session_set(self, key: str, data: bytes, ttl: int) -> None:
        """Store a session for ``ttl`` seconds; ``StoreUnavailable`` when it is not stored."""

    @abstractmethod
    def session_delete(self, key: str) -> bool:
        """Remove a session; return whether it existed."""


class WindowSupport(ABC):
    """A store that can count in a fixed window natively: a counter whose lifetime is set when it is
    created and kept by every later step, with that end readable.  ``tally.ratelimits`` counts the
    fixed window with it in one store step (a counter step, not a value update).  Keys are per-client
    keys (``@...``): never listed, swept like them.  A window's end may be rounded up to the store's
    clock (whole seconds on the filesystem and SQL)."""

    @abstractmethod
    def add_in_window(self, key: str, delta: int, window: float) -> tuple[int, float]:
        """Add ``delta`` and return ``(value, end)`` (``end``: unix time) as one atomic step: a key
        that is missing or whose window has ended starts from 0 in a window of ``window`` seconds
        from now; a live key keeps its end.  ``Overflow`` as for ``add``."""

    @abstractmethod
    def read_window(self, key: str) -> tuple[int, float] | None:
        """``(value, end)`` of a live window; ``None`` when the key is missing or its window ended."""


class SchemaSupport(ABC):
    """A store whose tables an operator may create ahead of time (``flask counters init-db``)."""

    @abstractmethod
    def create_schema(self) -> None:
        """Create the store's tables if they are missing; ``StoreUnavailable`` when unreachable."""


class ForkAdoption(ABC):
    """A store kept inside one process that a forked child may take over before it counts (gunicorn's
    single worker, in ``post_fork``)."""

    @abstractmethod
    def adopt(self) -> None:
        """Make the calling process the only one that counts; only a store holding nothing may be
        adopted."""
