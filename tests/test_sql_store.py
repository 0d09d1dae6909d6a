"""The sql store (COUNTER_STORE = "sql"): SQLite and a real PostgreSQL started by a fixture.

The contract, hostile-input, shared-value and gunicorn race suites run on both through the `backend`
parameters of tests/conftest.py; here are the behaviours of this store alone: overflow never turned
into a REAL, the schema, expiry and sweeping, WAL, and PostgreSQL hung, stopped and crashed (kill -9)
under load.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
from sqlalchemy import create_engine, inspect, text

from tally import Overflow, StoreUnavailable
from tally.loadcheck import run_load
from tally.stores.base import INT64_MAX, INT64_MIN
from tally.stores.sql import BUSY_SLICE_MS, SqlCounterStore
from tests.conftest import once_it_answers, settings_env
from tests.servers import Gunicorn, Postgres

TIMEOUT = 0.5


@pytest.fixture
def sqlite_store(tmp_path):
    store = SqlCounterStore(f"sqlite:///{tmp_path / 'tally.db'}", key_prefix="t:", timeout=TIMEOUT)
    yield store
    store.close()


@pytest.fixture
def own_postgres():
    """A PostgreSQL of the test's own, to hang, stop and crash."""
    server = Postgres().start()
    yield server
    server.resume()
    server.remove()


def test_sqlite_never_turns_an_overflow_into_a_real(sqlite_store, tmp_path):
    """SQLite computes 9223372036854775807 + 1 as 9.223372036854776e18, UPSERT included: the guard
    in the statement means the sum is never formed, the step is refused and the row stays an integer."""
    sqlite_store.set("top", INT64_MAX)
    sqlite_store.set("bottom", INT64_MIN)
    with pytest.raises(Overflow):
        sqlite_store.add("top", 1)
    with pytest.raises(Overflow):
        sqlite_store.add("bottom", -1)
    with pytest.raises(Overflow):
        sqlite_store.add("top", INT64_MAX)
    engine = create_engine(f"sqlite:///{tmp_path / 'tally.db'}")
    with engine.connect() as connection:
        rows = dict(connection.execute(text("SELECT name, typeof(value) FROM tally_counters")).all())
        values = dict(connection.execute(text("SELECT name, value FROM tally_counters")).all())
    assert rows == {"t:top": "integer", "t:bottom": "integer"}
    assert values == {"t:top": INT64_MAX, "t:bottom": INT64_MIN}
    assert sqlite_store.add("top", -INT64_MAX) == 0


def test_expiries_written_in_seconds_are_read_as_milliseconds_after_an_upgrade(tmp_path):
    """Expiries were unix seconds before they were milliseconds: a store that starts converts the
    rows an earlier version wrote, once, and leaves the rest alone."""
    url = f"sqlite:///{tmp_path / 'tally.db'}"
    first = SqlCounterStore(url, key_prefix="t:", timeout=TIMEOUT)
    first.add("@c.new", 2, ttl=3600)  # milliseconds
    first.set_value("v", b"x", ttl=3600)
    first.close()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO tally_counters VALUES ('t:@c.old', 5, :at)"), {"at": int(time.time()) + 3600}
        )
        connection.execute(
            text("INSERT INTO tally_values VALUES ('t:old', x'79', :at)"), {"at": int(time.time()) + 60}
        )
    upgraded = SqlCounterStore(url, key_prefix="t:", timeout=TIMEOUT)
    try:
        assert upgraded.get("@c.old") == 5 and upgraded.get("@c.new") == 2
        assert upgraded.get_value("old") == b"y" and upgraded.get_value("v") == b"x"
        with engine.begin() as connection:
            ends = dict(connection.execute(text("SELECT name, expires_at FROM tally_counters")).all())
        assert ends["t:@c.old"] == pytest.approx((time.time() + 3600) * 1000, abs=5000)
        assert ends["t:@c.new"] == pytest.approx((time.time() + 3600) * 1000, abs=5000)
    finally:
        upgraded.close()
        engine.dispose()


def test_sqlite_runs_in_wal_mode_and_waits_for_its_lock_in_short_slices(sqlite_store):
    sqlite_store.add("x", 1)
    with sqlite_store._connection() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == BUSY_SLICE_MS


def test_a_sqlite_write_waits_for_a_lock_held_elsewhere_up_to_the_timeout(sqlite_store, tmp_path):
    """Another process's transaction holds the write lock: a step waits for it (it succeeds when the
    lock goes within the timeout), and answers 503 within about the timeout when it does not."""
    import sqlite3

    sqlite_store.add("x", 1)
    other = sqlite3.connect(tmp_path / "tally.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(TIMEOUT / 3, lambda: other.execute("COMMIT")).start()
    assert sqlite_store.add("x", 1) == 2  # waited for the lock
    other.execute("BEGIN IMMEDIATE")
    began = time.monotonic()
    with pytest.raises(StoreUnavailable):
        sqlite_store.add("x", 1)
    assert TIMEOUT <= time.monotonic() - began < TIMEOUT + 1.0
    other.execute("ROLLBACK")
    assert sqlite_store.add("x", 1) == 3


def test_an_in_memory_or_unknown_database_is_refused_at_start(make_app, store_settings):
    from tally import ConfigError

    for url in ("sqlite://", "sqlite:///:memory:", "mysql://db/x", "not a url"):
        with pytest.raises(ConfigError, match="SQLALCHEMY_DATABASE_URI"):
            make_app(store_settings("sqlite"), SQLALCHEMY_DATABASE_URI=url)


def test_a_relative_sqlite_path_lands_in_the_instance_folder(make_app, store_settings, tmp_path):
    app = make_app({**store_settings("sqlite"), "SQLALCHEMY_DATABASE_URI": "sqlite:///data/counts.db"})
    assert app.test_client().post("/api/counters/x/incr").get_json()["value"] == 1
    assert (tmp_path / "instance" / "data" / "counts.db").is_file()


def test_the_default_database_needs_no_server(make_app, store_settings, tmp_path):
    settings = {**store_settings("sqlite")}
    del settings["SQLALCHEMY_DATABASE_URI"]
    app = make_app(settings)
    assert app.test_client().post("/api/counters/x/incr").get_json()["value"] == 1
    assert (tmp_path / "instance" / "tally.db").is_file()


def test_the_schema_is_importable_and_init_db_creates_it(make_app, store_settings, postgres_server):
    import tally.sql

    assert set(tally.sql.metadata.tables) == {"tally_counters", "tally_values"}
    app = make_app(store_settings("sqlite"))
    result = app.test_cli_runner().invoke(args=["counters", "init-db"])
    assert result.exit_code == 0, result.output
    store = app.extensions["tally"]
    with store._connection() as connection:
        assert {"tally_counters", "tally_values"} <= set(inspect(connection).get_table_names())
    fs_app = make_app(store_settings("filesystem"))
    assert fs_app.test_cli_runner().invoke(args=["counters", "init-db"]).exit_code != 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_expired_per_client_rows_read_as_zero_and_are_swept(make_app, store_settings, backend):
    app = make_app({**store_settings(backend), "COUNTER_SWEEP_INTERVAL": 0.01})
    store = app.extensions["tally"]
    key = "@" + "0" * 32 + ".c"
    assert store.add(key, 5, ttl=1) == 5
    time.sleep(2.2)  # expiry has whole-second resolution
    assert store.get(key) == 0
    assert store.add(key, 1, ttl=1) == 1  # an expired row starts again from the step
    other = "@" + "1" * 32 + ".c"
    store.add(other, 1, ttl=1)
    time.sleep(2.2)
    store.add("@" + "2" * 32 + ".c", 1, ttl=60)  # a write with a lifetime runs the sweep
    with store._connection() as connection:
        names = set(connection.exec_driver_sql("SELECT name FROM tally_counters").scalars())
    assert store.key_prefix + other not in names and store.key_prefix + key not in names


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_shared_value_update_runs_its_function_once(make_app, store_settings, backend):
    """No optimistic retries: the row is held for the whole update."""
    app = make_app(store_settings(backend))
    store = app.extensions["tally"]
    calls = []

    def change(data):
        calls.append(data)
        time.sleep(0.05)
        return b"x" if data is None else data + b"x"

    threads = [threading.Thread(target=store.update_value, args=("v", change)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 8 and store.get_value("v") == b"x" * 8


def _status(url: str, method: str = "GET") -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _value(url: str) -> int:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())["value"]


def _wait_for_200(url: str, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while _status(url) != 200:
        assert time.monotonic() < deadline, f"{url}: no 200 within {within} s"
        time.sleep(0.2)


def _serve(server: Postgres, tmp_path) -> Gunicorn:
    env = settings_env(
        {
            "CACHE_TYPE": "FileSystemCache",
            "CACHE_DIR": str(tmp_path / "cache"),
            "COUNTER_STORE": "sql",
            "SQLALCHEMY_DATABASE_URI": server.url,
            "COUNTER_TIMEOUT": TIMEOUT,
        }
    )
    return Gunicorn(env, workers=4, threads=8).start()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hang", "stop"])
def test_postgresql_away_under_load_answers_503_in_time_and_service_returns(own_postgres, tmp_path, kind):
    """Load for six seconds; PostgreSQL hangs (SIGSTOP: it answers nothing, not even its own
    timeouts) or stops for two.  Only 200s and 503s, none much slower than the timeout, no number
    twice, and service returns by itself."""
    app = _serve(own_postgres, tmp_path)
    try:
        url = f"{app.url}/api/counters/outage/incr"
        healthy = run_load(url, clients=16, requests=10)
        slack = max(1.0, 10 * healthy.percentile(0.99))
        result = {}
        driver = threading.Thread(
            target=lambda: result.update(report=run_load(url, clients=16, requests=100_000, deadline=6.0))
        )
        driver.start()
        time.sleep(1.0)
        (own_postgres.pause if kind == "hang" else own_postgres.stop)()
        time.sleep(2.0)
        (own_postgres.resume if kind == "hang" else own_postgres.start)()
        driver.join(timeout=60)
        report = result["report"]
        assert report.errors == {}, report.errors
        assert set(report.statuses) == {200, 503}, report.statuses
        assert max(report.latencies) < 2 * TIMEOUT + slack, (max(report.latencies), slack)
        _wait_for_200(f"{app.url}/api/counters/outage")
        final = _value(f"{app.url}/api/counters/outage")
        values = healthy.values + report.values
        assert len(values) == len(set(values))  # the database kept every step: no number twice
        assert max(values) <= final <= healthy.sent + report.sent
    finally:
        app.stop()


@pytest.mark.slow
def test_a_postgresql_crash_loses_no_acknowledged_step(own_postgres, tmp_path):
    """kill -9 of the postmaster and every backend in the middle of the load, then a restart (crash
    recovery from the WAL): the counter is at least the number of 200s, and no value was handed out
    twice, before or after the crash."""
    app = _serve(own_postgres, tmp_path)
    try:
        url = f"{app.url}/api/counters/crash/incr"
        result = {}
        driver = threading.Thread(
            target=lambda: result.update(report=run_load(url, clients=16, requests=100_000, deadline=6.0))
        )
        driver.start()
        time.sleep(1.5)
        own_postgres.crash()
        time.sleep(1.0)
        own_postgres.start()
        driver.join(timeout=60)
        report = result["report"]
        assert report.errors == {}, report.errors
        assert set(report.statuses) <= {200, 503} and report.statuses[503] > 0, report.statuses
        _wait_for_200(f"{app.url}/api/counters/crash")
        final = _value(f"{app.url}/api/counters/crash")
        assert report.duplicates == 0
        assert final >= report.ok  # every acknowledged step survived the crash
        assert max(report.values) <= final
        after = run_load(url, clients=8, requests=10)  # and it counts on from there
        assert after.ok == 80 and sorted(after.values) == list(range(final + 1, final + 81))
    finally:
        app.stop()


def test_an_unreachable_postgresql_is_a_quick_store_unavailable(own_postgres):
    store = SqlCounterStore(own_postgres.url, key_prefix="q:", timeout=TIMEOUT)
    try:
        assert store.add("x", 1) == 1
        store.update_value("v", lambda data: b"1")
        own_postgres.pause()
        for _ in range(3):  # an open connection, then new ones (whose connect is bounded too)
            began = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.add("x", 1)
            assert time.monotonic() - began < TIMEOUT + 1.5  # the deadline, not libpq's 2 s minimum
        store.close()  # idle connections gone: the next update opens its connection during the hang
        for _ in range(2):
            began = time.monotonic()
            with pytest.raises(StoreUnavailable):  # a transaction cut off mid-way: 503, never a 500
                store.update_value("v", lambda data: data + b"1")
            assert time.monotonic() - began < TIMEOUT + 1.5
        own_postgres.resume()
        assert once_it_answers(lambda: store.add("x", 1), 15) >= 2
    finally:
        own_postgres.resume()
        store.close()


@pytest.mark.slow
@pytest.mark.light  # the naive variant: it must repeat numbers, which load beside it only helps
@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_naive_select_then_update_hands_out_numbers_twice(serve, tmp_path, request, database):
    """The check catches the race on a database too: SELECT, add one, UPDATE under gunicorn 4x8."""
    url = (
        f"sqlite:///{tmp_path / 'naive.db'}"
        if database == "sqlite"
        else request.getfixturevalue("postgres_server").url
    )
    server = serve(
        {"NAIVE_DATABASE_URL": url}, workers=4, threads=8, app="naive_app:app", use_project_config=False
    )
    name = f"race{time.monotonic_ns()}"
    report = run_load(f"{server.url}/naive-sql/{name}/incr", clients=50, requests=20, keepalive=False)
    assert report.duplicates > 0


def test_a_shared_value_locked_elsewhere_is_a_503_in_time_and_unchanged(own_postgres):
    """Another session holds the row (SELECT ... FOR UPDATE, never committing): the update waits for
    at most the timeout (lock_timeout on the server, the socket deadline on the client), answers
    StoreUnavailable, and writes nothing; once the row is free it goes through."""
    import psycopg

    store = SqlCounterStore(own_postgres.url, key_prefix="held:", timeout=TIMEOUT)
    try:
        store.update_value("v", lambda data: b"first")
        with psycopg.connect(own_postgres.conninfo) as holder:
            holder.execute("SELECT data FROM tally_values WHERE key = 'held:v' FOR UPDATE")
            began = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.update_value("v", lambda data: data + b"+second")
            assert time.monotonic() - began < TIMEOUT + 1.5
            holder.rollback()
        assert store.get_value("v") == b"first"
        assert store.update_value("v", lambda data: data + b"+third") == b"first+third"
    finally:
        store.close()


def test_pooled_connections_idle_through_a_restart_answer_without_a_503(own_postgres):
    """8 connections sit idle in the pool while PostgreSQL restarts: once it is back, no step fails
    (each dead connection is found by a peek at checkout and replaced), as on memcached."""
    from tally.stores.sql import SqlCounterStore

    store = SqlCounterStore(own_postgres.url, timeout=2.0, pool_size=8)
    try:
        barrier = threading.Barrier(8)

        def hold_one(_: int) -> None:  # 8 steps at once: 8 connections in the pool
            barrier.wait(timeout=10)
            store.add("warm", 1)

        threads = [threading.Thread(target=hold_one, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert store.get("warm") == 8
        own_postgres.stop()
        own_postgres.start()
        assert [store.add("after", 1) for _ in range(20)] == list(range(1, 21))
    finally:
        store.close()


def test_a_multi_host_url_reaches_the_host_that_answers(postgres_server, make_app, store_settings):
    """libpq's multi-host form, as SQLAlchemy documents it for psycopg: the first host is down (a
    closed port), the second serves, ``target_session_attrs=read-write`` picks the one that takes
    writes.  Every request was a 503 before ("failed to resolve host '127.0.0.1:P'")."""
    from tests.servers import free_port

    url = (
        f"postgresql+psycopg://postgres@/postgres?host=127.0.0.1:{free_port()}"
        f"&host=127.0.0.1:{postgres_server.port}&target_session_attrs=read-write"
    )
    app = make_app({**store_settings("postgresql"), "SQLALCHEMY_DATABASE_URI": url, "COUNTER_TIMEOUT": 3.0})
    client = app.test_client()
    assert [client.post("/api/counters/multi/incr").get_json()["value"] for _ in range(3)] == [1, 2, 3]
    assert client.get("/healthz").status_code == 200


def _set_read_only(server: Postgres, on: bool) -> None:
    import psycopg

    with psycopg.connect(server.conninfo, autocommit=True) as connection:
        connection.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
        connection.execute("SELECT pg_reload_conf()")


def test_after_a_switch_of_primary_no_answer_comes_from_the_old_one(own_postgres):
    """Two servers behind one multi-host URL with target_session_attrs=read-write; the writable one
    is turned read-only and the other writable (a failover, without the replication: each keeps its
    own rows, so an answer shows which server gave it).  Pooled connections to the old one then
    answer 503, never its (stale) value, and the next calls reach the new one by themselves."""
    from tally.stores.sql import SqlCounterStore

    other = Postgres().start()
    try:
        SqlCounterStore(other.url, timeout=2.0).set("c", 100)  # the other server's own row
        _set_read_only(other, True)
        url = (
            f"postgresql+psycopg://postgres@/postgres?host=127.0.0.1:{own_postgres.port}"
            f"&host=127.0.0.1:{other.port}&target_session_attrs=read-write"
        )
        store = SqlCounterStore(url, timeout=2.0, pool_size=4)
        try:
            assert [store.add("c", 1) for _ in range(5)] == [1, 2, 3, 4, 5]  # the first server
            _set_read_only(own_postgres, True)
            _set_read_only(other, False)
            time.sleep(0.3)  # both reloads applied
            reads, writes = [], []
            for _ in range(10):
                try:
                    reads.append(store.get("c"))
                except StoreUnavailable:
                    reads.append("503")
                try:
                    writes.append(store.add("c", 1))
                except StoreUnavailable:
                    writes.append("503")
            assert 5 not in reads, reads  # never the old server's value
            assert reads[-1] >= 100 and writes[-1] > 100, (reads, writes)  # the new one, by itself
            assert reads.count("503") + writes.count("503") <= 2, (reads, writes)
        finally:
            store.close()
    finally:
        other.remove()


def test_a_write_whose_answer_is_lost_is_outcome_unknown_and_a_read_is_not(own_postgres):
    """PostgreSQL hangs (SIGSTOP) after the connections are made: a step's answer never comes, its
    deadline shuts the socket, and the caller is told the outcome is unknown (it may have been
    applied), never a number and never a second send; a read that gets no answer is a plain 503."""
    from tally import OutcomeUnknown
    from tally.stores.sql import SqlCounterStore

    store = SqlCounterStore(own_postgres.url, timeout=0.5, pool_size=2)
    try:
        assert store.add("c", 1) == 1
        assert store.get_value("v") is None
        own_postgres.pause()
        try:
            with pytest.raises(OutcomeUnknown, match="may or may not have been applied"):
                store.add("c", 1)
            with pytest.raises(StoreUnavailable) as read:
                store.get("c")
            assert not isinstance(read.value, OutcomeUnknown)
            with pytest.raises(StoreUnavailable) as update:  # stuck before its COMMIT: nothing applied
                store.update_value("v", lambda data: b"x")
            assert not isinstance(update.value, OutcomeUnknown)
        finally:
            own_postgres.resume()
        # the lost step may or may not have landed: that is what was said
        assert once_it_answers(lambda: store.get("c"), 10) in (1, 2)
    finally:
        store.close()
