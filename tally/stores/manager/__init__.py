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

The package's modules: ``settings`` (the address and the key), ``table`` (the state, in the manager
process, and its snapshots), ``server`` (running a manager), ``protocol`` (the client's connection)
and ``store`` (``ManagerCounterStore``).  Every name callers use is importable from the package
itself; importing it registers the store.
"""

from __future__ import annotations

from .protocol import MAX_REPLY_BYTES
from .server import BACKLOG, ManagerRunning, answers, main, serve, spawn_server, stop_server
from .settings import (
    AUTHKEY_FILE,
    DEFAULT_SOCKET,
    default_address,
    is_unix_address,
    load_authkey,
    manager_settings,
    resolve_address,
    socket_address,
    socket_family,
)
from .store import ManagerCounterStore
from .table import (
    EXPOSED,
    SNAPSHOT_FORMAT,
    SWEEP_INTERVAL,
    TABLE_IDENT,
    CounterTable,
    read_snapshot,
    write_snapshot,
)

__all__ = [
    "AUTHKEY_FILE",
    "BACKLOG",
    "DEFAULT_SOCKET",
    "EXPOSED",
    "MAX_REPLY_BYTES",
    "SNAPSHOT_FORMAT",
    "SWEEP_INTERVAL",
    "TABLE_IDENT",
    "CounterTable",
    "ManagerCounterStore",
    "ManagerRunning",
    "answers",
    "default_address",
    "is_unix_address",
    "load_authkey",
    "main",
    "manager_settings",
    "read_snapshot",
    "resolve_address",
    "serve",
    "socket_address",
    "socket_family",
    "spawn_server",
    "stop_server",
    "write_snapshot",
]
