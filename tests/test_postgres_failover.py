"""PostgreSQL with a standby behind one multi-host URL, under real faults on loopback, through
gunicorn 4x8 (``tests/postgres_pair.py``: a primary, a ``pg_basebackup -R`` standby, and a
``tests.links.Link`` on each path: app to primary, app to standby, standby to primary).

- A failover: the standby is cut off from the primary for a few seconds of load, then the primary
  is killed (kill -9) and the standby promoted.
- A partition: the primary is cut off from the standby and from the app, but stays up, and a second
  app that the partition leaves beside it (one group of clients) keeps writing to it; meanwhile the
  standby is promoted for the first app.
- A partition between the app and the primary alone, and a slow link.

With ``synchronous_standby_names = '*'`` every acknowledged step is on the standby before its 200,
and the old primary cannot acknowledge a step once its standby is gone: no acknowledged step is
lost, and no number is handed out twice.  The naive variant, an asynchronous standby, must lose
steps and repeat numbers in the same scenarios, or the checks prove nothing.  One round of each in
``make test``; ``make stress`` runs TALLY_STRESS_ROUNDS of them, each on fresh servers.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
from contextlib import closing

import psycopg
import pytest

from tally import OutcomeUnknown
from tally.stores.sql import SqlCounterStore
from tests.conftest import settings_env
from tests.fault_load import Load, repeats, serve_again, summary
from tests.postgres_pair import PostgresPair
from tests.servers import HOST

pytestmark = pytest.mark.slow

TIMEOUT = 2.0  # COUNTER_TIMEOUT of the app servers
SLACK = 1.5  # a loaded 2-core machine's delay on top of it, for the slowest answer
ROUNDS = int(os.environ.get("TALLY_STRESS_ROUNDS", "1"))


def app_settings(url: str) -> dict[str, str]:
    return settings_env(
        {
            "COUNTER_STORE": "sql",
            "SQLALCHEMY_DATABASE_URI": url,
            "COUNTER_TIMEOUT": TIMEOUT,
            "COUNTER_POOL_SIZE": 8,
        }
    )


def assert_nothing_lost(load: Load, labels: list[str], served_by: str, since: str) -> None:
    """No number twice over every app; the server serving now holds every acknowledged step; only
    200s and 503s, each within the deadline, and 503s only during the switch (none for a request
    answered before the first fault, none once service came back); 200s for requests sent after
    ``since``."""
    values = [value for label in labels for value in load.values(label)]
    assert repeats(values) == 0, f"{repeats(values)} numbers handed out twice"
    assert max(values) <= load.final[served_by], (max(values), load.final[served_by])
    for label in labels:
        assert set(load.statuses(label)) <= {200, 503}, load.statuses(label)
        assert load.slowest(label) < TIMEOUT + SLACK, load.slowest(label)
    assert load.values(served_by, sent_after=load.events[since]), f"no 200 after {since}"
    first_fault = min(load.events.values())
    for label in labels:
        assert set(load.statuses_answered_before(label, first_fault)) == {200}, label
    back = load.events[f"{served_by} serves again"]
    assert set(load.statuses_sent(served_by, back, float("inf"))) == {200}, "503s after service returned"


def failover(serve, synchronous: bool) -> Load:
    """6 s of load; from 1 s the standby is cut off from the primary for 3 s (longer than the
    deadline); then, the link still cut, the primary is killed and the standby promoted."""
    pair = PostgresPair(synchronous=synchronous).start()
    try:
        server = serve(app_settings(pair.url), workers=4, threads=8)
        load = Load({"app": f"{server.url}/api/counters/failover/incr"})
        with load:
            time.sleep(1.0)
            load.mark("cut")
            pair.replication.cut()
            time.sleep(3.0)
            pair.crash_primary()
            pair.promote()
            load.mark("promoted")
            time.sleep(2.0)
        serve_again(load, "app")
        return load
    finally:
        pair.remove()


def side_by_side(*scenarios):
    """Run the scenarios at the same time (each on servers of its own; their timelines are mostly
    waiting) and return their results; the first failure is raised."""
    results: list = [None] * len(scenarios)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = scenarios[index]()
        except BaseException as error:  # handed to the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(scenarios))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in threads), "a scenario did not end within 180 s"
    return results


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_failover_loses_nothing_with_a_synchronous_standby_and_repeats_with_an_asynchronous_one(
    serve, round_, capsys
):
    """The synchronous standby loses nothing and repeats nothing; the naive variant beside it, an
    asynchronous standby, loses what the primary acknowledged while it was cut off."""
    sync, naive = side_by_side(
        lambda: failover(serve, synchronous=True), lambda: failover(serve, synchronous=False)
    )
    with capsys.disabled():
        print(f"\nfailover, synchronous standby: {summary(sync, 'app')}")
        print(f"failover, asynchronous standby: {summary(naive, 'app')}")
    assert len(sync.values("app")) > len(sync.values("app", sent_after=sync.events["cut"])) > 0
    assert sync.statuses("app").get(503, 0) > 0  # commits waited for the cut standby: 503
    assert_nothing_lost(sync, ["app"], served_by="app", since="promoted")
    assert naive.values("app", sent_after=naive.events["promoted"]), "the promoted standby never served"
    assert repeats(naive.values("app")) > 0  # the check above does catch lost steps


def partition(serve, synchronous: bool) -> Load:
    """Two apps on one counter: ``majority`` through the multi-host URL, ``minority`` straight to the
    primary.  From 1 s the primary is cut off from the standby and from ``majority`` (it keeps
    running: nobody fences it); 1 s later the standby is promoted; 2.5 s of load follow."""
    pair = PostgresPair(synchronous=synchronous).start()
    try:
        majority = serve(app_settings(pair.url), workers=2, threads=8)
        minority = serve(app_settings(pair.primary_url), workers=2, threads=8)
        load = Load(
            {
                "majority": f"{majority.url}/api/counters/split/incr",
                "minority": f"{minority.url}/api/counters/split/incr",
            },
            clients=4,
        )
        with load:
            time.sleep(1.0)
            load.mark("isolated")
            pair.isolate_primary()
            time.sleep(1.0)
            pair.promote()
            load.mark("promoted")
            time.sleep(2.5)
        serve_again(load, "majority")
        return load
    finally:
        pair.remove()


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_partition_leaves_the_old_primary_unable_to_acknowledge_with_a_synchronous_standby(
    serve, round_, capsys
):
    """Split brain without fencing: the old primary still takes the minority's writes, but cannot
    confirm one without its synchronous standby, so each is a 503 within the deadline and never a
    200.  The naive variant beside it, an asynchronous standby: both sides acknowledge steps, and
    the same numbers go to both."""
    sync, naive = side_by_side(
        lambda: partition(serve, synchronous=True), lambda: partition(serve, synchronous=False)
    )
    with capsys.disabled():
        print(f"\npartition, synchronous standby: {summary(sync, 'majority')}; {summary(sync, 'minority')}")
        print(f"partition, asynchronous standby: {summary(naive, 'majority')}; {summary(naive, 'minority')}")
    isolated = sync.events["isolated"]
    assert sync.values("minority") and not sync.values("minority", sent_after=isolated + 0.1), (
        "the cut-off primary acknowledged a step"
    )
    assert sync.statuses("minority").get(503, 0) > 0
    assert_nothing_lost(sync, ["majority", "minority"], served_by="majority", since="promoted")
    assert naive.values("minority", sent_after=naive.events["isolated"] + 0.1)
    assert naive.values("majority", sent_after=naive.events["promoted"])
    assert repeats(naive.values("majority") + naive.values("minority")) > 0


def test_a_cut_or_slow_link_between_the_app_and_the_primary_loses_nothing(serve, capsys):
    """No failover: the app's link to the primary is slowed (30 ms a round trip) for 1.5 s, then cut
    for 2.5 s, then healed.  Meanwhile every answer is a 200 or a 503 within the deadline, no number
    comes twice, and service comes back by itself."""
    pair = PostgresPair(synchronous=True).start()
    try:
        server = serve(app_settings(pair.url), workers=4, threads=8)
        load = Load({"app": f"{server.url}/api/counters/cut/incr"})
        with load:
            time.sleep(1.0)
            load.mark("slowed")
            pair.to_primary.delay = 0.03  # new connections through the link are slow
            pair.to_primary.reset()  # and so are the pool's, made again
            time.sleep(1.5)
            pair.to_primary.cut()
            time.sleep(2.5)
            pair.to_primary.heal()
            pair.to_primary.delay = 0.0
            load.mark("healed")
            time.sleep(1.0)
        serve_again(load, "app")
    finally:
        pair.remove()
    with capsys.disabled():
        print(f"\napp-primary link slowed, cut, healed: {summary(load, 'app')}")
    assert load.statuses("app").get(503, 0) > 0  # the cut was seen
    assert_nothing_lost(load, ["app"], served_by="app", since="healed")


def test_shared_value_updates_survive_a_failover_to_a_synchronous_standby(serve):
    """Each client adds members of its own to one shared set across the failover: every member
    whose add was answered 200 is in the set the promoted standby holds."""
    pair = PostgresPair(synchronous=True).start()
    try:
        server = serve(app_settings(pair.url), workers=4, threads=8)
        port = int(server.url.rsplit(":", 1)[1])
        acknowledged: list[str] = []
        statuses: dict[int, int] = {}
        lock = threading.Lock()
        stop = threading.Event()

        def add_members(client: int) -> None:
            for number in range(10_000):
                if stop.is_set():
                    return
                member = f"c{client}-{number}"
                with closing(http.client.HTTPConnection(HOST, port, timeout=10)) as connection:
                    connection.request(
                        "POST",
                        "/api/shared/members/add",
                        body=json.dumps({"member": member}),
                        headers={"Content-Type": "application/json"},
                    )
                    status = connection.getresponse().status
                with lock:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        acknowledged.append(member)

        clients = [threading.Thread(target=add_members, args=(n,), daemon=True) for n in range(6)]
        for client in clients:
            client.start()
        time.sleep(1.0)
        pair.replication.cut()
        time.sleep(2.5)
        pair.crash_primary()
        pair.promote()
        time.sleep(2.0)
        stop.set()
        for client in clients:
            client.join(timeout=60)
        deadline = time.monotonic() + 30
        while True:
            with closing(http.client.HTTPConnection(HOST, port, timeout=10)) as connection:
                connection.request("GET", "/api/shared/members")
                response = connection.getresponse()
                body = json.loads(response.read())
            if response.status == 200:
                break
            assert time.monotonic() < deadline, body
            time.sleep(0.2)
    finally:
        pair.remove()
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.get(503, 0) > 0 and acknowledged
    missing = set(acknowledged) - set(body["value"])
    assert not missing, f"{len(missing)} acknowledged updates lost: {sorted(missing)[:5]}"


def _walreceiver(standby) -> int:
    with psycopg.connect(standby.conninfo, autocommit=True, connect_timeout=2) as connection:
        row = connection.execute("SELECT pid FROM pg_stat_wal_receiver").fetchone()
    assert row is not None, "no WAL receiver on the standby"
    return int(row[0])


def test_a_commit_waiting_for_its_standby_is_outcome_unknown_at_the_deadline_or_when_cancelled():
    """The standby's WAL receiver is stopped (SIGSTOP), so every commit waits for it.  A step's own
    deadline ends the wait with ``OutcomeUnknown``; and a cancel from elsewhere (pg_cancel_backend,
    as an operator or a failover manager may send) makes the server report success after a WARNING
    that the commit "might not have been replicated": that, too, is ``OutcomeUnknown``, never the
    number (which other sessions can already read on the primary)."""
    pair = PostgresPair(synchronous=True).start()
    assert pair.standby is not None
    stores = [SqlCounterStore(pair.url, timeout=timeout, pool_size=2) for timeout in (1.0, 15.0)]
    receiver = _walreceiver(pair.standby)
    try:
        quick, patient = stores
        quick.create_schema()
        assert quick.add("c", 1) == 1
        os.kill(receiver, signal.SIGSTOP)
        began = time.monotonic()
        with pytest.raises(OutcomeUnknown):
            quick.add("c", 1)
        assert time.monotonic() - began < 1.0 + SLACK

        outcome: dict[str, object] = {}

        def step() -> None:
            try:
                # Not "c": the quick step's backend still waits, holding that row's lock.
                outcome["value"] = patient.add("d", 1)
            except OutcomeUnknown as error:
                outcome["error"] = error

        waiters = "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep'"
        with psycopg.connect(pair.primary.conninfo, autocommit=True, connect_timeout=2) as connection:
            # The quick step's backend still waits (its client hung up): not the one to cancel.
            earlier = {row[0] for row in connection.execute(waiters)}
            waiting = threading.Thread(target=step)
            waiting.start()
            deadline = time.monotonic() + 10
            while not (new := {row[0] for row in connection.execute(waiters)} - earlier):
                assert time.monotonic() < deadline, "no commit waited for the standby"
                time.sleep(0.05)
            connection.execute("SELECT pg_cancel_backend(%s)", (new.pop(),))
            waiting.join(timeout=20)
        assert "error" in outcome, f"a cancelled wait for the standby answered {outcome}"
    finally:
        os.kill(receiver, signal.SIGCONT)
        for store in stores:
            store.close()
        pair.remove()
