"""The client's half of the manager protocol, without ``multiprocessing``'s proxies (their connection
has no timeout): ``_Channel`` frames messages as ``multiprocessing.connection`` does, over a plain
socket with a deadline on every wait; replies are unpickled by ``_PlainDataUnpickler``, which builds
plain data and built-in exceptions only; ``_Connection`` is one authenticated connection to the table,
closed after any failure so that a late reply is never read as the answer to the next call.
"""

from __future__ import annotations

import io
import pickle
import socket
import struct
import time
from multiprocessing import connection as mp_connection
from typing import Any, cast

from ..base import closed_by_peer
from .settings import socket_address, socket_family
from .table import TABLE_IDENT

#: Largest reply read from a manager (a ``names`` list or a shared value is far smaller).
MAX_REPLY_BYTES = 64 * 1024 * 1024


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
        # The challenge functions call nothing but send_bytes and recv_bytes, which this channel has;
        # typeshed types their argument as a multiprocessing connection.
        connection = cast(mp_connection.Connection, self)
        try:
            mp_connection.answer_challenge(connection, authkey)  # the manager proves it knows the key ...
            mp_connection.deliver_challenge(connection, authkey)  # ... and so do we
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
