"""The store contract: what every counter store promises, as classes of tests run on the bare store.

Each contract is a class of test methods on the library itself (``tally.Counters``,
``tally.SharedValues`` and the store in ``app.extensions["tally"]``) in a bare Flask app, never the
demo.  ``tests/test_store_contract.py`` subclasses ``StoreContract`` once per test backend with a
``backend`` class attribute, which the ``make`` factory reads (cachelib's ``CommonTests`` style): a new
store gets the whole contract by adding one subclass.  What differs between stores is read from what
the store class declares (``optimistic_updates``, ``multi_process``, ``cache_types``), never from a
list of backend names.

The module has no ``test_`` prefix, so pytest collects the subclasses only.  Every test gets a store
of its own (``store_settings``: its own directory, database file or key prefix), so tests never see
one another's counters.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import flask
import pytest
from flask_caching import Cache

import tally
from tally import Conflict, InvalidAmount, InvalidName, InvalidValue, Overflow, ValueTooLarge
from tally.names import client_key
from tally.stores import CounterStore
from tally.stores.base import WindowSupport

CLIENT = "0123456789abcdef0123456789abcdef"
OTHER_CLIENT = "fedcba9876543210fedcba9876543210"


#: COUNTER_TIMEOUT of the contract's apps (seen: a Redis read after 0.5 s while load tests ran beside).
CONTRACT_TIMEOUT = 2.0


def needs(ability: Callable[[type[CounterStore]], bool], why: str) -> Callable[[Any], Any]:
    """A contract test that only means something for a store with ``ability`` (what its class
    declares in the registry): not collected for the others (``tests.conftest`` deselects it), rather
    than set up and skipped.  ``why`` says what the test is about."""

    def mark(test: Any) -> Any:
        test.needs = (ability, why)
        return test

    return mark


@dataclass
class Bare:
    """Tally on a bare Flask app: Flask-Caching, ``Counters(cache)`` and ``SharedValues(cache)``, set up
    the way any app's factory does.  ``with bare:`` pushes its app context."""

    app: flask.Flask
    cache: Cache
    counters: tally.Counters
    shared: tally.SharedValues
    settings: dict[str, Any]

    @property
    def store(self) -> CounterStore:
        return self.app.extensions["tally"]

    def __enter__(self) -> Bare:
        self._context = self.app.app_context()
        self._context.push()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._context.pop()


def bare_app(settings: dict[str, Any], config: dict[str, Any], instance_path: str) -> Bare:
    """``settings`` (a backend's, from ``store_settings``) with ``config`` on top."""
    app = flask.Flask(__name__, instance_path=instance_path)
    app.config.update(settings)
    app.config.update(config)
    cache = Cache()
    cache.init_app(app)
    counters = tally.Counters(cache)
    counters.init_app(app)
    shared = tally.SharedValues(cache)
    shared.init_app(app)
    return Bare(app, cache, counters, shared, settings)


def run_threads(work: Callable[[int], None], count: int) -> None:
    threads = [threading.Thread(target=work, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


class ContractBase:
    """The factory every contract uses: ``make(**config)`` builds the subclass's ``backend`` on a bare
    app; ``bare`` is one such app, its context pushed for the test."""

    #: The test backend (a key of ``tests.conftest.VARIANTS``); set by each subclass.
    backend: ClassVar[str]

    @pytest.fixture
    def make(self, store_settings, tmp_path) -> Iterator[Callable[..., Bare]]:
        built: list[Bare] = []

        def make(settings: dict[str, Any] | None = None, **config: Any) -> Bare:
            """A bare app on the backend's settings (``settings``: another app's, to share its store)
            with ``config`` on top."""
            settings = dict(settings if settings is not None else store_settings(self.backend))
            # The contract is not about timeouts, and runs beside the load tests (pytest-xdist): a
            # step slower than the 0.5 s default on a busy machine is a correct 503, not a fault.
            settings.setdefault("COUNTER_TIMEOUT", CONTRACT_TIMEOUT)
            subject = bare_app(settings, config, str(tmp_path / "instance"))
            built.append(subject)
            return subject

        yield make
        for subject in built:
            subject.store.close()

    @pytest.fixture
    def bare(self, make) -> Iterator[Bare]:
        with make() as subject:
            yield subject


class CounterContract(ContractBase):
    """Shared counters: exact, atomic, within int64, never expiring."""

    def test_a_missing_counter_reads_zero_and_starts_at_zero(self, bare):
        assert bare.counters.get("fresh") == 0
        assert bare.counters.incr("fresh") == 1
        assert bare.counters.get("fresh") == 1

    def test_incr_and_decr_by_amounts_and_below_zero(self, bare):
        counters = bare.counters
        assert counters.incr("n", 5) == 5
        assert counters.decr("n", 7) == -2
        assert counters.decr("n") == -3
        assert counters.incr("n", 3) == 0
        assert counters.decr("fresh-negative", 4) == -4
        assert counters.get("fresh-negative") == -4

    def test_large_steps_are_exact(self, bare):
        step = 2**40 + 3
        assert bare.counters.incr("big", step) == step
        assert bare.counters.decr("big", 2 * step) == -step
        assert bare.counters.get("big") == -step

    def test_set_and_reset(self, bare):
        counters = bare.counters
        assert counters.set("s", 41) == 41
        assert counters.incr("s") == 42
        assert counters.reset("s") is True
        assert counters.get("s") == 0
        assert counters.reset("s") is False
        assert counters.incr("s") == 1

    def test_overflow_at_the_top_is_an_error_and_changes_nothing(self, bare):
        counters, top = bare.counters, bare.store.max_value
        counters.set("top", top - 1)
        assert counters.incr("top") == top
        with pytest.raises(Overflow):
            counters.incr("top")
        with pytest.raises(Overflow):
            counters.incr("top", 2**40)
        assert counters.get("top") == top
        assert counters.decr("top") == top - 1

    def test_overflow_at_the_bottom_is_an_error_and_changes_nothing(self, bare):
        counters, bottom = bare.counters, bare.store.min_value
        counters.set("bottom", bottom + 1)
        assert counters.decr("bottom") == bottom
        with pytest.raises(Overflow):
            counters.decr("bottom")
        with pytest.raises(Overflow):
            counters.decr("bottom", 2**40)
        assert counters.get("bottom") == bottom
        assert counters.incr("bottom") == bottom + 1

    def test_set_outside_the_range_is_refused(self, bare):
        counters = bare.counters
        counters.set("r", 7)
        with pytest.raises(Overflow):
            counters.set("r", bare.store.max_value + 1)
        with pytest.raises(Overflow):
            counters.set("r", bare.store.min_value - 1)
        assert counters.get("r") == 7

    @pytest.mark.parametrize(
        "name",
        ["", ".", "..", "../x", "a/b", "-lead", "_lead", "a b", "nul\x00", "é", "x" * 65, "@x", None, 5],
    )
    def test_invalid_names_are_refused(self, bare, name):
        with pytest.raises(InvalidName):
            bare.counters.incr(name)
        with pytest.raises(InvalidName):
            bare.counters.get(name)

    @pytest.mark.parametrize("by", [0, -1, True, 1.0, "1", None, 2**63])
    def test_invalid_amounts_are_refused_and_change_nothing(self, bare, by):
        bare.counters.set("a", 3)
        with pytest.raises(InvalidAmount):
            bare.counters.incr("a", by)
        with pytest.raises(InvalidAmount):
            bare.counters.decr("a", by)
        assert bare.counters.get("a") == 3

    def test_threads_get_every_value_exactly_once(self, bare):
        """8 threads × 300 increments return exactly 1..2400 between them, each once."""
        results: list[int] = []
        lock = threading.Lock()

        def work(_: int) -> None:
            with bare.app.app_context():
                mine = [bare.counters.incr("raced") for _ in range(300)]
            with lock:
                results.extend(mine)

        run_threads(work, 8)
        assert sorted(results) == list(range(1, 2401))
        assert bare.counters.get("raced") == 2400

    def test_threads_on_the_store_itself_get_every_value_exactly_once(self, bare):
        """The same on the store's own ``add``: ``Counters.incr`` may combine concurrent steps of one
        process into one (COUNTER_COMBINE, on a store declaring ``combines_adds``), which alone would
        hide an ``add`` that is not atomic."""
        results: list[int] = []
        lock = threading.Lock()

        def work(_: int) -> None:
            mine = [bare.store.add("raced", 1) for _ in range(300)]
            with lock:
                results.extend(mine)

        run_threads(work, 8)
        assert sorted(results) == list(range(1, 2401))
        assert bare.store.get("raced") == 2400

    def test_names_are_exactly_the_shared_counters(self, bare):
        store = bare.store
        bare.counters.incr("a", 3)
        bare.counters.decr("b.c-d_e", 2)
        bare.counters.incr("Zed9")
        bare.counters.set("zero", 0)
        bare.counters.incr("reset", 4)
        bare.counters.reset("reset")
        bare.shared.set_value("shared", ["ada"])
        bare.shared.set_value("a", 1)  # a shared value named like a counter
        assert sorted(store.names(100)) == ["Zed9", "a", "b.c-d_e", "zero"]
        # counts (the leaderboard's one pass): the same counters, each with its value
        assert sorted(store.counts(100)) == [("Zed9", 1), ("a", 3), ("b.c-d_e", -2), ("zero", 0)]
        assert len(store.counts(2)) == 2 and set(store.counts(2)) <= set(store.counts(100))

    @needs(lambda store: bool(store.cache_types), "counters kept beside the page cache")
    def test_counters_survive_heavy_page_cache_traffic(self, make):
        """The page cache fills to four times its threshold (cachelib prunes past it) and is cleared;
        counters that follow CACHE_TYPE (kept beside the page cache, or on its servers) are untouched.
        A store that follows no cache type keeps its counters elsewhere altogether: nothing to test.
        (A threshold of 50, not cachelib's 500: the same pruning, a tenth of the files.)"""
        with make(CACHE_THRESHOLD=50) as bare:
            bare.counters.incr("survivor", 7)
            for i in range(200):
                bare.cache.set(f"page-{i}", i, timeout=0)
            # memcached's clear() is flush_all: it wipes the whole server, counters too (README).
            # Nothing a store declares says so (Redis shares its keyspace too, but clears by prefix).
            if self.backend != "memcached":
                bare.cache.clear()
            assert bare.counters.get("survivor") == 7

    @needs(lambda store: store.multi_process, "counts shared by several processes")
    def test_a_second_app_on_the_same_settings_shares_the_counters(self, make, bare):
        """What ``multi_process`` declares: another app (a worker, a host) on the same settings counts
        on the same counters and values."""
        bare.counters.incr("both", 2)
        bare.shared.set_value("both", {"from": "first"})
        with make(bare.settings) as other:
            assert other.store is not bare.store
            assert other.counters.incr("both", 3) == 5
            assert other.shared.get_value("both") == {"from": "first"}
            other.shared.set_value("both", {"from": "second"})
        assert bare.counters.get("both") == 5
        assert bare.shared.get_value("both") == {"from": "second"}


class ClientCounterContract(ContractBase):
    """Per-client counters: private to a client id, expiring ``lifetime`` s after their last use."""

    def test_client_counters_are_private_to_each_client(self, bare):
        mine = bare.counters.for_client(CLIENT, lifetime=3600)
        theirs = bare.counters.for_client(OTHER_CLIENT, lifetime=3600)
        assert mine.incr("clicks") == 1
        assert mine.incr("clicks") == 2
        assert theirs.decr("clicks") == -1
        assert mine.get("clicks") == 2
        assert bare.counters.get("clicks") == 0  # a shared counter of the same name is another counter
        assert mine.reset("clicks") is True
        assert mine.get("clicks") == 0

    def test_client_counters_are_never_listed_by_names(self, bare):
        bare.counters.for_client(CLIENT, lifetime=3600).incr("a", 5)  # even with a shared counter's name
        bare.counters.for_client(OTHER_CLIENT, lifetime=3600).incr("mine")
        bare.store.add(client_key(CLIENT, "raw"), 5, ttl=60)
        bare.counters.incr("shared")
        assert bare.store.names(100) == ["shared"]
        assert bare.store.counts(100) == [("shared", 1)]

    def test_client_counters_with_a_lifetime_over_30_days_are_kept(self, bare):
        # memcached reads an expiry over 30 days as a unix timestamp: passed raw, 31 days means 1970.
        mine = bare.counters.for_client(CLIENT, lifetime=31 * 24 * 3600)
        mine.incr("long", 4)
        assert mine.get("long") == 4


class ValueContract(ContractBase):
    """Shared JSON values: a round trip, atomic updates, size and type limits, optional expiry."""

    def test_a_missing_value_reads_as_the_default(self, bare):
        assert bare.shared.get_value("nothing") is None
        assert bare.shared.get_value("nothing", default={"a": 1}) == {"a": 1}

    def test_set_get_delete_round_trip_nested_json(self, bare):
        shared = bare.shared
        value = {"list": [1, 2.5, "x", None, True], "nested": {"deep": ["é", {"k": []}]}}
        assert shared.set_value("blob", value) == value
        assert shared.get_value("blob") == value
        assert shared.delete_value("blob") is True
        assert shared.get_value("blob") is None
        assert shared.delete_value("blob") is False

    def test_update_applies_the_function_to_the_current_value(self, bare):
        shared = bare.shared
        assert shared.update("visits", lambda n: n + 1, default=0) == 1
        assert shared.update("visits", lambda n: n + 1, default=0) == 2
        assert shared.update("tags", lambda tags: tags + ["a"], default=[]) == ["a"]
        assert shared.get_value("visits") == 2

    def test_the_default_is_not_shared_between_updates(self, bare):
        default: list = []
        bare.shared.update("one", lambda items: items.append(1) or items, default=default)
        bare.shared.update("two", lambda items: items.append(2) or items, default=default)
        assert default == [] and bare.shared.get_value("two") == [2]

    def test_values_and_counters_of_one_name_are_separate(self, bare):
        bare.counters.incr("same", 5)
        bare.shared.set_value("same", "text")
        assert bare.counters.get("same") == 5
        assert bare.shared.get_value("same") == "text"

    def test_a_value_that_is_not_json_is_refused_and_nothing_changes(self, bare):
        shared = bare.shared
        shared.set_value("v", [1])
        for bad in ({1, 2}, object(), float("nan"), b"bytes"):
            with pytest.raises(InvalidValue):
                shared.set_value("v", bad)
            with pytest.raises(InvalidValue):
                shared.update("v", lambda old, bad=bad: bad)
        assert shared.get_value("v") == [1]

    def test_a_value_over_the_size_limit_is_refused(self, make):
        with make(VALUE_MAX_BYTES=1000) as bare:
            shared = bare.shared
            shared.set_value("big", "x" * 900)
            with pytest.raises(ValueTooLarge):
                shared.set_value("big", "x" * 1000)
            with pytest.raises(ValueTooLarge):
                shared.update("big", lambda s: s + "x" * 200)
            assert shared.get_value("big") == "x" * 900

    def test_an_exception_in_the_function_writes_nothing(self, bare):
        bare.shared.set_value("keep", {"n": 1})

        def fail(value):
            raise KeyError("boom")

        with pytest.raises(KeyError):
            bare.shared.update("keep", fail)
        assert bare.shared.get_value("keep") == {"n": 1}

    def test_invalid_keys_are_refused(self, bare):
        for key in ("", "../x", "a/b", "x" * 65, ".hidden"):
            with pytest.raises(InvalidName):
                bare.shared.set_value(key, 1)
            with pytest.raises(InvalidName):
                bare.shared.update(key, lambda v: v)

    def test_concurrent_updates_lose_nothing(self, bare):
        def work(thread: int) -> None:
            with bare.app.app_context():
                for i in range(40):
                    bare.shared.update("members", lambda m, item=f"{thread}-{i}": m + [item], default=[])

        run_threads(work, 8)
        expected = sorted(f"{t}-{i}" for t in range(8) for i in range(40))
        assert sorted(bare.shared.get_value("members")) == expected


def write_in_another_thread(store: CounterStore, key: str, data: bytes, wait: float) -> bool:
    """Another writer replaces ``key`` while an update's ``fn`` runs; whether it finished within
    ``wait`` s (an optimistic store lets it through; a lock-based one holds it until the update ends,
    so ``wait`` stays well inside COUNTER_TIMEOUT, which bounds the whole update).
    A thread of its own, so that a store declared wrongly fails the test instead of deadlocking it."""
    writer = threading.Thread(target=store.set_value, args=(key, data), daemon=True)
    writer.start()
    writer.join(wait)
    return not writer.is_alive()


class OptimisticUpdateContract(ContractBase):
    """``update`` as the store declares it (``optimistic_updates``): optimistic (read, compute, write
    if unchanged, else run ``fn`` again; ``Conflict`` in the end) or lock-based (the value is held
    while ``fn`` runs once).  A store that declares the wrong one fails here, without hanging."""

    def test_a_function_retried_after_a_conflict_sees_the_newer_value(self, bare):
        """Optimistic: a writer that slips in between read and write makes the update run ``fn`` again
        on the newer value (so ``fn`` must be pure).  Lock-based: the writer waits until the update
        ends, and ``fn`` runs once."""
        store = bare.store
        optimistic = type(store).optimistic_updates
        seen: list = []
        writer_done: list = []

        def sneaky(value):
            seen.append(value)
            if len(seen) == 1:
                wait = 5.0 if optimistic else 0.15
                writer_done.append(write_in_another_thread(store, "race", b"10", wait))
            return value + 1

        bare.shared.set_value("race", 1)
        result = bare.shared.update("race", sneaky)
        if optimistic:
            assert (result, seen, writer_done) == (11, [1, 10], [True])
        else:
            assert (result, seen, writer_done) == (2, [1], [False])
            deadline = time.monotonic() + 5
            while bare.shared.get_value("race") != 10 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert bare.shared.get_value("race") == 10  # the held writer ran once the update ended

    @needs(lambda store: store.optimistic_updates, "updates that may conflict (compare-and-set)")
    def test_endless_conflicts_end_in_a_conflict_error(self, bare):
        store = bare.store
        bare.shared.set_value("hot", 0)

        def always_beaten(value):
            assert write_in_another_thread(store, "hot", str(value + 1).encode(), 5.0), "writer held off"
            return value

        with pytest.raises(Conflict):
            bare.shared.update("hot", always_beaten)


class LifetimeContract(ContractBase):
    """What expires and what does not, on one timeline per store (the waits are shared: 6 s per store
    instead of 12.6 s for four separate tests), in an app whose page cache expires after 1 s."""

    def test_lifetimes(self, make):
        """- Counters and values without a timeout outlive ``CACHE_DEFAULT_TIMEOUT`` (the page cache
          does expire).
        - Per-client counters (through ``for_client`` or the store's own step) and values given a
          timeout expire, and start again from nothing.
        - Reading a per-client counter renews its lifetime: a 4-second counter read every 1.5 s is
          still there after 6 s, which without renewal it would not be on any store (the stores round
          a lifetime up by at most a second).  memcached's clock ticks once a second, so a lifetime of
          4 s may end after 3: the reads leave 1.5 s of slack for a slow machine.
        """
        with make(CACHE_DEFAULT_TIMEOUT=1) as bare:
            counters, shared = bare.counters, bare.shared
            counters.incr("kept", 9)
            bare.cache.set("page", "expires")
            brief = counters.for_client(CLIENT, lifetime=1)
            brief.incr("brief")
            raw = client_key(OTHER_CLIENT, "raw")
            bare.store.add(raw, 5, ttl=1)  # the store's own step, as every client counter's
            shared.set_value("kept", "yes")
            shared.set_value("brief", "no", timeout=1)
            assert shared.update("brief-update", lambda n: n + 1, default=0, timeout=1) == 1
            renewed = counters.for_client(CLIENT, lifetime=4)
            renewed.incr("read", 7)
            for tick in range(1, 5):
                time.sleep(1.5)
                assert renewed.get("read") == 7, f"a read renews the lifetime (read {tick})"
                if tick != 2:
                    continue
                # 3 s in: every 1-second lifetime is over (rounded up by a second at most)
                assert bare.cache.get("page") is None  # the page cache did expire...
                assert counters.get("kept") == 9  # ...the counter did not
                assert shared.get_value("kept") == "yes"
                assert brief.get("brief") == 0 and brief.incr("brief") == 1
                assert bare.store.get(raw) == 0
                assert shared.get_value("brief") is None
                assert shared.get_value("brief-update") is None
                assert shared.update("brief-update", lambda n: n + 1, default=0) == 1  # starts again
            theirs = counters.for_client(OTHER_CLIENT, lifetime=4)
            assert theirs.get("read") == 0  # reading creates nothing

    def test_data_lives_at_least_its_lifetime_whatever_the_phase_of_the_clock(self, bare):
        """A shared value and a per-client counter given 1 s are still there 0.9 s after the call
        that wrote them began, whichever tenth of a second it began in.  memcached's clock ticks once
        a second: with a lifetime of exactly the seconds asked, 8 phases of 10 lost the data early."""
        store = bare.store
        lost: list[str] = []

        def work(phase: int) -> None:
            time.sleep((phase / 10 - time.time()) % 1)  # start at this tenth of a second
            began = time.time()
            store.set_value(f"phase{phase}", b"x", ttl=1)
            store.add(client_key(CLIENT, f"phase{phase}"), 1, ttl=1)
            time.sleep(max(0.0, began + 0.9 - time.time()))
            if store.get_value(f"phase{phase}") is None:
                lost.append(f"value written at .{phase}")
            if store.get(client_key(CLIENT, f"phase{phase}")) != 1:
                lost.append(f"counter written at .{phase}")

        run_threads(work, 10)
        assert lost == []


class WindowContract(ContractBase):
    """``WindowSupport``: a counter whose lifetime is set by its first step and kept by the others (the
    fixed window of ``tally.ratelimits``).  Skipped on a store that does not declare it."""

    @pytest.fixture
    def window_store(self, bare):
        return bare.store

    @needs(lambda store: issubclass(store, WindowSupport), "a native fixed window")
    def test_a_window_keeps_the_end_its_first_step_set(self, window_store):
        before = time.time()
        value, ends = window_store.add_in_window("@rl.w", 1, 60)
        assert value == 1 and before + 59.9 <= ends <= time.time() + 61  # rounded up to a second at most
        value, kept = window_store.add_in_window("@rl.w", 4, 600)
        assert value == 5 and kept == pytest.approx(ends, abs=0.05)  # a live window keeps its end
        value, read = window_store.read_window("@rl.w")
        assert value == 5 and read == pytest.approx(ends, abs=0.05)
        assert window_store.read_window("@rl.missing") is None
        assert window_store.names(100) == [] and window_store.counts(100) == []  # never listed
        assert window_store.delete("@rl.w") is True and window_store.read_window("@rl.w") is None

    @needs(lambda store: issubclass(store, WindowSupport), "a native fixed window")
    def test_a_window_ends_when_its_length_has_passed(self, window_store):
        """To the millisecond, not rounded up to a whole second: a 1 s window (limits' "1 per
        second") lasted 1.1-1.99 s when the end was kept in whole seconds."""
        began = time.time()
        value, ends = window_store.add_in_window("@rl.second", 1, 1.0)
        assert value == 1 and began + 1.0 <= ends <= time.time() + 1.0 + 0.002
        assert window_store.read_window("@rl.second")[1] == pytest.approx(ends, abs=0.002)
        time.sleep(max(0.0, ends + 0.02 - time.time()))
        assert window_store.read_window("@rl.second") is None
        assert window_store.add_in_window("@rl.second", 1, 1.0)[0] == 1

    @needs(lambda store: issubclass(store, WindowSupport), "a native fixed window")
    def test_an_ended_window_starts_again(self, window_store):
        window_store.add_in_window("@rl.brief", 3, 0.5)
        time.sleep(1.6)  # past the end, even rounded up to the whole second
        assert window_store.read_window("@rl.brief") is None
        value, ends = window_store.add_in_window("@rl.brief", 1, 30)
        assert value == 1 and ends > time.time() + 29

    @needs(lambda store: issubclass(store, WindowSupport), "a native fixed window")
    def test_a_window_step_past_the_range_is_an_overflow(self, window_store):
        window_store.add_in_window("@rl.big", type(window_store).max_value, 60)
        with pytest.raises(Overflow):
            window_store.add_in_window("@rl.big", 1, 60)
        assert window_store.read_window("@rl.big")[0] == type(window_store).max_value

    @needs(lambda store: issubclass(store, WindowSupport), "a native fixed window")
    def test_concurrent_window_steps_are_exact(self, bare, window_store):
        seen: list[int] = []
        lock = threading.Lock()

        def work(_: int) -> None:
            for _ in range(50):
                value, _ends = window_store.add_in_window("@rl.raced", 1, 60)
                with lock:
                    seen.append(value)

        run_threads(work, 8)
        assert sorted(seen) == list(range(1, 401))


class StoreContract(
    CounterContract,
    ClientCounterContract,
    ValueContract,
    OptimisticUpdateContract,
    LifetimeContract,
    WindowContract,
):
    """Every contract: subclass it with ``backend = "..."`` (``tests/test_store_contract.py``)."""
