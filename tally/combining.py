"""Combining: concurrent increments of one counter in one process share one store round trip.

On a remote store (memcached, Redis, PostgreSQL) most of a step's time is the round trip.  When k
requests of one worker process add to the same counter while a step on it is already in flight, they
wait for that step and then share the next one: the first of them (the leader) sends ``add(key, d1 +
... + dk)`` and each request takes its own value out of the k-wide range the store returned.

Guarantees (the ``CounterStore.add`` contract still holds request by request):

- every value is handed out once: request i of a step that returned ``v`` for a total ``t`` gets
  ``v - t + d1 + ... + di``;
- linearizable: a request joins a step before it is sent and gets its value only after the store
  answered, so the store's single atomic add lies within every member's own lifetime;
- no added latency when alone: a request on a counter with no step in flight sends its own step at
  once, as without combining;
- bounded waits: a batch waits for the step ahead of it at most ``patience`` (50 ms), then goes
  beside it.  A step takes well under a millisecond on a healthy store, so this never stops
  combining; while the store hangs, a request's worst case is its own step's timeout plus 50 ms (not
  two timeouts), and the steps go out side by side as they would without combining;
- failures are not shared out as values: if the shared step fails, each member raises its own copy
  of the error (``StoreUnavailable`` -> each request answers 503); an ``Overflow`` of a shared step
  (which leaves the counter unchanged) makes each member retry alone, so only a request whose own
  step leaves the range gets ``Overflow``.

Only steps without ``ttl`` (shared counters, not per-client ones) are combined, and only with steps
of the same sign (increments with increments, decrements with decrements).  While the store answers
in time, one step per counter and sign is in flight in a process; other counters are unaffected.
The lock inside is never held across a store call or a wait, so it is also safe under gevent.

A store opts in by declaring ``CounterStore.combines_adds``; only stores whose ``add`` is a network
round trip do (a local store's step is cheaper than the hand-over).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

from .errors import Overflow, StoreUnavailable
from .stores.base import INT64_MAX

Add = Callable[..., int]
#: Seconds a batch waits for the step ahead of it before it is sent beside it (a healthy store's
#: step takes well under a millisecond).
PATIENCE = 0.05


class _Batch:
    """Requests waiting together for one shared step; ``deltas[0]`` is the leader's."""

    __slots__ = ("deltas", "done", "error", "retry_alone", "turn", "values")

    def __init__(self) -> None:
        self.deltas: list[int] = []
        self.turn = threading.Event()  # set when the step before it has finished: the batch is closed
        self.done = threading.Event()  # set when values, error or retry_alone are decided
        self.values: list[int] = []
        self.error: BaseException | None = None
        self.retry_alone = False


class _Group:
    """The steps in flight on one (counter, sign), and the batch waiting behind them."""

    __slots__ = ("in_flight", "waiting")

    def __init__(self) -> None:
        self.in_flight = 1
        self.waiting: _Batch | None = None


class Combiner:
    """``add(key, delta, ttl)`` with the contract of ``CounterStore.add``, combining concurrent steps
    on one counter into one call of ``step`` (the store's own ``add``).

    A waiting batch gets its turn when the step in flight finishes, or after ``patience`` seconds,
    whichever comes first: then it is sent beside the slow step, so a request's worst case is its
    own step plus ``patience``, even while the store hangs.

    Thread-safe; one per store and process.  The lock is held only to join or hand over a batch,
    never during a store call.  ``shared_steps`` and ``combined_requests`` count the steps sent for
    more than one request, and those requests, whatever their outcome (tests and benchmarks read
    them).
    """

    def __init__(self, step: Add, patience: float = PATIENCE) -> None:
        self._step = step
        self._patience = patience
        self._lock = threading.Lock()
        #: (key, sign) -> its steps in flight and waiting batch; absent: no step in flight.
        self._groups: dict[tuple[str, bool], _Group] = {}
        self.shared_steps = 0
        self.combined_requests = 0

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        if ttl:
            return self._step(key, delta, ttl)
        group_key = (key, delta > 0)
        with self._lock:
            group = self._groups.get(group_key)
            if group is None:
                group = self._groups[group_key] = _Group()
                batch = None
            else:
                batch = group.waiting
                if batch is None:
                    batch = group.waiting = _Batch()
                index = len(batch.deltas)
                batch.deltas.append(delta)
        if batch is None:  # no step in flight: this request's own step, at once
            try:
                return self._step(key, delta)
            finally:
                self._finished(group_key, group)
        if index == 0:
            self._lead(key, group_key, group, batch)
        else:
            batch.done.wait()
        return self._outcome(key, batch, index)

    def _lead(self, key: str, group_key: tuple[str, bool], group: _Group, batch: _Batch) -> None:
        """Wait for the turn, then send one step for the whole (now closed) batch.  Whatever happens,
        even an interruption while waiting, every member is released (``done``)."""
        try:
            if not batch.turn.wait(self._patience):
                with self._lock:
                    if group.waiting is batch:  # still not handed the turn: go beside the slow step
                        group.waiting = None
                        group.in_flight += 1
            total = sum(batch.deltas)
            if len(batch.deltas) == 1:
                batch.values = [self._step(key, total)]
            elif abs(total) > INT64_MAX:  # no store takes such a step: each member tries its own
                batch.retry_alone = True
            else:
                with self._lock:
                    self.shared_steps += 1
                    self.combined_requests += len(batch.deltas)
                try:
                    batch.values = self.hand_out(self._step(key, total), batch.deltas)
                except Overflow:
                    batch.retry_alone = True  # the counter is unchanged: find who really overflows
        except BaseException as error:
            batch.error = error
        finally:
            with self._lock:
                never_sent = group.waiting is batch  # interrupted before its turn: not in flight
                if never_sent:
                    group.waiting = None
            if not never_sent:
                self._finished(group_key, group)
            batch.done.set()

    @staticmethod
    def hand_out(last: int, deltas: list[int]) -> list[int]:
        """The value of each member of a step that added ``sum(deltas)`` and returned ``last``: the
        k-wide range, each value once, in joining order."""
        value = last - sum(deltas)
        values = []
        for delta in deltas:
            value += delta
            values.append(value)
        return values

    def _outcome(self, key: str, batch: _Batch, index: int) -> int:
        if batch.retry_alone:
            return self._step(key, batch.deltas[index])
        error = batch.error
        if error is None:
            return batch.values[index]
        if index == 0:
            raise error
        twin: BaseException | None = None
        if isinstance(error, Exception):
            try:
                twin = copy.copy(error)  # each request its own exception (and traceback)
            except Exception:  # noqa: BLE001 - an exception class that cannot be rebuilt from its args
                twin = None
        if twin is None:
            twin = StoreUnavailable(f"the shared step on counter {key!r} failed: {error!r}")
        raise twin from error

    def _finished(self, group_key: tuple[str, bool], group: _Group) -> None:
        """A step on the group has finished: the batch waiting behind it (closed now: later requests
        start a new one) takes its turn; the group goes when nothing is in flight or waiting."""
        with self._lock:
            group.in_flight -= 1
            waiting = group.waiting
            if waiting is not None:
                group.waiting = None
                group.in_flight += 1
                waiting.turn.set()
            elif group.in_flight == 0:
                del self._groups[group_key]
