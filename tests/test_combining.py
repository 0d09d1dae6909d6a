"""Combining (tally.combining) on real memcached and Redis servers: every value once under threads,
each waiter its own error when the shared step fails, and only the request that really overflows
gets Overflow.  A deliberately broken combiner shows that the exactness check catches a bad one."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from tally import Overflow, StoreUnavailable
from tally.combining import Combiner
from tally.stores.memcached import MemcachedCounterStore
from tally.stores.redis_store import RedisCounterStore
from tests.conftest import IN_PROCESS_TIMEOUT
from tests.servers import Memcached, Redis

THREADS = 16
PER_THREAD = 150


def make_store(backend: str, server, timeout: float = IN_PROCESS_TIMEOUT):
    prefix = f"comb{uuid.uuid4().hex[:8]}:"
    if backend == "memcached":
        return MemcachedCounterStore([server.address], key_prefix=prefix, timeout=timeout, pool_size=THREADS)
    return RedisCounterStore(server.url, key_prefix=prefix, timeout=timeout, pool_size=THREADS)


@pytest.fixture(params=["memcached", "redis"])
def store(request):
    server = request.getfixturevalue(f"{request.param}_server")
    store = make_store(request.param, server)
    yield store
    store.close()


@pytest.fixture
def own_server():
    """A memcached or redis-server of the test's own (it gets paused), resumed and removed after."""
    started = []

    def start(backend: str):
        started.append((Memcached("memcached") if backend == "memcached" else Redis()).start())
        return started[-1]

    yield start
    for server in started:
        server.resume()
        server.remove()


def in_threads(count: int, work: Callable[[int], object]) -> list[object]:
    """``work(i)`` in ``count`` threads started together; each result or exception, by thread."""
    results: list[object] = [None] * count
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = work(index)
        except Exception as error:  # noqa: BLE001 - the test looks at every outcome
            results[index] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a request never returned"
    return results


def increments_under_threads(combiner: Combiner) -> list[int]:
    """THREADS x PER_THREAD increments of one counter through ``combiner``: every value returned."""

    def work(_: int) -> list[int]:
        return [combiner.add("hot", 1) for _ in range(PER_THREAD)]

    outcomes = in_threads(THREADS, work)
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome
    return [value for outcome in outcomes for value in outcome]


def every_value_once(values: list[int], start: int) -> bool:
    return sorted(values) == list(range(start + 1, start + len(values) + 1))


class TopValueToAll(Combiner):
    """Deliberately broken: every member of a shared step gets the step's last value."""

    @staticmethod
    def hand_out(last: int, deltas: list[int]) -> list[int]:
        return [last] * len(deltas)


def test_the_remote_stores_ask_for_combining(store):
    assert store.combines_adds


def test_every_value_once_under_threads_with_shared_steps(store):
    store.set("hot", 1000)
    combiner = Combiner(store.add)
    values = increments_under_threads(combiner)
    assert len(values) == THREADS * PER_THREAD
    assert every_value_once(values, 1000)
    assert store.get("hot") == 1000 + THREADS * PER_THREAD
    # Steps were really shared (else this test proves nothing about combining).
    assert combiner.shared_steps > 0 and combiner.combined_requests > combiner.shared_steps
    assert not combiner._groups  # nothing left in flight or waiting: no bookkeeping kept per counter


def test_the_exactness_check_catches_a_combiner_that_repeats_values(store):
    store.set("hot", 1000)
    combiner = TopValueToAll(store.add)
    values = increments_under_threads(combiner)
    assert combiner.shared_steps > 0
    assert store.get("hot") == 1000 + THREADS * PER_THREAD  # the store counted right...
    assert not every_value_once(values, 1000)  # ...but the values handed out repeat


def test_each_value_lies_within_its_own_requests_lifetime(store):
    """A value handed out is never older than its request: each increment returns more than any
    value another thread had already seen returned before it started."""
    combiner = Combiner(store.add)
    highest_returned = [0]
    lock = threading.Lock()

    def work(_: int) -> list[tuple[int, int]]:
        pairs = []
        for _ in range(PER_THREAD):
            with lock:
                floor = highest_returned[0]
            value = combiner.add("order", 1)
            with lock:
                highest_returned[0] = max(highest_returned[0], value)
            pairs.append((floor, value))
        return pairs

    outcomes = in_threads(THREADS, work)
    for pairs in outcomes:
        assert not isinstance(pairs, Exception), pairs
        for floor, value in pairs:
            assert value > floor, (value, floor)
    assert combiner.shared_steps > 0


def test_decrements_combine_with_decrements_and_per_client_steps_go_alone(store):
    store.set("down", 0)
    combiner = Combiner(store.add)
    outcomes = in_threads(THREADS, lambda i: [combiner.add("down", -2) for _ in range(20)])
    values = sorted(v for outcome in outcomes for v in outcome)
    assert values == list(range(-2 * THREADS * 20, 0, 2))
    assert combiner.add("@client.x", 1, 60) == 1  # a per-client step (ttl): its own round trip
    assert store.get("@client.x") == 1


def hold_the_counter(combiner: Combiner, server, key: str) -> threading.Thread:
    """Pause ``server`` with a step on ``key`` in flight: later requests on the
    key queue behind it and share the next step."""
    server.pause()
    first = threading.Thread(target=lambda: suppress_all(lambda: combiner.add(key, 1)))
    first.start()
    time.sleep(0.1)  # the first step is sent and waits on the paused server
    return first


def suppress_all(call: Callable[[], object]) -> None:
    with contextlib.suppress(Exception):  # only the requests queued behind this one are under test
        call()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memcached", "redis"])
def test_a_failed_shared_step_gives_each_waiter_its_own_store_unavailable(own_server, backend):
    server = own_server(backend)
    store = make_store(backend, server, timeout=0.5)
    combiner = Combiner(store.add)
    store.add("c", 1)
    first = hold_the_counter(combiner, server, "c")
    began = time.monotonic()
    outcomes = in_threads(8, lambda _: combiner.add("c", 1))
    elapsed = time.monotonic() - began
    first.join(timeout=10)
    server.resume()
    assert all(isinstance(outcome, StoreUnavailable) for outcome in outcomes), outcomes
    assert len({id(outcome) for outcome in outcomes}) == 8  # each request its own exception
    assert combiner.shared_steps == 1  # the eight shared one step, which failed
    assert elapsed < 0.5 + 0.05 + 2.5  # a batch waits 50 ms at most, then its step times out
    store.close()


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["memcached", "redis"])
def test_an_overflowing_shared_step_falls_back_so_only_the_overflowing_request_fails(own_server, backend):
    server = own_server(backend)
    store = make_store(backend, server, timeout=3.0)
    combiner = Combiner(store.add, patience=3.0)  # the batch waits for the held step, however slow
    top = store.max_value
    store.set("c", top - 4)
    first = hold_the_counter(combiner, server, "c")  # takes top - 3 once the server is back
    waiting: list[object] = []
    queued = threading.Thread(target=lambda: waiting.extend(in_threads(8, lambda _: combiner.add("c", 1))))
    queued.start()
    time.sleep(0.3)  # all eight have joined the batch waiting behind the held step
    server.resume()
    queued.join(timeout=30)
    first.join(timeout=30)
    values = sorted(outcome for outcome in waiting if isinstance(outcome, int))
    overflows = [outcome for outcome in waiting if isinstance(outcome, Overflow)]
    assert values == [top - 2, top - 1, top]
    assert len(overflows) == 5 and len(values) + len(overflows) == 8, waiting
    assert combiner.shared_steps == 1  # the eight were sent as one step first, which overflowed
    assert store.get("c") == top
    store.close()
