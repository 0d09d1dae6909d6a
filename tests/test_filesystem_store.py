"""The filesystem store, tested the ways it can fail: threads sharing a descriptor, forks, unlinked
files still held open, crashes, damaged files, and the expiry sweep."""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tally import CorruptCounter
from tally.stores.filesystem import RECORD, FileCounterStore, records
from tally.stores.filesystem import store as filesystem_store

CLIENT_KEY = "@0123456789abcdef0123456789abcdef.clicks"


def counter_files(directory) -> set[str]:
    """The counter files of a store directory (not its lock file, temporaries or .values)."""
    return {name for name in os.listdir(directory) if not name.startswith(".")}


def hammer(store: FileCounterStore, key: str, threads: int, each: int) -> list[int]:
    results: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [store.add(key, 1) for _ in range(each)]
        with lock:
            results.extend(mine)

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return results


class NoLock:
    """What the store would be without its per-descriptor thread lock."""

    def acquire(self, blocking: bool = True) -> bool:
        return True

    def release(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def test_threads_sharing_one_descriptor_are_excluded(tmp_path):
    store = FileCounterStore(str(tmp_path))
    results = hammer(store, "x", threads=8, each=2000)
    assert sorted(results) == list(range(1, 16001))


def test_without_the_thread_lock_flock_alone_lets_threads_race(tmp_path, monkeypatch):
    """flock belongs to the open file description: threads sharing it are not excluded by it."""

    class UnlockedHandle(filesystem_store._Handle):
        def __init__(self, fd: int) -> None:
            super().__init__(fd)
            self.lock = NoLock()

    monkeypatch.setattr(filesystem_store, "_Handle", UnlockedHandle)
    duplicates = 0
    for attempt in range(5):  # a race shows in the first round almost always; allow a few
        store = FileCounterStore(str(tmp_path / str(attempt)))
        results = hammer(store, "x", threads=8, each=2000)
        duplicates = len(results) - len(set(results))
        if duplicates:
            break
    assert duplicates > 0


def _add_in_child(directory: str, key: str, count: int, queue) -> None:
    store = FileCounterStore(directory)
    queue.put([store.add(key, 1) for _ in range(count)])


def _add_with_inherited_store(store: FileCounterStore, key: str, count: int, queue) -> None:
    queue.put([store.add(key, 1) for _ in range(count)])


def run_forked(target, args_for, processes: int) -> list[int]:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=target, args=(*args_for, queue)) for _ in range(processes)]
    for child in children:
        child.start()
    results = [v for _ in children for v in queue.get(timeout=120)]
    for child in children:
        child.join(timeout=30)
    return results


def test_processes_each_with_their_own_store_are_exact(tmp_path):
    results = run_forked(_add_in_child, (str(tmp_path), "p", 3000), processes=4)
    assert sorted(results) == list(range(1, 12001))


def test_a_store_opened_before_fork_keeps_descriptors_per_process(tmp_path):
    """gunicorn --preload: the parent opened the file; children must not share its flock."""
    store = FileCounterStore(str(tmp_path))
    assert store.add("f", 1) == 1  # the parent now holds a descriptor for "f"
    results = run_forked(_add_with_inherited_store, (store, "f", 3000), processes=4)
    assert sorted(results) == list(range(2, 12002))


def test_without_dropping_inherited_descriptors_forked_children_race(tmp_path, monkeypatch):
    monkeypatch.setattr(FileCounterStore, "_after_fork_in_child", lambda self: None)
    duplicates = 0
    for attempt in range(5):
        store = FileCounterStore(str(tmp_path / str(attempt)))
        store.add("f", 1)
        results = run_forked(_add_with_inherited_store, (store, "f", 3000), processes=4)
        duplicates = len(results) - len(set(results))
        if duplicates:
            break
    assert duplicates > 0


def test_a_reset_by_another_process_is_seen_by_a_held_descriptor(tmp_path):
    """Two store instances have separate descriptors, as two processes do."""
    holder = FileCounterStore(str(tmp_path))
    other = FileCounterStore(str(tmp_path))
    assert holder.add("r", 5) == 5  # holder keeps its descriptor open
    assert other.delete("r") is True  # unlinks the file holder still has open
    assert other.add("r", 1) == 1  # a new file
    assert holder.add("r", 1) == 2  # not 6 on the orphaned inode
    assert other.get("r") == 2
    assert holder.get("r") == 2


def test_resets_under_load_never_split_a_counter(tmp_path):
    holder = FileCounterStore(str(tmp_path))
    resetter = FileCounterStore(str(tmp_path))
    stop = threading.Event()

    def keep_resetting() -> None:
        while not stop.is_set():
            resetter.delete("s")
            time.sleep(0.001)

    thread = threading.Thread(target=keep_resetting)
    thread.start()
    try:
        for _ in range(2000):
            holder.add("s", 1)
    finally:
        stop.set()
        thread.join()
    # After the last reset only one file exists, and both instances see the same value in it.
    final = holder.add("s", 1)
    assert resetter.get("s") == final
    assert counter_files(tmp_path) == {"s"}  # no second, orphaned file


def test_a_bounded_number_of_descriptors_stays_open(tmp_path):
    store = FileCounterStore(str(tmp_path), max_open_files=4)
    for round_ in range(3):
        for i in range(50):
            assert store.add(f"k{i}", 1) == round_ + 1
    open_here = [
        fd
        for fd in os.listdir("/proc/self/fd")
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
    ]
    assert len(open_here) <= 4


def _spread_over_names(store: FileCounterStore, names: int, threads: int, rounds: int) -> None:
    """``threads`` threads each add 1 to every one of ``names`` counters, ``rounds`` times, each
    starting at another name."""

    def work(offset: int) -> None:
        for _ in range(rounds):
            for index in range(names):
                store.add(f"k{(index + offset) % names}", 1)

    workers = [threading.Thread(target=work, args=(offset * 7,)) for offset in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def _spread_in_child(directory: str, names: int, rounds: int, queue) -> None:
    _spread_over_names(FileCounterStore(directory, max_open_files=4), names, threads=4, rounds=rounds)
    queue.put([])


def test_increments_spread_over_more_counters_than_descriptors_stay_exact(tmp_path):
    """64 counters and 4 descriptors kept: nearly every step evicts one, while the other threads of
    the process and another process step on the same counters."""
    run_forked(_spread_in_child, (str(tmp_path), 64, 20), processes=2)
    store = FileCounterStore(str(tmp_path))
    assert {store.get(f"k{index}") for index in range(64)} == {2 * 4 * 20}
    assert len(counter_files(tmp_path)) == 64


def test_a_descriptor_in_use_is_not_closed_to_make_room(tmp_path):
    store = FileCounterStore(str(tmp_path), max_open_files=2)
    store.add("busy", 1)
    handle = store._handles["busy"]
    with handle.lock:  # as a thread in the middle of a step on "busy" holds it
        for index in range(10):
            assert store.add(f"k{index}", 1) == 1  # each one past the bound: an idle one is closed
        assert not handle.closed and store._handles.get("busy") is handle
        os.fstat(handle.fd)  # still open
        assert len(store._handles) == 2
    assert store.add("busy", 1) == 2


@pytest.mark.skipif(not records.NOATIME, reason="O_NOATIME is Linux's")
def test_reading_a_counter_does_not_write_its_access_time(tmp_path):
    """O_NOATIME: under relatime (the usual mount) the first read after a write would otherwise dirty
    the file's inode, a journal write on each step of a counter not touched lately."""
    FileCounterStore(str(tmp_path)).add("a", 1)
    path = tmp_path / "a"
    modified = os.stat(path).st_mtime_ns
    os.utime(path, ns=(modified - 10**11, modified))  # read long before the last write
    assert FileCounterStore(str(tmp_path)).get("a") == 1
    assert FileCounterStore(str(tmp_path)).names(10) == ["a"]
    assert os.stat(path).st_atime_ns == modified - 10**11


@pytest.mark.skipif(not records.NOATIME, reason="O_NOATIME is Linux's")
def test_a_counter_opens_where_the_kernel_refuses_o_noatime(tmp_path, monkeypatch):
    """O_NOATIME is refused (EPERM) to a process that neither owns the file nor is privileged."""
    real_open = os.open
    refused: list[str] = []

    def open_refusing_noatime(path, flags, *args, **kwargs):
        if flags & records.NOATIME:
            refused.append(os.fspath(path))
            raise PermissionError(errno.EPERM, "Operation not permitted", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_refusing_noatime)
    assert FileCounterStore(str(tmp_path)).add("a", 1) == 1
    store = FileCounterStore(str(tmp_path))
    assert store.add("a", 2) == 3
    assert store.get("a") == 3
    assert store.names(10) == ["a"]
    assert refused and all(path.endswith("/a") for path in refused)


def test_a_truncated_file_is_reported_never_read_as_zero(tmp_path):
    store = FileCounterStore(str(tmp_path))
    store.add("t", 7)
    os.truncate(tmp_path / "t", 0)
    with pytest.raises(CorruptCounter, match="holds 0 bytes"):
        store.get("t")
    with pytest.raises(CorruptCounter):
        store.add("t", 1)
    assert os.path.getsize(tmp_path / "t") == 0  # nothing was written over the evidence


def test_a_damaged_file_fails_its_checksum(tmp_path):
    store = FileCounterStore(str(tmp_path))
    store.add("d", 7)
    data = bytearray((tmp_path / "d").read_bytes())
    data[5] ^= 0xFF
    (tmp_path / "d").write_bytes(bytes(data))
    with pytest.raises(CorruptCounter, match="checksum"):
        FileCounterStore(str(tmp_path)).get("d")


def test_a_process_killed_mid_update_leaves_a_valid_value(tmp_path):
    script = (
        "import sys; from tally.stores.filesystem import FileCounterStore\n"
        f"s = FileCounterStore({str(tmp_path)!r})\n"
        "for _ in range(10_000_000):\n"
        "    print(s.add('crash', 1), flush=True)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    last = 0
    deadline = time.monotonic() + 10
    while last < 5000 and time.monotonic() < deadline:
        last = int(child.stdout.readline())
    os.kill(child.pid, signal.SIGKILL)
    child.wait(timeout=10)
    child.stdout.close()
    value = FileCounterStore(str(tmp_path)).get("crash")
    assert os.path.getsize(tmp_path / "crash") == RECORD.size
    assert value >= last  # every value handed out is kept (and at most the step in flight more)


def test_the_sweep_removes_only_expired_client_counters(tmp_path):
    store = FileCounterStore(str(tmp_path))
    store.add("shared", 1)
    store.add(CLIENT_KEY, 1, ttl=1)
    store.add("@fedcba9876543210fedcba9876543210.clicks", 1, ttl=3600)
    stale_temp = tmp_path / ".new-leftover"
    stale_temp.write_bytes(b"")
    os.utime(stale_temp, (time.time() - 7200, time.time() - 7200))
    time.sleep(2.2)
    assert store.sweep_expired() == 1
    names = set(os.listdir(tmp_path))
    assert "shared" in names and CLIENT_KEY not in names and ".new-leftover" not in names
    assert "@fedcba9876543210fedcba9876543210.clicks" in names
    assert store.get("shared") == 1


def test_the_sweep_runs_by_itself_after_writes(tmp_path):
    store = FileCounterStore(str(tmp_path), sweep_interval=0.5)
    for i in range(20):
        store.add(f"@{i:032x}.clicks", 1, ttl=1)
    time.sleep(2.2)
    store.add("@ffffffffffffffffffffffffffffffff.clicks", 1, ttl=60)  # a write triggers the sweep
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(counter_files(tmp_path)) > 1:
        time.sleep(0.1)
    assert counter_files(tmp_path) == {"@ffffffffffffffffffffffffffffffff.clicks"}


def test_fsync_mode_counts_the_same(tmp_path):
    store = FileCounterStore(str(tmp_path), fsync=True)
    assert [store.add("sync", 1) for _ in range(20)] == list(range(1, 21))
    assert FileCounterStore(str(tmp_path)).get("sync") == 20


@pytest.mark.parametrize("fsync", [True, False])
def test_fsync_mode_flushes_every_step_before_it_returns(tmp_path, monkeypatch, fsync):
    store = FileCounterStore(str(tmp_path), fsync=fsync)
    store.add("sync", 1)  # the file exists: what follows are plain steps
    store.update_value("v", lambda _: b"1")
    flushed = []
    for name in ("fsync", "fdatasync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda fd, real=real, name=name: (flushed.append(name), real(fd))[1])
    for _ in range(5):
        store.add("sync", 1)
    store.set("sync", 3)
    store.update_value("v", lambda _: b"2")
    expected = 6 + 2 if fsync else 0  # each step's data; a value also its directory (os.replace)
    assert len(flushed) == expected, flushed


def test_fsync_mode_flushes_the_directory_that_holds_a_replaced_value(tmp_path, monkeypatch):
    """``os.replace`` changes an entry of the values' own directory: that one is flushed, not the
    counter directory above it (whose flush would leave the new value's name to a power loss)."""
    store = FileCounterStore(str(tmp_path), fsync=True)
    store.set_value("v", b"0")
    flushed = []
    real = os.fsync

    def fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.update_value("v", lambda _: b"1")
    assert os.path.realpath(os.path.dirname(store._values.path("v"))) in flushed, flushed
