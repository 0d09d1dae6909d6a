"""Cost as the work grows (issue 24, part 6): rows of ``make bench``, and ``python bench/scaling.py`` on
its own.

- an increment spread over 1, 10,000, 100,000 (and, opt-in, 1,000,000) distinct counters, each drawn at
  random per call from counters created beforehand (the time that took is a row too), against increments
  of one hot counter of the same store, on the filesystem store and on SQLite;
- in the stores of 10,000 (and 1,000,000) counters, the leaderboard's computation
  (``routes.leaderboard.top_counters``: ``store.names`` and every counter read) against the route's
  cached read (the page-cache ``get`` through its bounded call, then the entry's checks; a
  FileSystemCache, as the default config has); at 1,000,000 also with the default scan limit;
- a shared value's ``update_value`` at 1 KiB and at 64 KiB, against the same at 8 bytes.

Each figure is the median of ``PAIRS`` alternated pairs of blocks (the two sides measured one after
the other, the order swapped every pair), the ratio the median of the pairs' ratios, with their spread
(lowest-highest).  Every block is bounded in calls and in time, every creation in time.  Stores live
in one temporary directory, removed at the end.  1,000,000 counters are opt-in (``--million``, or
``million`` in ``only``): creating them one by one takes many minutes on the filesystem (measured: 1,500
to 3,000 a second, under 300 a second right after many files were deleted, as ext4 then searches
longer for a free inode), and about 4 GiB of disk (a block per file).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from itertools import cycle
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tally.stores.filesystem import FileCounterStore  # noqa: E402
from tally.stores.sql import SqlCounterStore  # noqa: E402

#: Alternated pairs per figure (the issue asks for at least 5).
PAIRS = 7
#: The shortest block, in seconds: SQLite's checkpoints and ext4's inode searches come in bursts.
MIN_BLOCK = 0.1
#: The most calls one block makes, whatever its time.
MAX_BLOCK = 200_000
#: Random draws of counter names, cycled (more than any block makes, so a block sees no repeat pattern).
DRAWS = 400_000
COUNTS = (1, 10_000, 100_000)
MILLION = 1_000_000
VALUE_SIZES = (1024, 64 * 1024)
SMALL_VALUE = 8
#: The store sizes at which the leaderboard is measured (in the stores of the increment rows).
LEADERBOARD_COUNTS = (10_000, MILLION)
#: routes/leaderboard.py's default LEADERBOARD_SCAN_LIMIT.
DEFAULT_SCAN_LIMIT = 10_000

Row = Callable[..., None]


def block_rate(operation: Callable[[], object], seconds: float, most: int = MAX_BLOCK) -> float:
    """Calls per second of ``operation`` run for ``seconds`` (at least 10 calls, at most ``most``)."""
    done = 0
    began = time.perf_counter()
    deadline = began + seconds
    while done < most:
        for _ in range(10):
            operation()
        done += 10
        if time.perf_counter() >= deadline:
            break
    return done / (time.perf_counter() - began)


class Paired:
    """Medians of two sides measured in ``pairs`` alternated pairs, the median of the pairs' ratios
    (first / second) and their spread."""

    def __init__(self, firsts: list[float], seconds: list[float]) -> None:
        self.ratios = sorted(a / b for a, b in zip(firsts, seconds, strict=True))
        self.first = statistics.median(firsts)
        self.second = statistics.median(seconds)
        self.ratio = statistics.median(self.ratios)

    def shown(self) -> str:
        return f"{self.ratio:.2f}x ({self.ratios[0]:.2f}-{self.ratios[-1]:.2f}, {len(self.ratios)} pairs)"


def paired(first: Callable[[], float], second: Callable[[], float], pairs: int = PAIRS) -> Paired:
    """``first()`` and ``second()`` (each one measurement) in alternated pairs."""
    firsts: list[float] = []
    seconds: list[float] = []
    for index in range(pairs):
        if index % 2:
            b = second()
            a = first()
        else:
            a = first()
            b = second()
        firsts.append(a)
        seconds.append(b)
    return Paired(firsts, seconds)


def paired_rates(
    first: Callable[[], object], second: Callable[[], object], seconds: float, pairs: int = PAIRS
) -> Paired:
    """Two operations' calls per second, each block ``seconds / (2 * pairs)`` long (at least
    ``MIN_BLOCK``), after a warm-up."""
    for _ in range(200):
        first()
        second()
    block = max(MIN_BLOCK, seconds / (2 * pairs))
    return paired(lambda: block_rate(first, block), lambda: block_rate(second, block), pairs)


# -- the stores -------------------------------------------------------------------------------------


def counter_names(count: int) -> list[str]:
    return [f"c{index:07d}" for index in range(count)]


def draws(names: list[str], seed: int = 24) -> Iterator[str]:
    """Names drawn at random (with repeats), cycled."""
    rng = random.Random(seed)
    return cycle([names[rng.randrange(len(names))] for _ in range(min(DRAWS, max(1000, 4 * len(names))))])


def open_store(kind: str, where: Path) -> Any:
    if kind == "filesystem":
        return FileCounterStore(str(where / "counters"))
    store = SqlCounterStore(f"sqlite:///{where / 'tally.db'}", key_prefix="bench:", timeout=5.0)
    store.create_schema()
    return store


def populate(store: Any, names: list[str], limit: float) -> float:
    """Create ``names`` through the store's own ``add`` (1 each); seconds taken.  Stops (raising) past
    ``limit`` seconds: the caller asked for a count this machine cannot create in time."""
    began = time.perf_counter()
    for index, name in enumerate(names):
        store.add(name, 1)
        if index % 10_000 == 0 and time.perf_counter() - began > limit:
            raise TimeoutError(f"created only {index:,} of {len(names):,} counters in {limit:.0f} s")
    return time.perf_counter() - began


def count_rows(row: Row, kind: str, count: int, seconds: float, scratch: Path, leaderboard: bool) -> None:
    """In one store holding ``count`` counters (and the hot one): an increment spread over them
    against one hot counter; with ``leaderboard``, the leaderboard's computation against its cache."""
    where = Path(tempfile.mkdtemp(prefix=f"{kind}-{count}-", dir=scratch))
    store = open_store(kind, where)
    try:
        names = counter_names(count)
        took = populate(store, names, limit=1800.0)
        store.add("hot", 1)
        os.sync()  # the creation's writeback (GiBs at 1,000,000 files) is not the increments' to pay
        if count > 1:
            row(
                f"{kind}: create {count:,} counters (add, one by one)",
                count / took,
                "ops/s",
                f"{took:.1f} s in all",
            )
        spread, hot = draws(names), cycle(["hot"])
        result = paired_rates(lambda: store.add(next(spread), 1), lambda: store.add(next(hot), 1), seconds)
        row(
            f"{kind}: incr spread over {count:,} counter{'s' if count > 1 else ''} (random)",
            result.first,
            "ops/s",
            f"one hot counter: {result.second:,.0f} ops/s",
            result.shown(),
            ">= 0.70x" if count == 100_000 else "",
        )
        if leaderboard:
            leaderboard_row(row, kind, store, count + 1, True, seconds, where)
            if count > 10 * DEFAULT_SCAN_LIMIT:  # what the app reads at this size: a subset
                leaderboard_row(row, kind, store, DEFAULT_SCAN_LIMIT, False, seconds, where)
    finally:
        store.close()
        shutil.rmtree(where, ignore_errors=True)


def flip_first_byte(data: bytes | None) -> bytes:
    """A change that touches the value (its first byte) and keeps its size."""
    assert data is not None
    return bytes(((data[0] + 1) % 256,)) + data[1:]


def value_rows(row: Row, kind: str, seconds: float, scratch: Path) -> None:
    """``update_value`` at 1 KiB and 64 KiB against the same at ``SMALL_VALUE`` bytes, one store."""
    where = Path(tempfile.mkdtemp(prefix=f"{kind}-values-", dir=scratch))
    store = open_store(kind, where)
    try:
        store.set_value("small", b"v" * SMALL_VALUE)
        for size in VALUE_SIZES:
            name = f"v{size}"
            store.set_value(name, b"v" * size)
            result = paired_rates(
                lambda name=name: store.update_value(name, flip_first_byte),
                lambda: store.update_value("small", flip_first_byte),
                seconds,
            )
            row(
                f"{kind}: update_value at {size // 1024} KiB",
                result.first,
                "ops/s",
                f"the same at {SMALL_VALUE} bytes: {result.second:,.0f} ops/s",
                result.shown(),
            )
    finally:
        store.close()
        shutil.rmtree(where, ignore_errors=True)


def leaderboard_row(
    row: Row, kind: str, store: Any, scan_limit: int, every: bool, seconds: float, where: Path
) -> None:
    """The leaderboard's computation (``top_counters``: ``store.names(scan_limit)``, each one read)
    against the route's cached read of the list it computed: a FileSystemCache, as the default config
    has, read through the route's bounded call, then the entry's checks."""
    from cachelib import FileSystemCache

    from routes.leaderboard import (
        BoundedCalls,
        bounded,
        cache_key,
        decode_entry,
        encode_entry,
        store_scope,
        top_counters,
    )

    page_cache = FileSystemCache(str(where / f"cache-{scan_limit}"), threshold=500, default_timeout=300)
    scope = store_scope(store, scan_limit)
    key = cache_key(scope)
    max_age = 3600  # the entry stays fresh for the whole measurement

    def cached() -> object:
        raw = bounded.call(page_cache, "get", key, within=5.0)
        assert raw is not BoundedCalls.FAILED
        found = decode_entry(raw, scope, max_age, time.time())
        assert found is not None
        return found

    rows = top_counters(store, scan_limit)
    page_cache.set(key, encode_entry(scope, round(time.time(), 3), rows), max_age)
    timings: list[float] = []

    def one_computation() -> float:
        """One computation is one measurement (it is long)."""
        began = time.perf_counter()
        top_counters(store, scan_limit)
        timings.append(time.perf_counter() - began)
        return 1 / timings[-1]

    def cached_block() -> float:
        """Cached reads for as long as the last computation took (within bounds)."""
        return block_rate(cached, max(0.05, min(timings[-1] if timings else 0.1, seconds / PAIRS)))

    for _ in range(50):
        cached()
    result = paired(one_computation, cached_block)
    what = (
        f"{kind}: leaderboard computed over {scan_limit - 1:,} counters + the hot one, every one read"
        if every
        else f"{kind}: leaderboard computed with the default scan limit {scan_limit:,}"
    )
    row(
        what,
        statistics.median(timings) * 1e3,
        "ms",
        f"its cached read: {1e6 / result.second:,.0f} us",
        f"{1 / result.ratio:,.0f}x as long"
        f" ({1 / result.ratios[-1]:,.0f}-{1 / result.ratios[0]:,.0f}, {len(result.ratios)} pairs)",
    )


def scaling_rows(
    row: Row, seconds: float, only: set[str], million: bool = False, counts: tuple[int, ...] = COUNTS
) -> None:
    """Append the rows through ``row`` (bench.py's: what, figure, unit, compared, ratio, target) for the
    stores in ``only`` ("filesystem", "sqlite"); "million" in ``only`` (or ``million``) adds the
    1,000,000-counter rows."""
    if million or "million" in only:
        counts = (*counts, MILLION)
    scratch = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    try:
        for kind in ("filesystem", "sqlite"):
            if kind in only:
                for count in counts:
                    count_rows(row, kind, count, seconds, scratch, leaderboard=count in LEADERBOARD_COUNTS)
                value_rows(row, kind, seconds, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="filesystem,sqlite", help="filesystem, sqlite (comma-separated)")
    parser.add_argument(
        "--million", action="store_true", help="add the 1,000,000-counter rows (minutes, GiBs)"
    )
    parser.add_argument("--seconds", type=float, default=1.5, help="measuring time per figure")
    parser.add_argument(
        "--counts",
        default=",".join(map(str, COUNTS)),
        help="numbers of counters (comma-separated; a smaller set for a quick look)",
    )
    args = parser.parse_args()
    rows: list[tuple[str, ...]] = []

    def row(
        what: str, figure: float, unit: str, compared: str = "", ratio: str = "", target: str = ""
    ) -> None:
        rows.append((what, f"{figure:,.0f} {unit}", compared, ratio, target))
        print(f"  {what}: {figure:,.0f} {unit} {ratio}", file=sys.stderr, flush=True)

    began = time.monotonic()
    counts = tuple(int(count) for count in args.counts.split(","))
    scaling_rows(row, args.seconds, set(args.only.split(",")), million=args.million, counts=counts)
    print(f"\nTally scaling bench: {time.monotonic() - began:.0f} s in all\n")
    print("| measurement | figure | compared with | ratio | target |")
    print("| --- | ---: | --- | ---: | --- |")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
