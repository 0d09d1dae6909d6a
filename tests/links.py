"""``Link``: a loopback TCP proxy of the tests' own that stands for the network between a client and
a server, so that a test can slow it down or cut it (a partition) and heal it again.

- ``delay``: each chunk a client sends is held that long before it is forwarded (replies pass at
  once), so every request-reply round trip through the link costs at least ``delay``.  Used to tell
  a client that waits cooperatively under gevent from one that blocks the hub, and to give a store
  the latency of another host.
- ``cut()``: a partition, as a pulled cable: nothing crosses in either direction, and neither end is
  told (no reset, no FIN); each finds out only by its own timeouts.  A new connection is accepted
  but reaches nothing.  What was sent meanwhile waits in the link, as TCP retransmits it.
- ``heal()``: what waited is delivered and traffic flows again, as after a short partition.
- ``reset()``: every connection through the link is closed at both ends and what waited in it is
  dropped: what a partition that outlived TCP's retransmissions, or a crash, leaves.

Only 127.0.0.1; threads of the process that starts it; ``stop`` closes every socket.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from tests.servers import HOST, free_port


class Link:
    def __init__(self, upstream: str, delay: float = 0.0) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.delay = delay
        self.port = free_port()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._open = threading.Event()  # set: traffic flows; clear: cut
        self._open.set()
        self._generation = 0  # bumped by reset: a pump of an older one drops what it holds
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> Link:
        self._listener = socket.create_server((HOST, self.port))
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def cut(self) -> None:
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def reset(self) -> None:
        with self._lock:
            self._generation += 1
            sockets, self._sockets = self._sockets, []
        _close(sockets)

    def stop(self) -> None:
        self._stopped = True
        self._open.set()
        with self._lock:
            self._generation += 1
            sockets, self._sockets = self._sockets, []
            listener, self._listener = self._listener, None
        _close([*sockets, *([listener] if listener else [])])

    def _wait_open(self, generation: int) -> bool:
        """Until the link is not cut; False when it was reset or stopped meanwhile."""
        while not self._open.wait(0.05):
            if self._generation != generation or self._stopped:
                return False
        return self._generation == generation and not self._stopped

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        with self._lock:
            generation = self._generation
            self._sockets.append(client)
        if not self._wait_open(generation):  # a connection made during a cut reaches nothing
            _close([client])
            return
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            _close([client])
            return
        server.settimeout(None)
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if generation != self._generation:
                _close([client, server])
                return
            self._sockets.append(server)
        for args in ((client, server, self.delay, generation), (server, client, 0.0, generation)):
            threading.Thread(target=self._pump, args=args, daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, delay: float, generation: int) -> None:
        try:
            while data := source.recv(65536):
                if delay:
                    time.sleep(delay)
                if not self._wait_open(generation):
                    return  # reset while this chunk waited: it is dropped
                target.sendall(data)
        except OSError:
            pass
        finally:
            _close([source, target], shutdown_only=True)


def _close(sockets: list[socket.socket], shutdown_only: bool = False) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        if not shutdown_only:
            sock.close()
