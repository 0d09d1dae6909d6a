"""The client-side deadline of a call on a blocking socket (every PostgreSQL call, every memcached
command on an open connection): ``SocketDeadlines`` shuts down the socket of a call still running at
its deadline (one daemon thread per process), so that a hung server, which answers nothing, not even
its own timeout, fails the call at once instead of holding it.  The socket itself stays blocking:
no timeout set and no ``poll`` before each read and write.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import deque

from .base import forks


class Watched:
    """One call being watched: its socket's descriptor, and whether it is still running."""

    __slots__ = ("fd", "running")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.running = True


#: Lengths of watch within 1/LINES_PER_SECOND s of each other share a line.
LINES_PER_SECOND = 100


class SocketDeadlines:
    """Shuts down the socket of a call still running at its deadline (one daemon thread).

    ``watch(fd, seconds)`` before the call, ``done(token)`` after it.  Calls watched for the same
    length of time reach their deadlines in the order they start, so each length (to within
    1/``LINES_PER_SECOND`` s: a PostgreSQL call is watched for what is left of its budget) has a
    first-in-first-out line, and the watcher sleeps until the earliest deadline at the front of the
    lines; a deadline behind a later one in its line is kept at most that much late.  A call that
    ends in time costs an append and a flag, no lock: the watcher is woken only when it sleeps with
    nothing to watch, or for a new line (at most ``LINES_PER_SECOND`` per second of the longest
    timeout).  The shutdown makes the driver's next read or write fail at once, whatever the
    server is doing; the connection is then discarded.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._lines: dict[int, deque[tuple[float, Watched]]] = {}
        self._idle = False  # the watcher sleeps until notified (set before it looks at the lines)
        self._generation = -1

    def watch(self, fd: int, seconds: float) -> Watched:
        token = Watched(fd)
        if self._generation != forks():
            self._start()
        length = int(seconds * LINES_PER_SECOND)
        line = self._lines.get(length)
        if line is None:
            with self._condition:
                self._lines.setdefault(length, deque()).append((time.monotonic() + seconds, token))
                self._condition.notify()
            return token
        line.append((time.monotonic() + seconds, token))
        if self._idle:
            with self._condition:
                self._condition.notify()
        return token

    @staticmethod
    def done(token: Watched) -> None:
        token.running = False

    def _start(self) -> None:
        """The watcher thread, on first use and again in a forked child (the parent's stayed there)."""
        with self._condition:
            if self._generation == forks():
                return
            self._lines = {}
            self._idle = False
            threading.Thread(target=self._run, name="tally-deadlines", daemon=True).start()
            self._generation = forks()

    def _run(self) -> None:
        with self._condition:
            while True:
                self._idle = True  # before looking: a call appended after the look will notify
                now = time.monotonic()
                fronts = []
                for line in list(self._lines.values()):
                    while line and (not line[0][1].running or line[0][0] <= now):
                        _, token = line.popleft()
                        if token.running:
                            _shut_down(token.fd)
                    if line:
                        fronts.append(line[0][0])
                if not fronts:
                    self._condition.wait()
                    continue
                self._idle = False
                self._condition.wait(min(fronts) - now)


def _shut_down(fd: int) -> None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()  # the driver still owns the descriptor and closes it
