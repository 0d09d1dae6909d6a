"""Counters in one manager process (``multiprocessing.managers``) that every worker on the host talks to.

The server is a ``BaseManager`` serving one ``CounterTable``, which does every step under its own
lock: an increment is one round trip and is atomic for every process connected to it.  It needs no
memcached, Redis or database; values live in the manager's memory, and are lost with it unless a
snapshot file is configured (see ``serve``).

The client is not ``multiprocessing``'s proxy, whose connection has no timeout: a hung manager would
hang every worker.  ``ManagerCounterStore`` speaks the same protocol (the stdlib's own challenge
handshake, length-prefixed pickles) over a plain ``socket.socket`` with a deadline on every wait, so
that each call returns or fails within ``timeout`` seconds.  A connection is dropped after any failure
or timeout (a late reply can never be read as the answer to the next call), and the next call opens a
new one: a manager that is back is used again without restarting the app.  Being a real socket
object, it also cooperates with gevent once the socket module is patched.

``update_value`` never sends ``change`` to the server (that would mean unpickling a callable there):
it reads the value and a version number, runs ``change`` here, and asks the server to store the result
only if the version is still the one it read (compare-and-set, under the server's lock); a lost race is
retried, as on memcached.  Versions come from one counter of the table, so a value deleted and
written again never matches an old version; and each run of the manager starts that counter at a
fresh random 62-bit base, so a version read before a restart (a snapshot restores values, not the
versions clients hold) matches after it only with a chance of about one in 2**62 per write.

The protocol is pickle: whoever can connect and knows the key can make the manager run code.  So the
address defaults to a 0600 Unix socket in the instance folder, TCP is allowed on loopback only
(``COUNTER_MANAGER_ALLOW_REMOTE`` lifts that), and the key is generated once into a 0600 file.  Replies
are unpickled with an unpickler that builds nothing but plain data and built-in exceptions.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import io
import ipaddress
import json
import logging
import os
import pickle
import queue
import secrets
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from multiprocessing import connection as mp_connection
from multiprocessing import managers
from typing import Any

from .. import metrics
from ..errors import ConfigError, Conflict, CorruptCounter, StoreUnavailable
from ..keyfile import read_or_create
from .base import (
    INT64_MAX,
    INT64_MIN,
    VALUE_RETRIES,
    CounterStore,
    KeyLocks,
    close_idle,
    closed_by_peer,
    counter_name,
    pause_after_conflict,
)

log = logging.getLogger(__name__)

#: The default address: this Unix socket in the instance folder.
DEFAULT_SOCKET = "manager.sock"
#: The file the generated key is kept in, in the instance folder.
AUTHKEY_FILE = "manager_authkey"
#: The id the manager serves its one table under (multiprocessing's ``create`` would pick one per
#: server, costing every new connection a second connect and handshake to ask for it).
TABLE_IDENT = "tally-counters"
#: Pending connections the manager's socket queues (multiprocessing's own 16 is reached when 4
#: workers x 8 threads open their connections at once).
BACKLOG = 1024
#: Largest reply read from a manager (a ``names`` list or a shared value is far smaller).
MAX_REPLY_BYTES = 64 * 1024 * 1024
#: Expired per-client entries are dropped at most this often, on a write.
SWEEP_INTERVAL = 60.0
SNAPSHOT_FORMAT = "tally-manager-snapshot/1"

# -- addresses and keys --------------------------------------------------------------------------------


def default_address(instance_path: str) -> str:
    return os.path.join(os.path.abspath(instance_path), DEFAULT_SOCKET)


def is_unix_address(address: str) -> bool:
    return address.startswith("/")


def socket_address(address: str) -> str | tuple[str, int]:
    """What ``socket.connect``/``bind`` take: the path of a Unix socket, or ``(host, port)``."""
    if is_unix_address(address):
        return address
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def socket_family(address: str) -> socket.AddressFamily:
    if is_unix_address(address):
        return socket.AF_UNIX
    return socket.AF_INET6 if address.startswith("[") else socket.AF_INET


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_address(value: Any, instance_path: str, allow_remote: bool) -> str:
    """``COUNTER_MANAGER_ADDRESS`` as an absolute socket path or ``host:port``.

    Unset: ``manager.sock`` in the instance folder.  ``host:port`` (``[::1]:port`` for IPv6) must be on
    loopback unless ``allow_remote``.  Anything else is a Unix socket path, relative ones under the
    instance folder.  Raises ``ConfigError``.
    """
    if value is None or value == "":
        return default_address(instance_path)
    if not isinstance(value, str):
        raise ConfigError(
            f"setting COUNTER_MANAGER_ADDRESS must be a socket path or host:port; got {value!r}"
        )
    host, colon, port = value.rpartition(":")
    if colon and port.isdigit() and host and "/" not in value:
        if not 1 <= int(port) <= 65535:
            raise ConfigError(f"setting COUNTER_MANAGER_ADDRESS: port {port} is out of range")
        bare = host.strip("[]")
        if not _is_loopback(bare) and not allow_remote:
            raise ConfigError(
                f"setting COUNTER_MANAGER_ADDRESS {value!r} is not a loopback address: the manager"
                " protocol is pickle, so whoever can connect and knows the key can run code in it; use"
                " a Unix socket or 127.0.0.1, or set"
                " COUNTER_MANAGER_ALLOW_REMOTE = true on a network you trust"
            )
        return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
    return os.path.abspath(os.path.join(instance_path, value))


def load_authkey(value: Any, instance_path: str) -> bytes:
    """``COUNTER_MANAGER_AUTHKEY`` as bytes; unset: read, or create once, ``manager_authkey`` in the
    instance folder (mode 0600, written completely under a temporary name and linked into place, so
    that workers starting together all read the same whole key)."""
    if value:
        return value if isinstance(value, bytes) else str(value).encode()
    path = os.path.join(instance_path, AUTHKEY_FILE)
    key = read_or_create(path, lambda: secrets.token_hex(32)).encode()
    if len(key) < 32:
        raise ConfigError(
            f"COUNTER_MANAGER_AUTHKEY: {path} holds no usable key; delete it to have a new one generated"
        )
    return key


def manager_settings(config: Mapping[str, Any], instance_path: str) -> dict[str, Any]:
    """The manager store's resolved settings: absolute address, key bytes, absolute snapshot path."""
    snapshot = config.get("COUNTER_MANAGER_SNAPSHOT")
    return {
        "COUNTER_MANAGER_ADDRESS": resolve_address(
            config.get("COUNTER_MANAGER_ADDRESS"),
            instance_path,
            bool(config.get("COUNTER_MANAGER_ALLOW_REMOTE")),
        ),
        "COUNTER_MANAGER_AUTHKEY": load_authkey(config.get("COUNTER_MANAGER_AUTHKEY"), instance_path),
        "COUNTER_MANAGER_SNAPSHOT": (
            os.path.abspath(os.path.join(instance_path, os.fspath(snapshot))) if snapshot else None
        ),
    }


# -- the server side ------------------------------------------------------------------------------------


class CounterTable:
    """The manager's state: counters (``int``), shared values (``bytes``, with a version), each with an
    optional expiry; every method is one step under one lock.  Runs in the manager process only."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self._lock = threading.Lock()
        self.snapshot_lock = threading.Lock()  # one snapshot write at a time, in the order taken
        self._counters: dict[str, tuple[int, float | None]] = {}
        self._values: dict[str, tuple[bytes, float | None, int]] = {}
        # Versions are unique across runs too: a client may send a version it read before a restart.
        self._version = secrets.randbits(62)
        self._changes = 0
        self._closed = False
        self._next_sweep = time.monotonic() + SWEEP_INTERVAL
        self.started = time.time()
        self.snapshot_report: dict[str, Any] = {}
        if state:
            self._restore(state)

    # -- helpers, called with the lock held
    def _open(self) -> None:
        if self._closed:  # a built-in error: the client unpickles no other kind
            raise RuntimeError("the counter manager is shutting down")

    def _live_counter(self, key: str, now: float) -> tuple[int, float | None] | None:
        entry = self._counters.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= now:
            return None
        return entry

    def _live_value(self, key: str, now: float) -> tuple[bytes, float | None, int] | None:
        entry = self._values.get(key)
        if entry is not None and entry[1] is not None and entry[1] <= now:
            return None
        return entry

    def _changed(self, ttl: int | None, now: float) -> None:
        self._changes += 1
        if ttl and now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            for table in (self._counters, self._values):
                for key in [k for k, entry in table.items() if entry[1] is not None and entry[1] <= now]:
                    del table[key]

    # -- counters
    def add(self, key: str, delta: int, ttl: int | None) -> int:
        """The new value; a result outside int64 is returned without being stored (the client raises
        ``Overflow`` for it)."""
        with self._lock:
            self._open()
            now = time.monotonic()
            entry = self._live_counter(key, now)
            value = (entry[0] if entry else 0) + delta
            if INT64_MIN <= value <= INT64_MAX:
                self._counters[key] = (value, now + ttl if ttl else None)
                self._changed(ttl, now)
            return value

    def get(self, key: str, ttl: int | None) -> int:
        with self._lock:
            self._open()
            now = time.monotonic()
            entry = self._live_counter(key, now)
            if entry is None:
                return 0
            if ttl:
                self._counters[key] = (entry[0], now + ttl)
                self._changed(ttl, now)
            return entry[0]

    def set(self, key: str, value: int, ttl: int | None) -> None:
        if type(value) is not int or not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"counter values are int64; got {value!r:.40}")
        with self._lock:
            self._open()
            now = time.monotonic()
            self._counters[key] = (value, now + ttl if ttl else None)
            self._changed(ttl, now)

    def delete(self, key: str) -> bool:
        with self._lock:
            self._open()
            now = time.monotonic()
            existed = self._live_counter(key, now) is not None
            if self._counters.pop(key, None) is not None:
                self._changed(None, now)
            return existed

    # -- shared values
    def get_value(self, key: str) -> bytes | None:
        with self._lock:
            self._open()
            entry = self._live_value(key, time.monotonic())
            return None if entry is None else entry[0]

    def _store_value(self, key: str, data: bytes, ttl: int | None, now: float) -> None:
        if type(data) is not bytes:
            raise TypeError(f"shared values are bytes; got {type(data).__name__}")
        self._version += 1
        self._values[key] = (data, now + ttl if ttl else None, self._version)
        self._changed(ttl, now)

    def set_value(self, key: str, data: bytes, ttl: int | None) -> None:
        with self._lock:
            self._open()
            self._store_value(key, data, ttl, time.monotonic())

    def delete_value(self, key: str) -> bool:
        with self._lock:
            self._open()
            now = time.monotonic()
            existed = self._live_value(key, now) is not None
            if self._values.pop(key, None) is not None:
                self._changed(None, now)
            return existed

    def read_value(self, key: str) -> tuple[bytes | None, int]:
        """The bytes and their version (0: missing), for ``replace_value``."""
        with self._lock:
            self._open()
            entry = self._live_value(key, time.monotonic())
            return (None, 0) if entry is None else (entry[0], entry[2])

    def replace_value(self, key: str, version: int, data: bytes, ttl: int | None) -> bool:
        """Store ``data`` only if ``key`` still has ``version`` (0: still missing); return whether."""
        with self._lock:
            self._open()
            now = time.monotonic()
            entry = self._live_value(key, now)
            if (0 if entry is None else entry[2]) != version:
                return False
            self._store_value(key, data, ttl, now)
            return True

    # -- enumeration and facts
    def names(self, prefix: str, limit: int) -> list[str]:
        """Live shared counters under ``prefix``, without it: never per-client keys."""
        found: list[str] = []
        with self._lock:
            self._open()
            now = time.monotonic()
            for key, (_, expires) in self._counters.items():
                if len(found) >= limit:
                    break
                if key.startswith(prefix) and (expires is None or expires > now):
                    name = counter_name(key[len(prefix) :])
                    if name:
                        found.append(name)
        return found

    def health(self) -> dict[str, Any]:
        with self._lock:
            self._open()
            return {
                "pid": os.getpid(),
                "started": self.started,
                "uptime": round(time.time() - self.started, 3),
                "counters": len(self._counters),
                "values": len(self._values),
                **self.snapshot_report,
            }

    def items(self, prefix: str) -> dict[str, Any]:
        """Every entry under ``prefix``, as stored (tests compare them before and after a request)."""
        with self._lock:
            return {
                name: {k: v for k, v in table.items() if k.startswith(prefix)}
                for name, table in (("counters", self._counters), ("values", self._values))
            }

    # -- snapshots
    def state(self, closing: bool = False) -> tuple[dict[str, Any], int]:
        """A consistent copy of the live entries, expiries as wall-clock times, and the number of
        changes it includes.  ``closing``: no step is accepted after this copy."""
        with self._lock:
            if closing:
                self._closed = True
            mono, wall = time.monotonic(), time.time()

            def wall_time(expires: float | None) -> float | None:
                return None if expires is None else wall + (expires - mono)

            counters = {
                key: [value, wall_time(expires)]
                for key, (value, expires) in self._counters.items()
                if expires is None or expires > mono
            }
            values = {
                key: [base64.b64encode(data).decode("ascii"), wall_time(expires)]
                for key, (data, expires, _) in self._values.items()
                if expires is None or expires > mono
            }
            return {"format": SNAPSHOT_FORMAT, "saved": wall, "counters": counters, "values": values}, (
                self._changes
            )

    def changes(self) -> int:
        return self._changes

    def close(self) -> None:
        """Accept no more steps (they answer an error: 503 for the client)."""
        with self._lock:
            self._closed = True

    def _restore(self, state: dict[str, Any]) -> None:
        mono, wall = time.monotonic(), time.time()
        for key, (value, expires) in state["counters"].items():
            if expires is None or expires > wall:
                self._counters[key] = (value, None if expires is None else mono + (expires - wall))
        for key, (encoded, expires) in state["values"].items():
            if expires is None or expires > wall:
                self._version += 1
                data = base64.b64decode(encoded, validate=True)
                self._values[key] = (
                    data,
                    None if expires is None else mono + (expires - wall),
                    self._version,
                )


#: The table's methods clients may call.
EXPOSED = (
    "add",
    "get",
    "set",
    "delete",
    "get_value",
    "set_value",
    "delete_value",
    "read_value",
    "replace_value",
    "names",
    "health",
    "items",
)


def read_snapshot(path: str) -> dict[str, Any] | None:
    """The state saved at ``path`` (``None``: no file yet).  A file that is not a complete snapshot
    raises ``ConfigError``: starting empty would silently lose every counter in it."""
    try:
        with open(path, encoding="utf-8") as file:
            state = json.load(file)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ConfigError(f"snapshot {path} cannot be read: {error}") from None

    def number_or_none(x: Any) -> bool:
        return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))

    try:
        valid = (
            state["format"] == SNAPSHOT_FORMAT
            and all(
                isinstance(k, str) and type(v) is int and INT64_MIN <= v <= INT64_MAX and number_or_none(e)
                for k, (v, e) in state["counters"].items()
            )
            and all(
                isinstance(k, str) and isinstance(d, str) and number_or_none(e)
                for k, (d, e) in state["values"].items()
            )
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        valid = False
    if not valid:
        raise ConfigError(f"{path} is not a Tally manager snapshot; move it away to start empty")
    return state


def write_snapshot(table: CounterTable, path: str, closing: bool = False) -> int:
    """Write the table's state to ``path`` atomically (a complete temporary file, fsynced, then
    ``os.replace``): a crash leaves the previous snapshot or the new one, never a mix.  Returns the
    number of changes it includes."""
    with table.snapshot_lock:
        return _write_snapshot(table, path, closing)


def _write_snapshot(table: CounterTable, path: str, closing: bool) -> int:
    state, changes = table.state(closing)
    directory = os.path.dirname(path) or "."
    temp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            json.dump(state, file, separators=(",", ":"))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    table.snapshot_report = {"snapshot": path, "snapshot_saved": state["saved"]}
    return changes


def _snapshot_loop(table: CounterTable, path: str, interval: float, stop: threading.Event) -> None:
    written = table.changes()
    while not stop.wait(interval):
        if table.changes() == written:
            continue
        try:
            written = write_snapshot(table, path)
        except OSError as error:
            log.error("counter manager: snapshot %s not written: %s", path, error)
            table.snapshot_report = {"snapshot": path, "snapshot_error": str(error)}


class ManagerRunning(RuntimeError):
    """Another manager already serves this Unix socket."""


def _hold_socket_lock(path: str) -> int:
    """An exclusive ``flock`` on ``<socket>.lock`` for the server's life: while one manager serves a
    socket path, a second refuses to start (rather than unlink the first one's socket)."""
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ManagerRunning(f"another counter manager serves {path}") from None
    return fd


def serve(
    address: str,
    authkey: bytes,
    *,
    snapshot: str | None = None,
    snapshot_interval: float = 5.0,
    parent_pid: int | None = None,
) -> None:
    """Serve a new counter table at ``address`` until SIGTERM or SIGINT (or until ``parent_pid``, when
    given, is no longer this process's parent).  Must run in the main thread.

    A Unix socket is created with mode 0600; a stale socket file left by a manager that died is
    replaced, a live one makes this raise ``ManagerRunning``.  With ``snapshot``, the state is loaded
    from that file at start, written to it (atomically) at most every ``snapshot_interval`` seconds
    while it changes, and once more on SIGTERM/SIGINT after the last step was accepted: an orderly stop
    loses nothing; a crash (SIGKILL, power loss) loses the steps since the last write, and the counters
    restart from the snapshot's older values.  Without it, every value dies with the process.
    """
    lock_fd = None
    if is_unix_address(address):
        os.makedirs(os.path.dirname(address), exist_ok=True)
        lock_fd = _hold_socket_lock(address)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(address).st_mode):
                raise ConfigError(f"{address} exists and is not a socket")
            os.unlink(address)  # we hold the lock: no manager serves it any more
    state = read_snapshot(snapshot) if snapshot else None
    table = CounterTable(state)
    if snapshot:
        table.snapshot_report = {"snapshot": snapshot}
    old_umask = os.umask(0o177)  # the socket file is born 0600: no moment where others could connect
    try:
        server = managers.BaseManager(address=socket_address(address), authkey=authkey).get_server()
    finally:
        os.umask(old_umask)
    # multiprocessing listens with a backlog of 16, which 4 workers x 8 threads connecting at once
    # overflow; listening again only changes the queue's length.
    server.listener._listener._socket.listen(BACKLOG)
    # The table under a fixed id, as ``create`` would enter it, with a reference that is never dropped.
    server.id_to_obj[TABLE_IDENT] = (table, set(EXPOSED), None)
    server.id_to_refcount[TABLE_IDENT] = 1
    if is_unix_address(address):
        os.chmod(address, 0o600)

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(0)

    stopping = threading.Event()
    try:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        if snapshot:
            threading.Thread(
                target=_snapshot_loop, args=(table, snapshot, snapshot_interval, stopping), daemon=True
            ).start()
        if parent_pid is not None:
            threading.Thread(target=_watch_parent, args=(parent_pid, stopping), daemon=True).start()
        kept = f", snapshot {snapshot} every {snapshot_interval} s" if snapshot else ", no snapshot"
        loaded = len(state["counters"]) if state else 0
        log.info("counter manager %s serving %s (%d counters loaded%s)", os.getpid(), address, loaded, kept)
        server.serve_forever()  # returns by SystemExit, from a signal or the shutdown request
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stopping.set()
        if snapshot:
            try:
                write_snapshot(table, snapshot, closing=True)
            except OSError as error:
                log.error("counter manager: final snapshot %s not written: %s", snapshot, error)
        table.close()
        server.listener.close()  # removes the socket file
        if lock_fd is not None:
            os.close(lock_fd)
        log.info("counter manager %s stopped", os.getpid())


def _watch_parent(parent_pid: int, stopping: threading.Event) -> None:
    """Stop (as on SIGTERM) once ``parent_pid`` is no longer the parent: gunicorn's master was killed
    without stopping its manager."""
    while not stopping.wait(0.5):
        if os.getppid() != parent_pid:
            log.warning("counter manager: parent %s is gone; stopping", parent_pid)
            os.kill(os.getpid(), signal.SIGTERM)
            return


def answers(address: str, timeout: float = 1.0) -> bool:
    """Whether anything accepts connections at ``address`` (a connect only; no key needed)."""
    with socket.socket(socket_family(address)) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(socket_address(address))
        except OSError:
            return False
    return True


def spawn_server(
    address: str,
    authkey: bytes,
    *,
    snapshot: str | None = None,
    snapshot_interval: float = 5.0,
    wait: float = 15.0,
) -> subprocess.Popen | None:
    """Start a manager as a child of this process (``python -m tally.stores.manager``), in a session of
    its own (a Ctrl-C in the terminal reaches the parent, which stops it after its workers), watching
    this process: if it dies, the manager stops.  Returns once the address answers; ``None`` when
    another manager got there first (it is used instead).  The key goes through a pipe, never argv."""
    command = [sys.executable, "-m", "tally.stores.manager", address, "--parent", str(os.getpid())]
    if snapshot:
        command += ["--snapshot", snapshot, "--snapshot-interval", str(snapshot_interval)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, start_new_session=True)
    assert process.stdin is not None
    process.stdin.write(authkey.hex().encode() + b"\n")
    process.stdin.close()
    deadline = time.monotonic() + wait
    while not answers(address, timeout=0.2):
        if process.poll() is not None:
            if answers(address):
                return None
            raise RuntimeError(f"the counter manager exited with {process.returncode} before serving")
        if time.monotonic() > deadline:
            stop_server(process)
            raise RuntimeError(f"the counter manager did not serve {address} within {wait} s")
        time.sleep(0.05)
    return process


def stop_server(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM by pid (the manager writes its final snapshot), SIGKILL after ``timeout`` seconds."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout)


# -- the client side ------------------------------------------------------------------------------------

#: How many times this process's line of descent has forked: connections made before a fork stay
#: the parent's (a socket shared with it would hand each process the other's replies).
_forks = 0


def _count_fork() -> None:
    global _forks
    _forks += 1


os.register_at_fork(after_in_child=_count_fork)


class _PlainDataUnpickler(pickle.Unpickler):
    """Replies hold plain data (ints, bytes, str, lists, tuples, dicts) and, for a server-side error,
    a built-in exception; nothing else is built."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins":
            found = getattr(__import__("builtins"), name, None)
            if isinstance(found, type) and issubclass(found, Exception):
                return found
        raise pickle.UnpicklingError(f"the manager's reply holds a {module}.{name}")


class _Channel:
    """One socket to the manager, framed as ``multiprocessing.connection`` frames: a 4-byte signed
    big-endian length (-1 then 8 bytes for 2 GiB and more), then the bytes.  Every wait is capped by
    ``deadline`` (``time.monotonic``); the stdlib's challenge functions run over it."""

    def __init__(self, address: str, deadline: float) -> None:
        family = socket_family(address)
        self.deadline = deadline
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._cap()
            self.sock.connect(socket_address(address))
            if family != socket.AF_UNIX:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            self.sock.close()
            raise

    def _cap(self) -> None:
        # Past the deadline a wait is zero (the socket does not block): a reply already in the buffer
        # is still read, when this process was descheduled past its deadline, but nothing is waited for.
        self.sock.settimeout(max(self.deadline - time.monotonic(), 0.0))

    def send_bytes(self, data: bytes) -> None:
        size = len(data)
        header = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
        self._cap()
        self.sock.sendall(header + data)

    def _read_exactly(self, size: int) -> bytes:
        buffer = bytearray(size)
        view = memoryview(buffer)
        got = 0
        while got < size:
            self._cap()
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise EOFError("the counter manager closed the connection")
            got += n
        return bytes(buffer)

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        (size,) = struct.unpack("!i", self._read_exactly(4))
        if size == -1:
            (size,) = struct.unpack("!Q", self._read_exactly(8))
        if size < 0 or size > (maxlength or MAX_REPLY_BYTES):
            raise OSError(f"bad message length {size} from the counter manager")
        return self._read_exactly(size)

    def request(self, message: tuple[Any, ...]) -> Any:
        """Send one manager request and read its reply: the result; ``_ServerError`` for an error the
        manager answered."""
        self.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        kind, result = _PlainDataUnpickler(io.BytesIO(self.recv_bytes())).load()
        if kind == "#RETURN":
            return result
        if kind == "#ERROR" and isinstance(result, Exception):
            raise _ServerError(f"{type(result).__name__}: {result}")
        raise _ServerError(str(result).strip().splitlines()[-1] if result else kind)

    def authenticate(self, authkey: bytes) -> None:
        try:
            mp_connection.answer_challenge(self, authkey)  # the manager proves it knows the key ...
            mp_connection.deliver_challenge(self, authkey)  # ... and so do we
        except AssertionError:  # the stdlib asserts the challenge's form
            raise OSError("the server at this address does not speak the manager protocol") from None

    def close(self) -> None:
        self.sock.close()


class _ServerError(Exception):
    """The manager answered with an error (it is shutting down, or a bug there)."""


class _Connection:
    """A connection to the manager's table, used by one thread at a time; opened on first use and
    after any failure (connect, handshake both ways, ``accept_connection``: the manager then serves
    calls on it, each one request and one reply)."""

    def __init__(self, address: str, authkey: bytes) -> None:
        self.address = address
        self.authkey = authkey
        self._channel: _Channel | None = None

    def _open(self, deadline: float) -> None:
        channel = _Channel(self.address, deadline)
        try:
            channel.authenticate(self.authkey)
            channel.request((None, "accept_connection", ("tally-client",), {}))
        except BaseException:
            channel.close()
            raise
        self._channel = channel

    def _closed_by_server(self) -> bool:
        """The manager never speaks first: an idle connection with anything to read has reached its
        end (a restarted or stopped manager)."""
        assert self._channel is not None
        return closed_by_peer(self._channel.sock)

    def call(self, method: str, args: tuple[Any, ...], deadline: float) -> Any:
        if self._channel is not None and self._closed_by_server():
            self.close()
        try:
            if self._channel is None:
                self._open(deadline)
            assert self._channel is not None
            self._channel.deadline = deadline
            return self._channel.request((TABLE_IDENT, method, args, {}))
        except _ServerError:
            raise  # a whole reply was read: the connection is in step
        except BaseException:
            self.close()  # nothing of a broken or late exchange is ever read again
            raise

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = None


class ManagerCounterStore(CounterStore):
    """Atomic across every process of the host connected to one manager: each step is one round trip
    to the manager, done under its lock.

    Every call finishes or fails within ``timeout`` seconds (waiting for a pooled connection, connecting
    and the exchange included; ``update_value``: each of its round trips): a manager that is down, hung
    or shutting down raises ``StoreUnavailable`` (the step may or may not have been applied: nothing is
    guessed), and the next call reconnects.  Values are lost with the manager unless it keeps a
    snapshot (``serve``); ``health`` flags a manager that started after this store was built.
    """

    backend = "manager"
    multi_process = True
    combines_adds = True  # a step is a round trip: concurrent ones may share it (tally.combining)
    optimistic_updates = True  # a version check in the manager

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], instance_path: str) -> ManagerCounterStore:
        return cls(
            settings["COUNTER_MANAGER_ADDRESS"],
            settings["COUNTER_MANAGER_AUTHKEY"],
            key_prefix=settings["COUNTER_KEY_PREFIX"],
            timeout=settings["COUNTER_TIMEOUT"],
            pool_size=settings["COUNTER_POOL_SIZE"],
        )

    @classmethod
    def check_settings(
        cls, config: Mapping[str, Any], settings: Mapping[str, Any], instance_path: str
    ) -> dict[str, Any]:
        return manager_settings(config, instance_path)

    def where(self) -> str:
        return self.address

    def __init__(
        self,
        address: str,
        authkey: bytes,
        *,
        key_prefix: str = "tally:",
        timeout: float = 0.5,
        pool_size: int = 16,
    ) -> None:
        self.address = address
        self.key_prefix = key_prefix  # apps sharing one manager keep apart, as on memcached and Redis
        self.timeout = timeout
        self._authkey = authkey
        self._pool_size = pool_size
        self._built_at = time.time()
        self._update_locks = KeyLocks()
        self._reset_pool()

    def _reset_pool(self) -> None:
        self._generation = _forks
        # Last in, first out: a few threads keep reusing the same few open connections, so the manager
        # serves no more connections (a thread each) than the threads that really call at once.
        self._free: queue.LifoQueue[_Connection] = queue.LifoQueue()
        for _ in range(self._pool_size):
            self._free.put(_Connection(self.address, self._authkey))

    def _call(self, method: str, *args: Any) -> Any:
        deadline = time.monotonic() + self.timeout
        if self._generation != _forks:
            self._reset_pool()
        try:
            connection = self._free.get(timeout=self.timeout)
        except queue.Empty:
            raise StoreUnavailable(
                f"all {self._pool_size} manager connections of this process stayed busy for"
                f" {self.timeout} s; raise COUNTER_POOL_SIZE to at least the threads per worker"
            ) from None
        try:
            return connection.call(method, args, deadline)
        except (TimeoutError, BlockingIOError):  # a wait ran out; or, past the deadline, nothing to read
            raise StoreUnavailable(
                f"counter manager {self.address} did not answer within {self.timeout} s"
            ) from None
        except mp_connection.AuthenticationError as error:
            raise StoreUnavailable(
                f"counter manager {self.address}: authentication failed ({error}): the manager and"
                " the app must use the same COUNTER_MANAGER_AUTHKEY"
            ) from None
        except Exception as error:  # anything else that went wrong in the exchange: loud, never a guess
            detail = f"{type(error).__name__}: {error}"
            raise StoreUnavailable(f"counter manager {self.address}: {detail}") from None
        finally:
            self._free.put(connection)

    def _key(self, key: str) -> str:
        return self.key_prefix + key

    def _counter(self, key: str, reply: Any) -> int:
        if type(reply) is not int:
            raise CorruptCounter(f"counter {key!r}: the manager answered {reply!r:.40}, not an integer")
        return reply

    # -- the contract ------------------------------------------------------------------------------

    def add(self, key: str, delta: int, ttl: int | None = None) -> int:
        return self.check_range(self._counter(key, self._call("add", self._key(key), delta, ttl)))

    def get(self, key: str, ttl: int | None = None) -> int:
        return self._counter(key, self._call("get", self._key(key), ttl))

    def set(self, key: str, value: int, ttl: int | None = None) -> None:
        self._call("set", self._key(key), self.check_range(value), ttl)

    def delete(self, key: str) -> bool:
        return bool(self._call("delete", self._key(key)))

    def get_value(self, key: str) -> bytes | None:
        return self._call("get_value", self._key(key))

    def set_value(self, key: str, data: bytes, ttl: int | None = None) -> None:
        self._call("set_value", self._key(key), bytes(data), ttl)

    def delete_value(self, key: str) -> bool:
        return bool(self._call("delete_value", self._key(key)))

    def update_value(
        self, key: str, change: Callable[[bytes | None], bytes], ttl: int | None = None
    ) -> bytes:
        """Read the bytes and their version, run ``change`` here, and store the result only if the
        version is unchanged (compare-and-set in the manager), retried after a conflict."""
        with self._update_locks(key):
            for attempt in range(VALUE_RETRIES):
                current, version = self._call("read_value", self._key(key))
                data = bytes(change(current))
                if self._call("replace_value", self._key(key), version, data, ttl):
                    return data
                metrics.update_retried(self.backend)
                pause_after_conflict(attempt)
        raise Conflict(f"shared value {key!r} changed under {VALUE_RETRIES} attempts to update it")

    def names(self, limit: int) -> list[str]:
        """The live shared counters in the manager (at most ``limit``: a partial list when there are
        more), one round trip; ``StoreUnavailable`` as for every call."""
        return list(self._call("names", self.key_prefix, limit))

    def health(self) -> dict[str, Any]:
        report = {"address": self.address, **self._call("health")}
        if report["started"] > self._built_at + 1 and not report.get("snapshot"):
            report["restarted"] = True
            report["warning"] = (
                f"started {round(report['uptime'])} s ago, after this app, with no snapshot: the"
                " counters it held before were lost"
            )
        return report

    def items(self) -> dict[str, Any]:
        """The manager's entries under this store's prefix, as stored (for tests)."""
        return self._call("items", self.key_prefix)

    def close(self) -> None:
        """Close the idle connections; each reopens if used again."""
        close_idle(self._free)


def main(argv: list[str] | None = None) -> None:
    """``python -m tally.stores.manager ADDRESS``: the key is read as hex from the first line of stdin
    (how ``spawn_server`` passes it: argv is visible to every user)."""
    parser = argparse.ArgumentParser(prog="python -m tally.stores.manager")
    parser.add_argument("address")
    parser.add_argument("--snapshot")
    parser.add_argument("--snapshot-interval", type=float, default=5.0)
    parser.add_argument("--parent", type=int)
    options = parser.parse_args(argv)
    authkey = bytes.fromhex(sys.stdin.readline().strip())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        serve(
            options.address,
            authkey,
            snapshot=options.snapshot,
            snapshot_interval=options.snapshot_interval,
            parent_pid=options.parent,
        )
    except (ManagerRunning, ConfigError) as error:
        raise SystemExit(f"tally: {error}") from None


if __name__ == "__main__":
    main()
