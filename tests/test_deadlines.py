"""``SocketDeadlines``: the watcher that bounds every PostgreSQL call and every memcached command on
an open connection, tried on socket pairs: a blocked read ends at its deadline, whatever lengths of
deadline are mixed and whether the watcher was idle; a call that ended in time is left alone."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest

from tally.stores.deadlines import SocketDeadlines

SLACK = 0.4  # the watcher's own wake-up on a busy machine


@pytest.fixture
def pairs():
    made: list[socket.socket] = []

    def make() -> tuple[socket.socket, socket.socket]:
        pair = socket.socketpair()
        made.extend(pair)
        pair[0].settimeout(10)  # bounded: a watcher that never fires fails the test, it never hangs
        return pair

    yield make
    for sock in made:
        sock.close()


def blocked_read_ends(sock: socket.socket) -> float:
    """Seconds until a read of ``sock`` (nothing will be sent) ends: EOF or an error."""
    began = time.monotonic()
    with contextlib.suppress(OSError):
        assert sock.recv(1) == b""
    return time.monotonic() - began


def test_a_blocked_read_ends_at_its_deadline(pairs):
    deadlines = SocketDeadlines()
    mine, _ = pairs()
    token = deadlines.watch(mine.fileno(), 0.3)
    took = blocked_read_ends(mine)
    SocketDeadlines.done(token)
    assert 0.25 <= took < 0.3 + SLACK


def test_a_short_deadline_behind_a_long_one_still_ends_on_time(pairs):
    """Calls of another length have a line of their own; the watcher sleeps to the earliest front."""
    deadlines = SocketDeadlines()
    long_one, _ = pairs()
    short_one, _ = pairs()
    long_token = deadlines.watch(long_one.fileno(), 30.0)
    token = deadlines.watch(short_one.fileno(), 0.3)
    assert blocked_read_ends(short_one) < 0.3 + SLACK
    SocketDeadlines.done(token)
    SocketDeadlines.done(long_token)


def test_a_call_after_the_watcher_went_idle_is_watched(pairs):
    deadlines = SocketDeadlines()
    first, _ = pairs()
    SocketDeadlines.done(deadlines.watch(first.fileno(), 0.3))
    time.sleep(0.6)  # its deadline passed: the watcher has nothing left and sleeps until told
    second, _ = pairs()
    token = deadlines.watch(second.fileno(), 0.3)
    assert blocked_read_ends(second) < 0.3 + SLACK
    SocketDeadlines.done(token)


def test_a_call_that_ended_in_time_keeps_its_socket(pairs):
    deadlines = SocketDeadlines()
    mine, theirs = pairs()
    SocketDeadlines.done(deadlines.watch(mine.fileno(), 0.2))
    time.sleep(0.5)
    theirs.sendall(b"x")
    assert mine.recv(1) == b"x"  # not shut down


def test_watches_for_what_is_left_of_a_budget_share_a_few_lines():
    """A PostgreSQL call is watched for what is left of its budget, a slightly different length each
    time: they share lines (to within 1/LINES_PER_SECOND s), so the lines stay few and watching
    takes no lock (one line per distinct length grew without bound: 11.6 us a watch, measured)."""
    deadlines = SocketDeadlines()
    for i in range(2000):
        SocketDeadlines.done(deadlines.watch(7, 0.5 - i * 1e-6))
    assert len(deadlines._lines) <= 2
