"""The counter contract, written once and run on every backend against real servers."""

from __future__ import annotations

import threading
import time

import pytest
from flask import current_app

from common import cache, counters
from tally import InvalidAmount, InvalidName, Overflow

CLIENT = "0123456789abcdef0123456789abcdef"
OTHER_CLIENT = "fedcba9876543210fedcba9876543210"


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app.extensions["tally"]


def test_a_missing_counter_reads_zero_and_starts_at_zero(ctx):
    assert counters.get("fresh") == 0
    assert counters.incr("fresh") == 1
    assert counters.get("fresh") == 1


def test_incr_and_decr_by_amounts_and_below_zero(ctx):
    assert counters.incr("n", 5) == 5
    assert counters.decr("n", 7) == -2
    assert counters.decr("n") == -3
    assert counters.incr("n", 3) == 0
    assert counters.decr("fresh-negative", 4) == -4
    assert counters.get("fresh-negative") == -4


def test_large_steps_are_exact(ctx):
    step = 2**40 + 3
    assert counters.incr("big", step) == step
    assert counters.decr("big", 2 * step) == -step
    assert counters.get("big") == -step


def test_set_and_reset(ctx):
    assert counters.set("s", 41) == 41
    assert counters.incr("s") == 42
    assert counters.reset("s") is True
    assert counters.get("s") == 0
    assert counters.reset("s") is False
    assert counters.incr("s") == 1


def test_overflow_at_the_top_is_an_error_and_changes_nothing(ctx):
    top = ctx.max_value
    counters.set("top", top - 1)
    assert counters.incr("top") == top
    with pytest.raises(Overflow):
        counters.incr("top")
    with pytest.raises(Overflow):
        counters.incr("top", 2**40)
    assert counters.get("top") == top
    assert counters.decr("top") == top - 1


def test_overflow_at_the_bottom_is_an_error_and_changes_nothing(ctx):
    bottom = ctx.min_value
    counters.set("bottom", bottom + 1)
    assert counters.decr("bottom") == bottom
    with pytest.raises(Overflow):
        counters.decr("bottom")
    with pytest.raises(Overflow):
        counters.decr("bottom", 2**40)
    assert counters.get("bottom") == bottom
    assert counters.incr("bottom") == bottom + 1


def test_set_outside_the_range_is_refused(ctx):
    counters.set("r", 7)
    with pytest.raises(Overflow):
        counters.set("r", ctx.max_value + 1)
    with pytest.raises(Overflow):
        counters.set("r", ctx.min_value - 1)
    assert counters.get("r") == 7


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "-lead",
        "_lead",
        "a b",
        "nul\x00",
        "é",
        "x" * 65,
        "@x",
        None,
        5,
    ],
)
def test_invalid_names_are_refused(ctx, name):
    with pytest.raises(InvalidName):
        counters.incr(name)
    with pytest.raises(InvalidName):
        counters.get(name)


@pytest.mark.parametrize("by", [0, -1, True, 1.0, "1", None, 2**63])
def test_invalid_amounts_are_refused_and_change_nothing(ctx, by):
    counters.set("a", 3)
    with pytest.raises(InvalidAmount):
        counters.incr("a", by)
    with pytest.raises(InvalidAmount):
        counters.decr("a", by)
    assert counters.get("a") == 3


def test_counters_do_not_expire_with_the_cache_default_timeout(make_app, store_settings, backend):
    app = make_app(store_settings(backend), CACHE_DEFAULT_TIMEOUT=1)
    with app.app_context():
        counters.incr("kept", 9)
        cache.set("page", "expires")
        time.sleep(2.2)
        assert cache.get("page") is None  # the page cache did expire...
        assert counters.get("kept") == 9  # ...the counter did not


def test_counters_survive_heavy_page_cache_traffic(ctx, backend):
    """The page cache fills past cachelib's threshold and is cleared; counters that follow CACHE_TYPE
    (kept beside the page cache, or on its servers) are untouched.  The sql and manager stores keep
    theirs elsewhere altogether, so their page cache has nothing to test here."""
    if current_app.extensions["tally.settings"]["COUNTER_STORE"]:
        pytest.skip("counters kept apart from the page cache's backend (COUNTER_STORE)")
    counters.incr("survivor", 7)
    for i in range(2000):  # four times cachelib's default threshold of 500 entries
        cache.set(f"page-{i}", i, timeout=0)
    if backend != "memcached":  # memcached's clear() is flush_all: it wipes the server (README)
        cache.clear()
    assert counters.get("survivor") == 7


def test_threads_get_every_value_exactly_once(ctx):
    app = ctx  # noqa: F841 - keeps the app context fixture explicit
    from flask import current_app

    application = current_app._get_current_object()
    results: list[int] = []
    lock = threading.Lock()

    def work():
        with application.app_context():
            mine = [counters.incr("raced") for _ in range(300)]
        with lock:
            results.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(1, 2401))
    assert counters.get("raced") == 2400


def test_client_counters_are_private_to_each_client(ctx):
    mine = counters.for_client(CLIENT, lifetime=3600)
    theirs = counters.for_client(OTHER_CLIENT, lifetime=3600)
    assert mine.incr("clicks") == 1
    assert mine.incr("clicks") == 2
    assert theirs.decr("clicks") == -1
    assert mine.get("clicks") == 2
    assert counters.get("clicks") == 0  # a shared counter of the same name is another counter
    assert mine.reset("clicks") is True
    assert mine.get("clicks") == 0


def test_client_counters_with_a_lifetime_over_30_days_are_kept(ctx):
    # memcached reads an expiry over 30 days as a unix timestamp: passed raw, 31 days means 1970.
    mine = counters.for_client(CLIENT, lifetime=31 * 24 * 3600)
    mine.incr("long", 4)
    assert mine.get("long") == 4


def test_client_counters_expire_and_shared_ones_do_not(ctx):
    counters.incr("forever")
    mine = counters.for_client(CLIENT, lifetime=1)
    mine.incr("brief")
    time.sleep(2.2)
    assert mine.get("brief") == 0
    assert mine.incr("brief") == 1
    assert counters.get("forever") == 1


def test_reading_a_client_counter_renews_its_lifetime(ctx):
    """The session is renewed by every request, reads included: so is the counter.  A 4-second
    counter read every 1.5 s is still there after 6 s, which without renewal it would not be on any
    store (the stores round a lifetime up by at most a second).  memcached's clock ticks once a
    second, so a lifetime of 4 s may end after 3: the reads leave 1.5 s of slack for a slow machine."""
    mine = counters.for_client(CLIENT, lifetime=4)
    mine.incr("read", 7)
    for _ in range(4):
        time.sleep(1.5)
        assert mine.get("read") == 7
    assert counters.for_client(OTHER_CLIENT, lifetime=4).get("read") == 0  # reading creates nothing
