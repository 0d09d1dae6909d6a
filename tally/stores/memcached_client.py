"""Connections to memcached for the counter store: pure Python (pymemcache), one command in flight per
connection, a deadline per command, and a connection thrown away after any failure.

Why not pylibmc.  Its wheels bundle libmemcached 1.0.16, whose per-connection count of expected replies
(``cursor_active_``, a uint32) can be decremented below zero; ``memcached_purge`` then loops over
``count - 1`` = 4,294,967,294 "pending" replies.  Seen here under `gunicorn -w 4 --threads 8` and 100
keep-alive clients adding to one shared set: a worker thread spun at 100 % CPU inside pylibmc's
``add`` (gdb: ``memcached_add`` > ``memcached_io_writev`` > ``memcached_purge`` >
``memcached_read_one_response``, the loop bound read from the purge frame: 4294967294), for minutes,
with the GIL released, holding the key lock that every other thread of the worker waited on, and
deaf to SIGTERM; it went on after memcached was stopped.  The same miscount desynchronises replies
from commands (a reply read as the answer to another), the likely cause of the acknowledged updates
that went missing in the same runs.  The underflow is libmemcached's (guarded upstream in
libmemcached-awesome since 2022, not in pylibmc's wheels), and nothing a caller does can bound a C
loop that holds no lock Python can break.

What this module guarantees instead, and why the state above cannot be reached:
- A connection carries one command at a time and reads its whole reply before the next is sent
  (pymemcache; Tally never uses ``noreply`` or pipelining), so no reply can be taken for another's.
- Any failure (timeout, reset, unexpected or error reply) closes the socket (pymemcache closes on
  every exception); the next command on that client opens a fresh connection.  Nothing of a broken
  exchange survives it.
- Every command, connect included, must finish by a deadline ``timeout`` seconds after it starts.
  On an open connection the socket is blocking and a watcher thread (``SocketDeadlines``) shuts it
  down if the command is still running at the deadline: the read or write in progress fails at once,
  and a server that answers a byte at a time cannot stretch the command either.  A command that must
  connect first waits only for what is left of its deadline in each socket call (``DeadlineSocket``);
  the socket is made blocking again after it.  (A socket with a timeout costs a ``poll`` before every
  read and write and an ``ioctl`` each time the timeout is set: 6 system calls an ``incr`` instead of 2.)
- All of it is Python: a stuck request is a thread blocked in a socket call with a timeout, never a
  C loop; it ends by the deadline.
"""

from __future__ import annotations

import hashlib
import queue
import socket
import threading
import time
from typing import Any

from pymemcache.client.base import Client

from .base import close_idle, closed_by_peer, forks
from .deadlines import SocketDeadlines

_deadline = threading.local()


def _remaining() -> float | None:
    """Seconds left for the command running in this thread; ``None`` outside a command."""
    at: float | None = getattr(_deadline, "at", None)
    if at is None:
        return None
    left = at - time.monotonic()
    if left <= 0:
        raise TimeoutError("memcached did not answer within the command's deadline")
    return left


class DeadlineSocket(socket.socket):
    """A socket whose every wait is capped by the deadline of the command in progress."""

    def _cap(self) -> None:
        left = _remaining()
        if left is not None:
            self.settimeout(left)

    def connect(self, address: Any) -> None:
        self._cap()
        super().connect(address)

    def sendall(self, data: Any, flags: int = 0) -> None:
        self._cap()
        super().sendall(data, flags)

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        self._cap()
        return super().recv(bufsize, flags)


class _SocketModule:
    """The ``socket`` module as pymemcache sees it, with ``DeadlineSocket`` for ``socket.socket``."""

    socket = DeadlineSocket

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)


SOCKET_MODULE = _SocketModule()


#: A connection unused for longer than this is checked for a close by the server before its next
#: command (one non-blocking peek; busy connections skip it).
IDLE_CHECK_SECONDS = 1.0


#: Every memcached connection of this process is watched by one thread.
DEADLINES = SocketDeadlines()


class PoolExhausted(Exception):
    """Every connection of this process to the server stayed in use for the whole wait."""


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class Connection:
    """One pymemcache client used by one thread at a time; each call is a command with a deadline."""

    def __init__(self, address: str, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._client = Client(
            parse_address(address),
            connect_timeout=timeout,
            timeout=None,  # blocking once connected: DEADLINES bounds each command
            no_delay=True,
            default_noreply=False,
            socket_module=SOCKET_MODULE,
        )
        self._last_used = 0.0

    def call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        """Run one pymemcache command, finished or failed (socket shut down or timed out) by the
        deadline."""
        now = time.monotonic()
        if now - self._last_used > IDLE_CHECK_SECONDS:
            self._drop_if_closed()
        self._last_used = now
        sock = self._client.sock
        if sock is None:  # connects first: each socket call capped by what is left (DeadlineSocket)
            _deadline.at = now + self.timeout
            try:
                return getattr(self._client, command)(*args, **kwargs)
            finally:
                _deadline.at = None
                self._plain_socket()
        token = DEADLINES.watch(sock.fileno(), self.timeout)
        try:
            return getattr(self._client, command)(*args, **kwargs)
        finally:
            SocketDeadlines.done(token)

    def _plain_socket(self) -> None:
        """Once connected, the client's socket becomes a plain blocking ``socket.socket`` (same
        descriptor): its reads and writes are the C methods, not ``DeadlineSocket``'s."""
        sock = self._client.sock
        if isinstance(sock, DeadlineSocket):
            plain = socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())
            plain.settimeout(None)
            self._client.sock = plain

    def _drop_if_closed(self) -> None:
        """Close a connection the server closed while it sat idle (a memcached restart), so that the
        command opens a new one instead of failing on the dead one.  memcached never speaks first: an
        idle connection that is readable has reached its end (EOF) or was reset."""
        sock = self._client.sock
        if sock is not None and closed_by_peer(sock):
            self._client.close()

    def close(self) -> None:
        self._client.close()


class ServerConnections:
    """``size`` connections of this process to one server (each opens its socket on first use).

    ``take`` waits at most ``wait`` seconds for a free one; ``give`` returns it.  A process forked
    from the one that used them gets connections of its own: a socket shared with the parent would
    hand each process the other's replies.
    """

    def __init__(self, address: str, size: int, timeout: float) -> None:
        self.address = address
        self.size = size
        self.timeout = timeout
        self._reset()

    def _reset(self) -> None:
        self._generation = forks()
        self._free: queue.SimpleQueue[Connection] = queue.SimpleQueue()
        for _ in range(self.size):
            self._free.put(Connection(self.address, self.timeout))

    def take(self, wait: float) -> Connection:
        if self._generation != forks():
            self._reset()
        try:
            return self._free.get(timeout=wait)
        except queue.Empty:
            raise PoolExhausted from None

    def give(self, connection: Connection) -> None:
        self._free.put(connection)  # after a failure its socket is closed: it reconnects when used

    def close(self) -> None:
        """Close the idle connections; each reopens if used again."""
        close_idle(self._free)


def server_for(key: str, servers: list[str]) -> str:
    """Rendezvous (highest random weight) hashing: each key lives on one server; adding a server moves
    only the keys the new server wins, and no key ever moves because a server is down."""
    if len(servers) == 1:
        return servers[0]
    return max(servers, key=lambda server: hashlib.md5(f"{server}/{key}".encode()).digest())
