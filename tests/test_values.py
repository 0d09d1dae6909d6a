"""The shared-value contract, written once and run on every backend against real servers."""

from __future__ import annotations

import threading
import time

import pytest

from common import counters, shared
from tally import Conflict, InvalidName, InvalidValue, ValueTooLarge


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app.extensions["tally"]


def test_a_missing_value_reads_as_the_default(ctx):
    assert shared.get_value("nothing") is None
    assert shared.get_value("nothing", default={"a": 1}) == {"a": 1}


def test_set_get_delete_round_trip_nested_json(ctx):
    value = {"list": [1, 2.5, "x", None, True], "nested": {"deep": ["é", {"k": []}]}}
    assert shared.set_value("blob", value) == value
    assert shared.get_value("blob") == value
    assert shared.delete_value("blob") is True
    assert shared.get_value("blob") is None
    assert shared.delete_value("blob") is False


def test_update_applies_the_function_to_the_current_value(ctx):
    assert shared.update("visits", lambda n: n + 1, default=0) == 1
    assert shared.update("visits", lambda n: n + 1, default=0) == 2
    assert shared.update("tags", lambda tags: tags + ["a"], default=[]) == ["a"]
    assert shared.get_value("visits") == 2


def test_the_default_is_not_shared_between_updates(ctx):
    default: list = []
    shared.update("one", lambda items: items.append(1) or items, default=default)
    shared.update("two", lambda items: items.append(2) or items, default=default)
    assert default == [] and shared.get_value("two") == [2]


def test_values_and_counters_of_one_name_are_separate(ctx):
    counters.incr("same", 5)
    shared.set_value("same", "text")
    assert counters.get("same") == 5
    assert shared.get_value("same") == "text"


def test_a_value_that_is_not_json_is_refused_and_nothing_changes(ctx):
    shared.set_value("v", [1])
    for bad in ({1, 2}, object(), float("nan"), b"bytes"):
        with pytest.raises(InvalidValue):
            shared.set_value("v", bad)
        with pytest.raises(InvalidValue):
            shared.update("v", lambda old, bad=bad: bad)
    assert shared.get_value("v") == [1]


def test_a_value_over_the_size_limit_is_refused(make_app, store_settings, backend):
    app = make_app(store_settings(backend), VALUE_MAX_BYTES=1000)
    with app.app_context():
        shared.set_value("big", "x" * 900)
        with pytest.raises(ValueTooLarge):
            shared.set_value("big", "x" * 1000)
        with pytest.raises(ValueTooLarge):
            shared.update("big", lambda s: s + "x" * 200)
        assert shared.get_value("big") == "x" * 900


def test_an_exception_in_the_function_writes_nothing(ctx):
    shared.set_value("keep", {"n": 1})

    def fail(value):
        raise KeyError("boom")

    with pytest.raises(KeyError):
        shared.update("keep", fail)
    assert shared.get_value("keep") == {"n": 1}


def test_invalid_keys_are_refused(ctx):
    for key in ("", "../x", "a/b", "x" * 65, ".hidden"):
        with pytest.raises(InvalidName):
            shared.set_value(key, 1)
        with pytest.raises(InvalidName):
            shared.update(key, lambda v: v)


def test_values_do_not_expire_unless_given_a_timeout(make_app, store_settings, backend):
    app = make_app(store_settings(backend), CACHE_DEFAULT_TIMEOUT=1)
    with app.app_context():
        shared.set_value("kept", "yes")
        shared.set_value("brief", "no", timeout=1)
        time.sleep(2.2)
        assert shared.get_value("kept") == "yes"
        assert shared.get_value("brief") is None


def test_concurrent_updates_lose_nothing(ctx):
    from flask import current_app

    application = current_app._get_current_object()

    def work(thread: int) -> None:
        with application.app_context():
            for i in range(40):
                shared.update("members", lambda m, item=f"{thread}-{i}": m + [item], default=[])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(shared.get_value("members")) == sorted(f"{t}-{i}" for t in range(8) for i in range(40))


def write_in_another_thread(ctx, key: str, data: bytes, wait: float) -> bool:
    """Another writer replaces ``key`` while an update's ``fn`` runs; whether it finished within
    ``wait`` s (an optimistic store lets it through; a lock-based one holds it until the update ends,
    so ``wait`` stays well inside COUNTER_TIMEOUT, which bounds the whole update).
    A thread of its own, so that a store declared wrongly fails the test instead of deadlocking it."""
    writer = threading.Thread(target=ctx.set_value, args=(key, data), daemon=True)
    writer.start()
    writer.join(wait)
    return not writer.is_alive()


def test_a_function_retried_after_a_conflict_sees_the_newer_value(ctx):
    """What the store declares (``optimistic_updates``) is what it does.  Optimistic: a writer that
    slips in between read and write makes the update run ``fn`` again on the newer value (so ``fn``
    must be pure).  Lock-based: the writer waits until the update ends, and ``fn`` runs once."""
    optimistic = ctx.optimistic_updates
    seen: list = []
    writer_done: list = []

    def sneaky(value):
        seen.append(value)
        if len(seen) == 1:
            writer_done.append(write_in_another_thread(ctx, "race", b"10", 5.0 if optimistic else 0.15))
        return value + 1

    shared.set_value("race", 1)
    result = shared.update("race", sneaky)
    if optimistic:
        assert (result, seen, writer_done) == (11, [1, 10], [True])
    else:
        assert (result, seen, writer_done) == (2, [1], [False])
        deadline = time.monotonic() + 5
        while shared.get_value("race") != 10 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert shared.get_value("race") == 10  # the held writer ran once the update ended


def test_endless_conflicts_end_in_a_conflict_error(ctx):
    if not ctx.optimistic_updates:
        pytest.skip(f"the {ctx.backend} store holds the value while fn runs: it never conflicts")
    shared.set_value("hot", 0)

    def always_beaten(value):
        assert write_in_another_thread(ctx, "hot", str(value + 1).encode(), 5.0), "writer held off"
        return value

    with pytest.raises(Conflict):
        shared.update("hot", always_beaten)
