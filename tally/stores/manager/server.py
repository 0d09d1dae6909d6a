"""The manager process: ``serve`` runs a table behind ``multiprocessing``'s server on a 0600 Unix
socket (or loopback TCP), refuses to start where another manager already serves (an ``flock`` on
``<socket>.lock``) and writes snapshots while it changes and once more at stop; ``spawn_server`` and
``stop_server`` run one as a child (gunicorn's master does), ``answers`` tells whether anything serves
an address, and ``main`` is ``python -m tally.stores.manager``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from multiprocessing import managers
from typing import Any, Protocol, cast

from ...errors import ConfigError
from .settings import is_unix_address, socket_address, socket_family
from .table import EXPOSED, TABLE_IDENT, CounterTable, read_snapshot, write_snapshot

log = logging.getLogger(__name__)


class _Server(Protocol):
    """What ``serve`` uses of ``multiprocessing.managers.Server``, beyond what typeshed declares: its
    listener, and the tables of served objects and their reference counts (entries as ``create``
    makes them: the object, its exposed methods, and a map of methods to proxy types)."""

    listener: Any  # multiprocessing.connection.Listener
    id_to_obj: dict[str, tuple[Any, set[str], dict[str, str]]]
    id_to_refcount: dict[str, int]

    def serve_forever(self) -> None: ...


#: Pending connections the manager's socket queues (multiprocessing's own 16 is reached when 4
#: workers x 8 threads open their connections at once).
BACKLOG = 1024


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
        manager = managers.BaseManager(address=socket_address(address), authkey=authkey)
        server = cast(_Server, manager.get_server())
    finally:
        os.umask(old_umask)
    # multiprocessing listens with a backlog of 16, which 4 workers x 8 threads connecting at once
    # overflow; listening again only changes the queue's length.
    server.listener._listener._socket.listen(BACKLOG)
    # The table under a fixed id, as ``create`` would enter it, with a reference that is never dropped.
    server.id_to_obj[TABLE_IDENT] = (table, set(EXPOSED), {})  # {}: no method returns a proxy
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
) -> subprocess.Popen[bytes] | None:
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


def stop_server(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
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
