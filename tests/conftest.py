"""Fixtures: real memcached and redis-server for the session, an app per test on a chosen store."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid

import pytest

# One temporary folder for the whole run, made by the first process (the controller under
# pytest-xdist): TMPDIR for the workers and every server, gunicorn and browser they start, so nothing
# a test makes can land anywhere else.  pytest's own basetemp stays in the system's folder.
if "TALLY_RUN_TMPDIR" not in os.environ:
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", tempfile.gettempdir())
    os.environ["TALLY_RUN_TMPDIR"] = tempfile.mkdtemp(prefix="tally-run-")
    os.chmod(os.environ["TALLY_RUN_TMPDIR"], 0o1777)  # as /tmp: servers run as other users (postgres)
    RUN_OWNER = True
else:
    RUN_OWNER = False
RUN_TMPDIR = os.environ["TMPDIR"] = tempfile.tempdir = os.environ["TALLY_RUN_TMPDIR"]

# Set before `app` is imported anywhere, so its module-level app never writes into the source tree;
# one per test process (each pytest-xdist worker has its own: they share no instance folder).
if "PYTEST_XDIST_WORKER" in os.environ or "TALLY_INSTANCE_PATH" not in os.environ:
    os.environ["TALLY_INSTANCE_PATH"] = tempfile.mkdtemp(prefix="tally-test-instance-")
SESSION_INSTANCE = os.environ["TALLY_INSTANCE_PATH"]

from tally.stores import REGISTRY, CounterStore  # noqa: E402
from tests.redis_topologies import MASTER_NAME, ClusterTopology, SentinelTopology  # noqa: E402
from tests.servers import Gunicorn, Manager, Memcached, Postgres, Redis  # noqa: E402

#: How the tests run each registered store: test backend -> the store's name.  A store may be run
#: on several servers (sql: SQLite and PostgreSQL).  ``test_every_registered_store_is_tested`` fails
#: when a store is added to the registry without a line here.
VARIANTS = {
    "filesystem": "filesystem",
    "memory": "memory",
    "memcached": "memcached",
    "redis": "redis",
    "redis-sentinel": "redis-sentinel",  # a primary, two replicas, three sentinels
    "redis-cluster": "redis-cluster",  # three primaries, three replicas
    "sqlite": "sql",
    "postgresql": "sql",
    "manager": "manager",  # counters in one manager process
}


def store_of(backend: str) -> type[CounterStore]:
    """The registered class of a test backend: what it declares decides what a test expects."""
    return REGISTRY[VARIANTS[backend]]


def cache_type_of(backend: str) -> str:
    """The CACHE_TYPE a test app gets: the store's own backend, or (a store chosen by COUNTER_STORE,
    whose page cache and sessions follow CACHE_TYPE) the filesystem."""
    return (store_of(backend).cache_types or ("FileSystemCache",))[0]


BACKENDS = {backend: cache_type_of(backend) for backend in VARIANTS}
#: The backends several processes may share (every store but memory).
SHARED_BACKENDS = [backend for backend in VARIANTS if store_of(backend).multi_process]
SQL_BACKENDS = [backend for backend, store in VARIANTS.items() if store == "sql"]
#: ``make stress`` sets it: the load tests that name a few stores with ``matrix`` run on every one.
FULL_MATRIX = os.environ.get("TALLY_FULL_MATRIX") == "1"


def matrix(every, *few):
    """The cases a load test runs: ``few`` of them in ``make test``, chosen so that every store is
    under several load tests, and ``every`` one in ``make stress``; ``make test`` has no time for
    the whole matrix (each case starts gunicorn and drives thousands of requests)."""
    return list(every) if FULL_MATRIX else list(few)


def pytest_unconfigure(config):
    """The test run leaves no directory behind in the temp folder (every process removes its own)."""
    if os.path.basename(SESSION_INSTANCE).startswith("tally-test-instance-"):
        shutil.rmtree(SESSION_INSTANCE, ignore_errors=True)
    if RUN_OWNER:
        shutil.rmtree(RUN_TMPDIR, ignore_errors=True)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    """Fail the run when a test left a server or a file behind: once the workers are gone (xdist
    stops them in its own hook of this name, which runs first), no process may still have the run's
    TMPDIR, and the run's folder must hold nothing but this process's instance folder.  What is
    found is listed, then killed and removed."""
    from tests.leftovers import leftover_files, leftover_processes

    if not RUN_OWNER:
        return
    processes = leftover_processes(RUN_TMPDIR)
    files = leftover_files(RUN_TMPDIR, keep={SESSION_INSTANCE})
    if processes or files:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        for line in [*processes, *files]:
            reporter.write_line(f"left behind by the run: {line}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


#: Fixtures that start servers under load (gunicorn, the development servers).
LOAD_FIXTURES = {"serve", "dev_server"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``) the tests that put real load on
    the machine run one after another on one worker, as they would without xdist, while the other
    worker runs the rest: two gunicorn load tests never compete for the two cores.  Tests marked
    ``light`` (a server started for what it answers, or for counts that are exact whatever the
    machine's load: no bound in time) run with the rest.  ``tryfirst``:
    xdist reads the group marks in its own hook of this name, so they must be set before it runs
    (set after, they were ignored, and load tests ran on both workers at once)."""
    for item in items:
        if item.get_closest_marker("light"):
            continue  # a server, but no timing under load: it may run beside the load tests
        if item.get_closest_marker("slow") or LOAD_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group("load"))
    without_ability = [item for item in items if not store_has_what_it_needs(item)]
    if without_ability:
        config.hook.pytest_deselected(items=without_ability)
        items[:] = [item for item in items if item not in without_ability]


def store_has_what_it_needs(item) -> bool:
    """A contract test marked ``needs`` (``tests.store_contract``) is collected only for the stores
    whose class declares that ability: for the others it could not fail."""
    ability = getattr(getattr(item, "function", None), "needs", None)
    backend = getattr(getattr(item, "cls", None), "backend", None)
    return ability is None or backend is None or ability[0](store_of(backend))


def pytest_collection_finish(session):
    """Stop at once when pytest-xdist ignored the groups: with pytest 9.2, xdist 3.8's ``loadgroup``
    no longer tags the node ids it schedules by (pytest-xdist #1386), and the load tests silently ran
    on both workers at once.  pyproject.toml keeps pytest below 9.2 until xdist follows."""
    config = session.config
    if not getattr(config, "workerinput", None) or not config.getvalue("loadgroup"):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") and not item.nodeid.endswith("@load"):
            raise pytest.UsageError(
                f"pytest-xdist did not put {item.nodeid} in its group: this pytest and pytest-xdist"
                " do not work together (pytest-xdist #1386); install pytest<9.2"
            )


@pytest.fixture(scope="session")
def memcached_server():
    server = Memcached("memcached").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server():
    server = Postgres().start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def redis_server():
    server = Redis().start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def manager_server():
    """One counter manager for the session, on a Unix socket in a temporary directory."""
    server = Manager().start()
    yield server
    server.remove()


@pytest.fixture(scope="session")
def sentinel_topology():
    topology = SentinelTopology().start()
    yield topology
    topology.remove()


@pytest.fixture(scope="session")
def cluster_topology():
    topology = ClusterTopology().start()
    yield topology
    topology.remove()


@pytest.fixture
def store_settings(request, tmp_path):
    """Settings for one backend, isolated per test (own directory or own key prefix)."""

    def settings_for(backend: str) -> dict:
        settings = {
            "CACHE_TYPE": BACKENDS[backend],
            "COUNTER_DIR": str(tmp_path / "counters"),
            "CACHE_DIR": str(tmp_path / "cache"),
            "COUNTER_KEY_PREFIX": f"t{uuid.uuid4().hex[:12]}:",
        }
        if backend == "memcached":
            settings["CACHE_MEMCACHED_SERVERS"] = [request.getfixturevalue("memcached_server").address]
        if backend == "manager":  # one manager for all: tests keep apart by their counter names
            settings.update(request.getfixturevalue("manager_server").settings())
        if backend == "redis":
            settings["CACHE_REDIS_URL"] = request.getfixturevalue("redis_server").url
        if backend == "redis-sentinel":
            settings["CACHE_REDIS_SENTINELS"] = request.getfixturevalue(
                "sentinel_topology"
            ).sentinel_addresses
            settings["CACHE_REDIS_SENTINEL_MASTER"] = MASTER_NAME
        if backend == "redis-cluster":
            settings["CACHE_REDIS_CLUSTER"] = request.getfixturevalue("cluster_topology").startup_nodes
        if not store_of(backend).cache_types:
            settings["COUNTER_STORE"] = VARIANTS[backend]
        if backend in SQL_BACKENDS:
            settings["SQLALCHEMY_DATABASE_URI"] = (
                f"sqlite:///{tmp_path / 'tally.db'}"
                if backend == "sqlite"
                else request.getfixturevalue("postgres_server").url
            )
        return settings

    return settings_for


def once_it_answers(call, within: float, what: str = "the store did not answer"):
    """``call()``'s result once the store answers it: a ``StoreUnavailable`` meanwhile is tried again
    every 0.1 s, for at most ``within`` seconds."""
    import time

    from tally import StoreUnavailable

    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except StoreUnavailable:
            assert time.monotonic() < deadline, f"{what} within {within} s"
            time.sleep(0.1)


def settings_env(settings: dict) -> dict[str, str]:
    """The same settings as FLASK_* environment variables, for a gunicorn subprocess."""
    import json

    return {
        f"FLASK_{key}": value if isinstance(value, str) else json.dumps(value)
        for key, value in settings.items()
    }


#: COUNTER_TIMEOUT of the demo apps tests build in the test process, unless the test (or a FLASK_ or
#: TALLY_SETTINGS setting it reads) gives its own: these tests are not about timeouts and run beside
#: the load tests (pytest-xdist), where a page cache write or a store step slower than the 0.5 s
#: default is a correct 503, not a fault (seen: a leaderboard's cache write given up under load).
#: Tests of timeouts and outages set theirs explicitly.
IN_PROCESS_TIMEOUT = 2.0


@pytest.fixture
def make_app(tmp_path, monkeypatch):
    monkeypatch.setenv("TALLY_INSTANCE_PATH", str(tmp_path / "instance"))
    from app import create_app

    apps = []

    def make(settings: dict | None = None, **extra):
        config = {"TESTING": True, "SECRET_KEY": "test-" + "k" * 40, **(settings or {}), **extra}
        if not {"FLASK_COUNTER_TIMEOUT", "TALLY_SETTINGS"} & set(os.environ):
            config.setdefault("COUNTER_TIMEOUT", IN_PROCESS_TIMEOUT)
        application = create_app(config)
        apps.append(application)
        return application

    yield make
    for application in apps:
        application.extensions["tally"].close()


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    return request.param


@pytest.fixture
def app(make_app, store_settings, backend):
    return make_app(store_settings(backend))


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


#: COUNTER_TIMEOUT of the servers a load test starts, unless the test sets its own: a race test asks
#: for every answer to be 200, and on a loaded 2-core machine a store step (a SQLite lock wait, an
#: fsync of Redis's appendfsync always) can take longer than the 0.5 s default, a correct 503 that
#: says nothing of the race (seen at 2 s too: one SQLite step of 3,000 in a fresh-clone run).  Tests of
#: timeouts and outages set theirs explicitly.
LOAD_TEST_TIMEOUT = "5.0"


def under_load(env: dict[str, str]) -> dict[str, str]:
    return {"FLASK_COUNTER_TIMEOUT": LOAD_TEST_TIMEOUT, **env}


def stop_all(servers) -> None:
    """Stop every server at once (each by its pid; gunicorn takes about a second to stop)."""
    threads = [threading.Thread(target=server.stop) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@pytest.fixture
def serve():
    """Start gunicorn servers for one test; each is stopped by its pid afterwards."""
    started: list[Gunicorn] = []

    def start(env: dict[str, str], **options) -> Gunicorn:
        server = Gunicorn(under_load(env), **options)
        started.append(server)
        return server.start()

    yield start
    stop_all(started)
