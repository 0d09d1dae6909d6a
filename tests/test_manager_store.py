"""The manager store's own behaviours: where it listens and with which key, what it refuses, how it
fails (a dead or hung manager is a 503 within COUNTER_TIMEOUT, then service comes back by itself),
its snapshot, and how it is started (gunicorn's master, the `counters manager` command)."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from tally import ConfigError, StoreUnavailable
from tally.stores import manager
from tally.stores.manager import ManagerCounterStore
from tests.servers import ROOT, Manager, child_pids, process_state

TIMEOUT = 0.5
#: What a 503 may take beyond COUNTER_TIMEOUT on a loaded test machine (the bound is what matters: a
#: multiprocessing proxy would wait for ever).
SLACK = 1.0


@pytest.fixture
def own_manager():
    """Managers of the test's own (killed, paused, restarted), resumed and removed afterwards."""
    started: list[Manager] = []

    def start(**options) -> Manager:
        started.append(Manager(**options).start())
        return started[-1]

    yield start
    for server in started:
        server.resume()
        server.remove()


def settings_for(server: Manager, store_settings) -> dict:
    return {**store_settings("filesystem"), **server.settings(), "COUNTER_TIMEOUT": TIMEOUT}


def mode_of(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def timed_post(web, path: str):
    began = time.monotonic()
    response = web.post(path)
    return response, time.monotonic() - began


# -- address and key --------------------------------------------------------------------------------


def test_the_default_is_a_socket_and_a_generated_key_in_the_instance_folder(make_app, tmp_path):
    first = make_app(COUNTER_STORE="manager")
    second = make_app(COUNTER_STORE="manager")
    instance = first.instance_path
    settings = first.extensions["tally.settings"]
    assert settings["COUNTER_MANAGER_ADDRESS"] == os.path.join(instance, "manager.sock")
    key_file = os.path.join(instance, "manager_authkey")
    assert mode_of(key_file) == 0o600
    with open(key_file, "rb") as file:
        assert settings["COUNTER_MANAGER_AUTHKEY"] == file.read().strip()
    assert len(settings["COUNTER_MANAGER_AUTHKEY"]) == 64  # created once, read by every app after
    assert (
        second.extensions["tally.settings"]["COUNTER_MANAGER_AUTHKEY"] == settings["COUNTER_MANAGER_AUTHKEY"]
    )


def test_the_socket_is_0600_and_a_second_manager_on_it_refuses_to_start(own_manager):
    server = own_manager()
    assert stat.S_ISSOCK(os.stat(server.socket_path).st_mode)
    assert mode_of(server.socket_path) == 0o600
    second = subprocess.run(
        [sys.executable, "-m", "tally.stores.manager", server.socket_path],
        input=b"00" * 32 + b"\n",
        capture_output=True,
        timeout=30,
        cwd=ROOT,
    )
    assert second.returncode != 0 and b"another counter manager serves" in second.stderr
    store = ManagerCounterStore(server.address, server.authkey.encode(), timeout=TIMEOUT)
    assert store.add("still-served", 1) == 1  # the first one was left alone
    store.close()


@pytest.mark.parametrize(
    ("address", "resolved"),
    [
        ("127.0.0.1:7777", "127.0.0.1:7777"),
        ("localhost:7777", "localhost:7777"),
        ("[::1]:7777", "[::1]:7777"),
        ("sockets/counters.sock", "{instance}/sockets/counters.sock"),
        ("/run/tally/counters.sock", "/run/tally/counters.sock"),
    ],
)
def test_loopback_and_socket_addresses_are_accepted(make_app, address, resolved):
    app = make_app(COUNTER_STORE="manager", COUNTER_MANAGER_ADDRESS=address)
    expected = resolved.format(instance=app.instance_path)
    assert app.extensions["tally.settings"]["COUNTER_MANAGER_ADDRESS"] == expected


@pytest.mark.parametrize(
    "address", ["10.1.2.3:7777", "0.0.0.0:7777", "example.com:7777", "[2001:db8::1]:7777"]
)
def test_other_addresses_are_refused_unless_remote_is_allowed(make_app, address):
    with pytest.raises(ConfigError, match="not a loopback address.*pickle"):
        make_app(COUNTER_STORE="manager", COUNTER_MANAGER_ADDRESS=address)
    app = make_app(
        COUNTER_STORE="manager", COUNTER_MANAGER_ADDRESS=address, COUNTER_MANAGER_ALLOW_REMOTE=True
    )
    assert app.extensions["tally"].address == address


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("COUNTER_MANAGER_AUTHKEY", "short", "at least 16 characters"),
        ("COUNTER_MANAGER_AUTHKEY", 12345678901234567890, "at least 16 characters"),
        ("COUNTER_MANAGER_ALLOW_REMOTE", "yes", "true or false"),
        ("COUNTER_MANAGER_ADDRESS", 7777, "socket path or host:port"),
        ("COUNTER_MANAGER_ADDRESS", "127.0.0.1:70000", "out of range"),
        ("COUNTER_MANAGER_SNAPSHOT_INTERVAL", 0, "seconds > 0"),
    ],
)
def test_bad_manager_settings_fail_at_start_up_naming_the_key(make_app, key, value, message):
    with pytest.raises(ConfigError, match=message) as raised:
        make_app(COUNTER_STORE="manager", **{key: value})
    assert key in str(raised.value)


def test_a_wrong_key_is_a_503_whose_log_line_names_the_setting(own_manager, make_app, store_settings, caplog):
    server = own_manager()
    app = make_app({**settings_for(server, store_settings), "COUNTER_MANAGER_AUTHKEY": "k" * 40})
    with caplog.at_level(logging.ERROR):
        response = app.test_client().post("/api/counters/k/incr")
    assert response.status_code == 503
    assert response.get_json()["detail"] == StoreUnavailable.public_message  # no path for the client
    assert any("COUNTER_MANAGER_AUTHKEY" in record.getMessage() for record in caplog.records)


# -- failures -----------------------------------------------------------------------------------------


def test_a_killed_manager_is_a_503_within_the_timeout_and_a_restarted_one_serves_again(
    own_manager, make_app, store_settings
):
    server = own_manager()
    web = make_app(settings_for(server, store_settings)).test_client()
    assert web.post("/api/counters/k/incr").get_json()["value"] == 1
    server.crash()  # SIGKILL: the socket file stays behind, nobody accepts on it
    response, took = timed_post(web, "/api/counters/k/incr")
    assert response.status_code == 503 and took < TIMEOUT + SLACK
    assert web.get("/healthz").status_code == 503
    server.start()  # replaces the stale socket
    # No snapshot: the counter starts again from zero, as on a restarted memcached.
    assert web.post("/api/counters/k/incr").get_json()["value"] == 1
    assert web.get("/healthz").status_code == 200


def test_a_hung_manager_is_a_503_within_the_timeout_and_its_late_reply_is_never_read(
    own_manager, make_app, store_settings
):
    server = own_manager()
    app = make_app(settings_for(server, store_settings))
    web = app.test_client()
    assert web.post("/api/counters/h/incr").get_json()["value"] == 1
    server.pause()  # SIGSTOP: connections are accepted by the kernel, nothing answers
    response, took = timed_post(web, "/api/counters/h/incr")
    assert response.status_code == 503 and took < TIMEOUT + SLACK
    fresh = make_app(settings_for(server, store_settings)).test_client()  # connects during the hang
    response, took = timed_post(fresh, "/api/counters/h/incr")
    assert response.status_code == 503 and took < TIMEOUT + SLACK
    server.resume()
    # The manager may now apply the steps it had received: the answer to the next step is its own,
    # never the late reply to one that timed out.
    value = web.post("/api/counters/h/incr").get_json()["value"]
    assert value in (2, 3, 4)
    assert web.get("/api/counters/h").get_json()["value"] == value


def test_a_stopped_manager_answers_no_step_after_its_final_snapshot(own_manager):
    server = own_manager(snapshot=True, snapshot_interval=60)
    store = ManagerCounterStore(server.address, server.authkey.encode(), timeout=TIMEOUT)
    for _ in range(5):
        store.add("n", 1)
    store.set_value("v", b'{"a":1}')
    store.add("@0123456789abcdef0123456789abcdef.n", 2, 3600)
    server.stop()  # SIGTERM: the final snapshot holds every acknowledged step
    assert mode_of(server.snapshot) == 0o600
    assert not os.path.exists(server.socket_path)
    with pytest.raises(StoreUnavailable):
        store.get("n")
    server.start()
    assert store.get("n") == 5
    assert store.get_value("v") == b'{"a":1}'
    assert store.get("@0123456789abcdef0123456789abcdef.n") == 2
    store.close()


def test_a_crash_keeps_what_the_last_snapshot_holds(own_manager):
    server = own_manager(snapshot=True, snapshot_interval=0.2)
    store = ManagerCounterStore(server.address, server.authkey.encode(), timeout=TIMEOUT)
    assert store.add("c", 10) == 10
    time.sleep(1.0)  # several intervals: a snapshot with 10 was written
    server.crash()
    server.start()
    assert store.get("c") == 10
    store.close()


def test_a_version_read_before_a_restart_never_matches_after_it(own_manager):
    """A worker reads a value and its version, the manager restarts from its snapshot, other workers
    write the value again and again, and only then does the worker's compare-and-set arrive: it must
    be refused, whatever number of writes came between (versions once started again from 1 at every
    restart, so the stale write matched a newer value that had reached the same number)."""
    server = own_manager(snapshot=True, snapshot_interval=60)
    store = ManagerCounterStore(server.address, server.authkey.encode(), timeout=TIMEOUT)
    key = store.key_prefix + "v"
    store.set_value("v", b"1")
    store.set_value("v", b"2")
    data, version = store._call("read_value", key)  # the step update_value begins with
    assert data == b"2"
    server.stop()  # the final snapshot holds b"2"
    server.start()
    for n in range(1000):  # bounded: a version from the last run must never come round again
        if store._call("read_value", key)[1] == version:
            break
        store.set_value("v", str(3 + n).encode())
    newest = store.get_value("v")
    assert store._call("replace_value", key, version, b"stale", None) is False
    assert store.get_value("v") == newest
    store.close()


def test_a_damaged_snapshot_stops_the_manager_rather_than_starting_empty(own_manager):
    server = own_manager(snapshot=True)
    server.stop()
    with open(server.snapshot, "w") as file:
        file.write('{"format": "something else"}')
    with pytest.raises(RuntimeError, match="not a Tally manager snapshot"):
        server.start()


def test_a_forked_child_uses_connections_of_its_own(own_manager):
    server = own_manager()
    store = ManagerCounterStore(server.address, server.authkey.encode(), timeout=TIMEOUT)
    assert store.add("f", 1) == 1  # the parent's pooled connection is open now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            for _ in range(50):
                store.add("f", 1)
        except BaseException:
            code = 1
        os._exit(code)
    for _ in range(50):
        store.add("f", 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert store.get("f") == 101
    store.close()


# -- starting it --------------------------------------------------------------------------------------


def test_gunicorn_starts_a_manager_at_the_default_socket_and_stops_it_on_exit(serve, tmp_path):
    instance = str(tmp_path / "instance")
    server = serve(
        {"FLASK_COUNTER_STORE": "manager", "FLASK_CACHE_DIR": str(tmp_path / "cache")},
        workers=2,
        threads=2,
        instance_path=instance,
    )
    managers_started = [
        pid for pid in child_pids(server.process.pid) if b"tally.stores.manager" in _cmdline(pid)
    ]
    assert len(managers_started) == 1
    socket_path = os.path.join(instance, "manager.sock")
    assert mode_of(socket_path) == 0o600
    values = []
    for _ in range(6):  # new connections: the workers share the manager's counter
        request = urllib.request.Request(f"{server.url}/api/counters/g/incr", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            values.append(json.loads(response.read())["value"])
    assert values == [1, 2, 3, 4, 5, 6]
    server.stop()
    deadline = time.monotonic() + 10
    while process_state(managers_started[0]) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_state(managers_started[0]) is None
    assert not os.path.exists(socket_path)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return b""


def test_gunicorn_uses_a_manager_that_already_serves_the_socket(serve, tmp_path):
    instance = str(tmp_path / "instance")
    env = {
        **os.environ,
        "TALLY_INSTANCE_PATH": instance,
        "FLASK_COUNTER_STORE": "manager",
        "FLASK_CACHE_DIR": str(tmp_path / "cache"),
    }
    foreground = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "app", "counters", "manager"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_for(lambda: manager.answers(os.path.join(instance, "manager.sock")), foreground)
        server = serve(
            {"FLASK_COUNTER_STORE": "manager", "FLASK_CACHE_DIR": str(tmp_path / "cache")},
            workers=2,
            threads=2,
            instance_path=instance,
        )
        assert not [pid for pid in child_pids(server.process.pid) if b"tally.stores.manager" in _cmdline(pid)]
        request = urllib.request.Request(f"{server.url}/api/counters/cli/incr", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
        server.stop()
        assert foreground.poll() is None  # gunicorn did not stop what it had not started
    finally:
        if foreground.poll() is None:
            os.kill(foreground.pid, signal.SIGTERM)
        _, errors = foreground.communicate(timeout=15)
    assert foreground.returncode == 0, errors
    assert not os.path.exists(os.path.join(instance, "manager.sock"))


def _wait_for(ready, process: subprocess.Popen, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not ready():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the manager did not start"
        time.sleep(0.05)


def test_the_manager_command_refuses_another_store(runner):
    result = runner.invoke(args=["counters", "manager"])
    assert result.exit_code != 0
    assert 'COUNTER_STORE is not "manager"' in result.output


@pytest.fixture(params=["filesystem"])
def backend(request):  # `runner` above: an app on the filesystem store
    return request.param


GEVENT_SCRIPT = """
from gevent import monkey; monkey.patch_all()
import sys, time, gevent
from tally import StoreUnavailable
from tally.stores.manager import ManagerCounterStore
store = ManagerCounterStore(sys.argv[1], sys.argv[2].encode(), timeout=0.5)
ticks = []
ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.01)) for _ in range(1000)])
def step():
    began = time.monotonic()
    try:
        store.add("g", 1)
    except StoreUnavailable:
        return time.monotonic() - began
waits = [job.value for job in gevent.joinall([gevent.spawn(step) for _ in range(5)])]
ticker.kill()
print(max(waits), len(ticks))
"""


def test_under_gevent_a_hung_manager_blocks_one_greenlet_not_the_hub(own_manager):
    """The client's socket is gevent's once patched: five greenlets wait out their deadlines together,
    and another greenlet keeps running meanwhile."""
    pytest.importorskip("gevent")
    server = own_manager()
    server.pause()
    result = subprocess.run(
        [sys.executable, "-c", GEVENT_SCRIPT, server.address, server.authkey],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    longest_wait, ticks = result.stdout.split()
    assert float(longest_wait) < TIMEOUT + SLACK  # together, not one after the other (2.5 s)
    assert int(ticks) >= 10  # 10 ms ticks ran during the waits: the hub was free


def _in_four_processes(step) -> None:
    """Run ``step`` 300 times in each of four forked processes at once."""
    children = []
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 0
            try:
                for _ in range(300):
                    step()
            except BaseException:
                code = 1
            os._exit(code)
        children.append(pid)
    for pid in children:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


def test_a_step_done_in_the_manager_is_exact_and_a_get_then_set_through_it_loses_updates(own_manager):
    """What the seed's `multiprocessing.Manager` answer needs: `counts[k] += 1` on a manager's dict is
    a read then a write, two calls, and loses updates between processes; the store's `add` is one step
    under the manager's lock."""
    server = own_manager()
    store = ManagerCounterStore(server.address, server.authkey.encode(), timeout=5)
    _in_four_processes(lambda: store.add("exact", 1))
    _in_four_processes(lambda: store.set("naive", store.get("naive") + 1))
    assert store.get("exact") == 1200
    assert store.get("naive") < 1200
    store.close()
