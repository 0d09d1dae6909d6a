"""The client-side deadline of every PostgreSQL call: ``SocketDeadlines`` shuts down the socket of a
call still running at its deadline (one daemon thread per process), so that a hung server, which
answers nothing, not even its own timeout, fails the call at once instead of holding it.
"""

from __future__ import annotations

import heapq
import os
import socket
import threading
import time


class Watched:
    """One call being watched: its socket's descriptor, and whether it is still running."""

    __slots__ = ("fd", "running")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.running = True


class SocketDeadlines:
    """Shuts down the socket of a database call still running at its deadline (one daemon thread).

    ``watch(fd, seconds)`` before the call, ``done(token)`` after it; a call that ends in time costs a
    heap push and a flag.  The shutdown makes the driver's next read or write fail at once, whatever
    the server is doing; the connection is then discarded.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, Watched]] = []
        self._sequence = 0
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    def watch(self, fd: int, seconds: float) -> Watched:
        token = Watched(fd)
        with self._condition:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._heap = []
                self._thread = threading.Thread(target=self._run, name="tally-sql-deadlines", daemon=True)
                self._thread.start()
            self._sequence += 1
            heapq.heappush(self._heap, (time.monotonic() + seconds, self._sequence, token))
            if self._heap[0][2] is token:
                self._condition.notify()
        return token

    @staticmethod
    def done(token: Watched) -> None:
        token.running = False

    def _run(self) -> None:
        with self._condition:
            while True:
                while self._heap and not self._heap[0][2].running:
                    heapq.heappop(self._heap)  # finished in time
                if not self._heap:
                    self._condition.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._condition.wait(wait)
                    continue
                _, _, token = heapq.heappop(self._heap)
                if token.running:
                    _shut_down(token.fd)


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
