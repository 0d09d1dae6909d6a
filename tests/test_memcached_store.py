"""The memcached store on real servers: one or two of them, failing and coming back."""

from __future__ import annotations

import os
import threading
import time

import pylibmc
import pytest

from tally import CorruptCounter, Overflow, StoreUnavailable
from tally.stores.memcached import FAST_STEP_MAX, OFFSET, MemcachedCounterStore
from tally.stores.memcached_client import IDLE_CHECK_SECONDS, parse_address
from tests.servers import Memcached

KEYS = [f"k{i}" for i in range(40)]


@pytest.fixture
def two_servers():
    servers = [Memcached("memcached").start(), Memcached("memcached").start()]
    yield servers
    for server in servers:
        server.stop()


def where(servers: list[Memcached], key: str) -> list[str]:
    """The servers whose memory holds ``key`` (asked one by one, with plain clients)."""
    found = []
    for server in servers:
        client = pylibmc.Client([server.address])
        if client.get(key) is not None:
            found.append(server.address)
        client.disconnect_all()
    return found


def wait_until_reachable(store: MemcachedCounterStore, keys: list[str], within: float = 10.0) -> float:
    """Seconds until every key reads again (each pooled client retries a failed server after
    ``retry_timeout`` on its own clock); fails the test past ``within``."""
    began = time.monotonic()
    while True:
        try:
            for key in keys:
                store.get(key)
            return time.monotonic() - began
        except StoreUnavailable:
            assert time.monotonic() - began < within, "memcached came back but the store did not"
            time.sleep(0.1)


def test_counters_spread_over_two_servers_and_each_is_exact(two_servers):
    store = MemcachedCounterStore([s.address for s in two_servers], key_prefix="spread:")
    results: dict[str, list[int]] = {key: [] for key in KEYS}
    lock = threading.Lock()

    def work() -> None:
        for key in KEYS:
            mine = [store.add(key, 1) for _ in range(25)]
            with lock:
                results[key].extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for key in KEYS:
        assert sorted(results[key]) == list(range(1, 101)), key
    homes = {key: where(two_servers, f"spread:{key}") for key in KEYS}
    assert all(len(home) == 1 for home in homes.values())  # each counter lives on one server
    assert {home[0] for home in homes.values()} == {s.address for s in two_servers}


def test_a_dead_server_is_not_replaced_by_another_one(two_servers):
    """Ejecting it would send its counters to the other server, where they would restart at 0."""
    first, second = two_servers
    store = MemcachedCounterStore([first.address, second.address], key_prefix="eject:")
    for key in KEYS:
        store.add(key, 10)
    on_first = [key for key in KEYS if where(two_servers, f"eject:{key}") == [first.address]]
    on_second = [key for key in KEYS if key not in on_first]
    assert on_first and on_second
    first.pause()
    try:
        for _ in range(3):  # well past any failure limit
            for key in on_first[:3]:
                with pytest.raises(StoreUnavailable):
                    store.add(key, 1)
        for key in on_second:
            assert store.add(key, 1) == 11
        assert all(where([second], f"eject:{key}") == [] for key in on_first)
    finally:
        first.resume()
    wait_until_reachable(store, on_first)
    values = {store.get(key) for key in on_first}
    assert values <= set(range(10, 20)), values  # kept; steps that timed out may have landed


def test_an_unreachable_server_fails_fast_and_service_returns(memcached_server):
    store = MemcachedCounterStore([memcached_server.address], key_prefix="pause:", timeout=0.3)
    assert store.add("p", 1) == 1
    memcached_server.pause()
    try:
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.add("p", 1)
        assert time.monotonic() - began < 0.3 + 0.7  # the command's deadline, not the OS's minutes
        with pytest.raises(StoreUnavailable):
            store.health()
    finally:
        memcached_server.resume()
    wait_until_reachable(store, ["p"])
    assert store.add("p", 1) in (2, 3)  # the step that timed out may have been applied when it woke up


def test_a_restart_loses_counters_and_health_says_so(caplog):
    server = Memcached("memcached").start()
    try:
        store = MemcachedCounterStore([server.address], key_prefix="restart:")
        store.add("r", 5)
        assert store.health()["servers"][0]["reachable"]
        time.sleep(5)  # memcached counts uptime in whole seconds, from a little before it starts
        server.stop()
        with pytest.raises(StoreUnavailable):
            store.add("r", 1)
        server.start()
        time.sleep(1.2)
        with caplog.at_level("WARNING"):
            report = store.health()["servers"][0]
        assert report["restarted"] is True and "lost" in report["warning"]
        assert any("restarted" in record.getMessage() for record in caplog.records)
        assert store.get("r") == 0  # memcached keeps nothing across a restart (README)
    finally:
        server.stop()


def test_a_value_that_is_not_a_counter_is_reported(memcached_server):
    store = MemcachedCounterStore([memcached_server.address], key_prefix="corrupt:")
    raw = pylibmc.Client([memcached_server.address])
    raw.set("corrupt:c", b"not a number")
    with pytest.raises(CorruptCounter):
        store.add("c", 1)
    with pytest.raises(CorruptCounter):
        store.get("c")
    assert raw.get("corrupt:c") == b"not a number"


def test_values_are_stored_offset_so_negatives_work(memcached_server):
    store = MemcachedCounterStore([memcached_server.address], key_prefix="offset:")
    assert store.add("n", -3) == -3
    raw = pylibmc.Client([memcached_server.address])
    assert int(raw.get("offset:n")) == OFFSET - 3
    assert store.add("n", 1) == -2


def test_encoded_values_never_reach_2_to_the_63():
    """memcached refuses incr/decr on numbers >= 2**63 whenever a stray "-" follows the item in its
    slab; every value the store can hold, and every step past its ends, must encode below that."""
    for value in (MemcachedCounterStore.min_value, 0, MemcachedCounterStore.max_value):
        for step in (-FAST_STEP_MAX, 0, FAST_STEP_MAX):
            assert FAST_STEP_MAX < value + step + OFFSET < 2**63


def test_counters_keep_counting_after_heavy_traffic_with_dashes(memcached_server):
    """What once failed at random: cas traffic leaves "-" bytes in the slabs; counters stay countable."""
    for round_ in range(20):
        busy = MemcachedCounterStore([memcached_server.address], key_prefix=f"dash{round_}:")

        def append_dashes(store: MemcachedCounterStore) -> None:
            for _ in range(30):
                store.update_value("members", lambda data: (data or b"") + b"-a-b-")

        threads = [threading.Thread(target=append_dashes, args=(busy,)) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        store = MemcachedCounterStore([memcached_server.address], key_prefix=f"count{round_}:")
        assert [store.add("c", 1) for _ in range(3)] == [1, 2, 3]
        assert store.add("max", store.max_value) == store.max_value
        assert store.add("min", store.min_value) == store.min_value
        with pytest.raises(Overflow):
            store.add("min", -1)


def test_adding_a_server_moves_only_the_keys_the_new_server_takes(two_servers):
    """Consistent hashing (ketama): with a third server, every key it does not take stays where it
    was (modulo hashing would move about two thirds of them, and their counters would restart)."""
    keys = [f"ring{i}" for i in range(300)]
    third = Memcached("memcached").start()
    try:
        servers = [*two_servers, third]
        before = MemcachedCounterStore([s.address for s in two_servers], key_prefix="ring:")
        for key in keys:
            before.add(key, 1)
        homes_before = {key: where(servers, f"ring:{key}") for key in keys}
        for server in servers:
            pylibmc.Client([server.address]).flush_all()
        after = MemcachedCounterStore([s.address for s in servers], key_prefix="ring:")
        for key in keys:
            after.add(key, 1)
        homes_after = {key: where(servers, f"ring:{key}") for key in keys}
    finally:
        third.stop()
    taken = [key for key in keys if homes_after[key] == [third.address]]
    assert 0 < len(taken) < len(keys) / 2
    assert all(homes_after[key] == homes_before[key] for key in keys if key not in taken)


def test_counters_and_values_are_stored_without_expiry(memcached_server):
    store = MemcachedCounterStore([memcached_server.address], key_prefix="noexp:")
    store.add("plain", 1)
    store.add("big", FAST_STEP_MAX + 1)  # the gets/cas path
    store.set("set", 5)
    store.update_value("value", lambda _: b"[]")
    store.add("@0123456789abcdef0123456789abcdef.mine", 1, ttl=3600)
    items = memcached_server.items("noexp:")
    assert {key: facts["exp"] for key, facts in items.items() if "@" not in key} == {
        "noexp:plain": "-1",
        "noexp:big": "-1",
        "noexp:set": "-1",
        "noexp:=value": "-1",
    }
    assert items["noexp:@0123456789abcdef0123456789abcdef.mine"]["exp"] != "-1"  # per-client: expires


def test_more_threads_than_connections_wait_then_answer_503_not_a_pool_error(memcached_server):
    store = MemcachedCounterStore([memcached_server.address], key_prefix="pool:", pool_size=1, timeout=0.3)
    store.add("c", 1)
    with store._client("pool:c"):  # the only connection, held by another request
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="COUNTER_POOL_SIZE"):
            store.add("c", 1)
        assert time.monotonic() - began >= 0.25  # it waited for a connection first
    assert store.add("c", 1) == 2  # nothing was counted by the refused step


def test_connections_left_idle_through_a_restart_reconnect_without_a_503():
    """Every pooled connection that sat idle while memcached restarted is dead; each is noticed
    (readable: closed by the server) before its next command and replaced, so the first requests
    after the restart do not fail.  memcached kept nothing: the counter starts again."""
    server = Memcached("memcached").start()
    store = MemcachedCounterStore([server.address], key_prefix="idle:", pool_size=3)
    try:
        holders = [store._connections[server.address].take(1) for _ in range(3)]
        for connection in holders:  # open all three sockets
            connection.call("get", "idle:x")
        for connection in holders:
            store._connections[server.address].give(connection)
        server.stop()
        server.start()
        time.sleep(1.2)  # idle for longer than the check's threshold
        assert [store.add("x", 1) for _ in range(6)] == [1, 2, 3, 4, 5, 6]
    finally:
        store.close()
        server.stop()


def test_an_idle_connection_past_descriptor_1023_is_kept():
    """The idle check works for any descriptor number: a busy worker's sockets sit past 1023, where
    ``select.select`` raises ``ValueError`` (once taken for a closed socket, so every idle
    connection was replaced).  Five rounds of "idle past the check's threshold, then one step" on a
    socket numbered over 1024 open no new connection."""
    from pymemcache.client.base import Client

    server = Memcached("memcached").start()
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    store = MemcachedCounterStore([server.address], key_prefix="fd:", pool_size=1)
    stats = Client(parse_address(server.address))
    try:
        assert store.add("x", 1) == 1
        connection = store._connections[server.address].take(1)
        assert connection._client.sock.fileno() > 1024
        store._connections[server.address].give(connection)
        before = int(stats.stats()[b"total_connections"])
        for round_ in range(5):
            time.sleep(IDLE_CHECK_SECONDS + 0.3)
            assert store.add("x", 1) == round_ + 2
        assert int(stats.stats()[b"total_connections"]) == before  # the stats client was already open
    finally:
        stats.close()
        store.close()
        for fd in held:
            os.close(fd)
        server.stop()


class TricklingServer:
    """A loopback server that speaks just enough memcached for ``incr``: the first reply at once, every
    later one a byte every ``gap`` seconds (a server that is slow, not silent)."""

    def __init__(self, gap: float) -> None:
        import socket

        self.gap = gap
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self.stopping.is_set():
            try:
                connection, _ = self.listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection) -> None:
        connection.settimeout(5)
        replies = 0
        with connection:
            while not self.stopping.is_set():
                try:
                    if not connection.recv(4096):
                        return
                    reply = f"{OFFSET + replies + 1}\r\n".encode()
                    if replies == 0:
                        connection.sendall(reply)
                    else:
                        for byte in reply:
                            if self.stopping.wait(self.gap):
                                return
                            connection.sendall(bytes([byte]))
                    replies += 1
                except OSError:
                    return

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.listener.close()


def test_a_server_answering_a_byte_at_a_time_cannot_stretch_a_command_past_its_deadline():
    """Each read of a trickled reply returns a byte in time, so a timeout per socket call would never
    fire (a 21-byte reply at 0.1 s a byte: 2.1 s); the command's own deadline does, on an open
    connection as on the first."""
    server = TricklingServer(gap=0.1)
    store = MemcachedCounterStore([server.address], key_prefix="", timeout=0.5, pool_size=1)
    try:
        assert store.add("t", 1) == 1  # connected, first reply at once
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.add("t", 1)  # the same (open) connection, trickled
        assert time.monotonic() - began < 0.5 + 0.4
    finally:
        store.close()
        server.stop()


def test_a_key_dump_right_after_reads_lists_every_counter(memcached_server):
    """The LRU dump (``metadump all``) skipped counters that had just been read, which the LRU
    maintainer moves between segments while the crawler walks them (3 runs of 6 here); the hash-table
    dump does not.  Early-closed dumps (a limit reached), then reads of every counter, then full dumps."""
    store = MemcachedCounterStore([memcached_server.address], key_prefix="dump:")
    created = {f"c{i:02d}" for i in range(25)}
    for name in created:
        store.add(name, 1)
    for _ in range(5):
        for limit in (1, 10, 24):
            assert len(store.names(limit)) == limit
        for name in created:
            store.get(name)
        assert [set(store.names(1000)) for _ in range(4)] == [created] * 4


class LruDumpOnlyServer(TricklingServer):
    """Answers ``metadump hash`` as a memcached older than the hash dump does (the word read as a
    class id), and ``metadump all`` with one item and END."""

    def __init__(self) -> None:
        self.dumps: list[bytes] = []
        super().__init__(gap=0)

    def _answer(self, connection) -> None:
        connection.settimeout(5)
        with connection:
            request = connection.recv(4096)
            self.dumps.append(request)
            if request == b"lru_crawler metadump hash\r\n":
                connection.sendall(b"BADCLASS invalid class id\r\n")
            elif request == b"lru_crawler metadump all\r\n":
                connection.sendall(b"key=old%3Aapples exp=-1 la=1 cas=1 fetch=no cls=1 size=60\nEND\r\n")


def test_a_server_without_the_hash_dump_is_listed_with_the_lru_dump():
    server = LruDumpOnlyServer()
    store = MemcachedCounterStore([server.address], key_prefix="old:", timeout=2.0)
    try:
        assert store.names(10) == ["apples"]
        assert store.names(10) == ["apples"]
        assert server.dumps == [
            b"lru_crawler metadump hash\r\n",
            b"lru_crawler metadump all\r\n",
            b"lru_crawler metadump all\r\n",  # remembered per server
        ]
    finally:
        store.close()
        server.stop()
