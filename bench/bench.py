"""``make bench``: Tally's speed, measured side by side with what it is compared against, in one run.

- the helper's counter step (``store.add``) per store, in one process and in four processes on one
  counter; next to it the raw client's own increment (pylibmc ``incr``, redis-py ``incrby``), the two
  called in turn and timed call by call (medians);
- the shared-value ``update`` per store;
- the manager store's step next to the filesystem store's (1 and 4 processes); on Redis Sentinel, the
  helper's step with ``COUNTER_MIN_REPLICAS`` 0 and 1 next to redis-py's ``INCRBY`` (and ``INCRBY`` +
  ``WAIT 1`` in one round trip: bench/topology_bench.py);
- HTTP: ``POST /api/counters/<name>/incr`` against the bare ``GET /livez`` in the same gunicorn
  configuration (4 workers x 8 threads), per shared store, driven by wrk (Python clients where wrk is
  missing) in alternated pairs of runs; the ratio is the median of the pairs' ratios;
- HTTP on memcached and Redis once more, against the raw client's increment in a bare Flask view
  (no validation, no error mapping) under the same gunicorn settings: the part of the gap to the
  bare route that is the store's round trip, which every correct shared counter pays.
- HTTP as issue 15 measures it, in a table of its own: gunicorn ``-w 2 --threads 8 --keep-alive 5`` on
  every side; Tally (under its gunicorn.conf.py) against a bare Flask view ``jsonify(name=name,
  value=1)`` and against Flask-Caching's ``cache.cache.inc(name)`` route on the same Redis and
  memcached servers (bench/peer_app.py, both under an empty gunicorn config); and, on those two
  stores, Tally with COUNTER_COMBINE on against off, under load and for one request on an idle server.

Servers run on free loopback ports and are stopped by pid.  Every loop is bounded in time and count.
Prints a Markdown table; figures vary with the machine, ratios much less.  With matplotlib (the
``charts`` extra) a full run also draws each store's HTTP ratios into docs/bench-http.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pylibmc  # noqa: E402
import redis  # noqa: E402
from pymemcache.client.base import Client as PymemcacheClient  # noqa: E402
from scaling import block_rate, scaling_rows  # noqa: E402
from scaling import paired as paired_measurements  # noqa: E402
from sql_bench import sql_rows  # noqa: E402
from topology_bench import http_environments, sentinel_rows, start_topologies  # noqa: E402

from tally.loadcheck import run_load  # noqa: E402
from tally.stores.filesystem import FileCounterStore  # noqa: E402
from tally.stores.memcached import MemcachedCounterStore  # noqa: E402
from tally.stores.memcached_client import parse_address  # noqa: E402
from tally.stores.memory import MemoryCounterStore  # noqa: E402
from tally.stores.redis_store import RedisCounterStore  # noqa: E402
from tests.servers import Gunicorn, Manager, Memcached, Postgres, Redis  # noqa: E402

MAX_OPS = 5_000_000
CHART = ROOT / "docs" / "bench-http.png"


def rate(operation: Callable[[], object], seconds: float) -> float:
    """Operations per second of ``operation`` in a loop for ``seconds`` (at most MAX_OPS calls)."""
    for _ in range(200):  # warm up: open descriptors and connections
        operation()
    return block_rate(operation, seconds, MAX_OPS)


def _four_worker(make_store: Callable[[], object], seconds: float, start_at: float, queue) -> None:
    store = make_store()
    while time.time() < start_at:
        time.sleep(0.001)
    queue.put(rate(lambda: store.add("shared", 1), seconds))


def four_processes(make_store: Callable[[], object], seconds: float) -> float:
    """Aggregate steps/s of four forked processes, each with its own store from ``make_store``, all
    on one counter."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    start_at = time.time() + 1.0
    workers = [
        context.Process(target=_four_worker, args=(make_store, seconds, start_at, queue)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    total = sum(queue.get(timeout=seconds + 60) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    return total


def interleaved(helper: Callable[[], object], raw: Callable[[], object], seconds: float):
    """(helper ops/s, raw ops/s, helper/raw) from the median time of one call of each, called in
    turn (alternating which goes first): both see the same moments of a noisy machine, and the
    stalls of a shared VM (a single call can take 100x the usual) do not decide the result."""
    for _ in range(200):
        helper()
        raw()
    helper_times: list[float] = []
    raw_times: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(helper_times) < MAX_OPS and time.perf_counter() < deadline:
        # The first call after a pause pays the server's wake-up: alternate which one goes first.
        for first, first_times, second, second_times in (
            (helper, helper_times, raw, raw_times),
            (raw, raw_times, helper, helper_times),
        ):
            t0 = time.perf_counter()
            first()
            t1 = time.perf_counter()
            second()
            t2 = time.perf_counter()
            first_times.append(t1 - t0)
            second_times.append(t2 - t1)
    helper_median = statistics.median(helper_times)
    raw_median = statistics.median(raw_times)
    return 1 / helper_median, 1 / raw_median, raw_median / helper_median


def library_call(seconds: float, config: dict | None = None) -> tuple[float, float, float]:
    """(``counters.incr`` ops/s, the store's own ``add`` ops/s, their ratio) on one counter of a new
    app in this process, call by call (``interleaved``); ``config``: the app's store settings (none:
    the filesystem default)."""
    import flask

    import tally

    app = flask.Flask("bench", instance_path=tempfile.mkdtemp(prefix="bench-lib-"))
    app.config.update(config or {})
    counters = tally.Counters(app)
    with app.app_context():
        store = app.extensions["tally"]
        try:
            return interleaved(lambda: counters.incr("c"), lambda: store.add("c", 1), seconds)
        finally:
            store.close()


def library_row(row, seconds: float, name: str = "filesystem", config: dict | None = None) -> None:
    """``counters.incr`` as an app calls it (name and amount checked, the app's store found through
    ``current_app``, the step counted and timed by tally.metrics, combining where the store has it)
    against the store's own ``add`` on the same counter, in one process, call by call; on the
    filesystem also in a process whose metrics go to multiprocess files, as in a gunicorn worker
    (PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported, so in a child process)."""
    library, own, ratio = library_call(seconds, config)
    row(f"{name} store.add (median call)", own, "ops/s")
    row(
        f"{name} counters.incr, the library call (median call)",
        library,
        "ops/s",
        "the store's own add, call by call",
        f"{ratio:.2f}x",
        ">= 0.80x",
    )
    if name != "filesystem":
        return
    with tempfile.TemporaryDirectory(prefix="bench-lib-metrics-") as directory:
        code = (
            f"import json, sys; sys.path.insert(0, {str(BENCH_DIR)!r}); import bench;"
            f" print(json.dumps(bench.library_call({seconds})))"
        )
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory}
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=seconds * 4 + 120
        )
    if done.returncode != 0:
        raise RuntimeError(f"the multiprocess library bench failed:\n{done.stderr}")
    library, own, ratio = json.loads(done.stdout.splitlines()[-1])
    row(
        "filesystem counters.incr, multiprocess metrics files (median call)",
        library,
        "ops/s",
        f"the store's own add, call by call ({own:,.0f} ops/s)",
        f"{ratio:.2f}x",
        ">= 0.80x",
    )


def library_configs(
    only, memcached, redis_server, postgres, sentinel, manager_server
) -> list[tuple[str, dict]]:
    """(store, app settings) for ``library_row`` on each store of the run but the filesystem."""
    from tests.redis_topologies import MASTER_NAME

    configs: list[tuple[str, dict]] = []
    if "memory" in only:
        configs.append(("memory", {"CACHE_TYPE": "SimpleCache"}))
    if memcached is not None:
        configs.append(
            ("memcached", {"CACHE_TYPE": "MemcachedCache", "CACHE_MEMCACHED_SERVERS": [memcached.address]})
        )
    if redis_server is not None:
        configs.append(("redis", {"CACHE_TYPE": "RedisCache", "CACHE_REDIS_URL": redis_server.url}))
    if sentinel is not None:
        sentinels = {
            "CACHE_TYPE": "RedisSentinelCache",
            "CACHE_REDIS_SENTINELS": [tuple(address) for address in sentinel.sentinel_addresses],
            "CACHE_REDIS_SENTINEL_MASTER": MASTER_NAME,
        }
        configs.append(("redis-sentinel", sentinels))
    if "sqlite" in only:
        database = f"sqlite:///{tempfile.mkdtemp(prefix='bench-lib-sql-')}/tally.db"
        configs.append(("sqlite", {"COUNTER_STORE": "sql", "SQLALCHEMY_DATABASE_URI": database}))
    if postgres is not None:
        configs.append(("postgresql", {"COUNTER_STORE": "sql", "SQLALCHEMY_DATABASE_URI": postgres.url}))
    if manager_server is not None:
        manager = {
            "COUNTER_STORE": "manager",
            "COUNTER_MANAGER_ADDRESS": manager_server.address,
            "COUNTER_MANAGER_AUTHKEY": manager_server.authkey,
        }
        configs.append(("manager", manager))
    return [(name, {**config, "COUNTER_KEY_PREFIX": f"lib{os.getpid()}:"}) for name, config in configs]


#: Run in a child process by ``request_phases``, in the tree to measure (``import app`` from its cwd):
#: the demo app called in-process with the environ gunicorn gives a body-less request (its stream
#: ``wsgi.input_terminated``, gunicorn's own ``Body``), metrics in multiprocess files as in a worker,
#: each phase timed by the thread's CPU clock, the two routes alternated call by call; medians in JSON.
PHASES_CHILD = """
import collections, json, os, statistics, sys, tempfile, time
import flask, flask.ctx, werkzeug.wrappers.response as wr
from gunicorn.http.body import Body, LengthReader
from werkzeug.test import EnvironBuilder
sys.path.insert(0, os.getcwd())
import app as demo, common
from routes import api, body
clock, calls = (time.thread_time if sys.argv[1] == "thread" else time.perf_counter), int(sys.argv[2])
app, spent = demo.app, {}
def timed(owner, name, label):
    original = getattr(owner, name)
    def run(*args, **kwargs):
        began = clock()
        try:
            return original(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + clock() - began
    setattr(owner, name, run)
timed(flask.ctx.RequestContext, "match_request", "routing (Werkzeug's matcher)")
timed(flask.Flask, "preprocess_request", "before_request hooks")
timed(flask.Flask, "dispatch_request", "view, all of it")
timed(flask.Flask, "finalize_request", "after_request hooks, session save")
timed(wr.Response, "__call__", "response to WSGI")
timed(body, "json_object", "view: reading the body")
timed(type(common.counters), "incr", "view: counters.incr")
timed(api, "counter_response", "view: building the response")
timed(flask.json, "jsonify", "view: building the response")
store = app.extensions["tally"]
timed(type(store), "add", "view: counters.incr: the store step")
steps = app.extensions.get("tally.steps")
if steps is not None:  # measured with the timed add
    from tally import metrics
    app.extensions["tally.steps"] = (metrics.measured(store, "incr", store.add),) + steps[1:]
elif "tally.add" in app.extensions:
    app.extensions["tally.add"] = store.add
for name, function in (("json_object", body.json_object), ("counter_response", api.counter_response)):
    app.view_functions["api.incr"].__globals__[name] = function
app.view_functions["health.livez"].__globals__["jsonify"] = flask.json.jsonify
def environ(method, path):
    built = EnvironBuilder(method=method, path=path, headers={"Host": "127.0.0.1", "User-Agent": "wrk"})
    values = built.get_environ()
    values.pop("CONTENT_LENGTH", None), values.pop("CONTENT_TYPE", None)
    return {**values, "wsgi.input_terminated": True, "REMOTE_ADDR": "127.0.0.1"}
routes = {"counter": environ("POST", "/api/counters/bench/incr"), "livez": environ("GET", "/livez")}
found = collections.defaultdict(list)
def call(route):
    spent.clear()
    began = clock()
    for _ in app({**routes[route], "wsgi.input": Body(LengthReader(None, 0))}, lambda *a: None):
        pass
    spent["the whole request"] = clock() - began
    for label, seconds in spent.items():
        found[route, label].append(seconds)
for number in range(300 + calls):
    if number == 300:
        found.clear()
    for route in (("counter", "livez") if number % 2 else ("livez", "counter")):
        call(route)
labels = sorted({label for _, label in found})
medians = {r: {l: statistics.median(found[r, l] or [0.0]) * 1e6 for l in labels} for r in routes}
print(json.dumps(medians))
"""


def request_phases(root: Path, env: dict[str, str] | None = None, calls: int = 6000, clock: str = "thread"):
    """Per-request CPU of the demo app in ``root`` (this tree, or a checkout of another commit), by
    phase, the counter route against /livez: ``{"counter": {phase: us}, "livez": {...}}``.  In-process,
    so without gunicorn's parsing and sending (the same for both routes) and without the cost of
    concurrency (threads, locks, the GIL); each timed phase carries the clock's own cost (about 1 us
    per call on a VM, where the thread CPU clock is a system call)."""
    with tempfile.TemporaryDirectory(prefix="bench-phases-") as scratch:
        metrics_dir = os.path.join(scratch, "metrics")
        os.makedirs(metrics_dir)
        child_env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            "TALLY_INSTANCE_PATH": os.path.join(scratch, "instance"),
            **(env or {}),
        }
        done = subprocess.run(
            [sys.executable, "-c", PHASES_CHILD, clock, str(calls)],
            cwd=root,
            env=child_env,
            capture_output=True,
            text=True,
            timeout=calls / 10 + 300,
        )
    if done.returncode != 0:
        raise RuntimeError(f"request_phases in {root} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def print_request_phases(roots: list[str], env: dict[str, str] | None = None, rounds: int = 3) -> None:
    """A Markdown table of ``request_phases`` for each tree in ``roots`` (medians of ``rounds`` runs,
    the trees alternated): ``python -c 'import sys; sys.path.insert(0, "bench"); import bench;
    bench.print_request_phases(["/tmp/before", "."])'``."""
    runs: dict[str, list] = {root: [] for root in roots}
    for round_ in range(rounds):
        for root in roots if round_ % 2 == 0 else roots[::-1]:
            runs[root].append(request_phases(Path(root), env))
    header = " | ".join(f"{root}: counter, /livez, difference" for root in roots)
    print(f"| phase (us of CPU per request) | {header} |")
    print("| --- |" + " ---: |" * len(roots))
    phases = sorted({phase for found in runs.values() for run in found for phase in run["counter"]})
    for phase in phases:
        cells = []
        for root in roots:
            counter = statistics.median(run["counter"].get(phase, 0.0) for run in runs[root])
            livez = statistics.median(run["livez"].get(phase, 0.0) for run in runs[root])
            cells.append(f"{counter:.1f}, {livez:.1f}, {counter - livez:+.1f}")
        print(f"| {phase} | " + " | ".join(cells) + " |")


def manager_rows(row, seconds: float, server: Manager) -> None:
    """The manager store's step next to the filesystem store's, in one process and in four on one
    counter (the issue's comparison: both are the zero-install answers for one host)."""
    from tally.stores.manager import ManagerCounterStore

    def make_store() -> ManagerCounterStore:
        return ManagerCounterStore(server.address, server.authkey.encode(), key_prefix="bench:", timeout=5.0)

    store = make_store()
    fs = FileCounterStore(tempfile.mkdtemp(prefix="bench-fs-vs-manager-"))
    manager_rate, fs_rate = rate(lambda: store.add("c", 1), seconds), rate(lambda: fs.add("c", 1), seconds)
    row(
        "manager helper incr, 1 process",
        manager_rate,
        "ops/s",
        "filesystem helper incr",
        f"{manager_rate / fs_rate:.2f}x",
    )
    manager_four = four_processes(make_store, seconds)
    fs_four = four_processes(
        partial(FileCounterStore, tempfile.mkdtemp(prefix="bench-fs4-vs-manager-")), seconds
    )
    row(
        "manager helper incr, 4 processes, one counter",
        manager_four,
        "ops/s (sum)",
        "filesystem, the same",
        f"{manager_four / fs_four:.2f}x",
    )
    row("manager update (shared value)", rate(lambda: store.update_value("v", append_one), seconds), "ops/s")
    store.close()


def append_one(data: bytes | None) -> bytes:
    return b"1" if data is None else str(int(data) + 1).encode()


def wrk_rate(url: str, method: str, seconds: int) -> float:
    """Requests/s that wrk (C, one thread, 32 keep-alive connections) gets from ``url``."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f'wrk.method = "{method}"\n')
    command = ["wrk", "-t1", "-c32", f"-d{seconds}s", "-s", script.name, url]
    output = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60).stdout
    os.unlink(script.name)
    if "Non-2xx" in output:
        raise RuntimeError(f"wrk got errors from {url}:\n{output}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))


def python_rate(url: str, method: str, seconds: int) -> float:
    """The same with tally.loadcheck's threads, where wrk is not installed (noisier, lower)."""
    return run_load(url, method=method, clients=32, requests=100_000, deadline=seconds).per_second


def paired(first: Callable[[], float], second: Callable[[], float], rounds: int):
    """Medians of ``first()`` and ``second()`` and of their ratio, measured in adjacent pairs whose
    order alternates, so that the machine's drifts and the order of runs cancel out."""
    result = paired_measurements(first, second, rounds)
    return result.first, result.second, result.ratio


def workers_cpu_seconds(master_pid: int) -> float:
    """CPU seconds (user + system) used so far by the worker processes of a gunicorn master."""
    total = 0
    children = subprocess.run(["pgrep", "-P", str(master_pid)], capture_output=True, text=True)
    for pid in children.stdout.split():
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Worker CPU per request of each kind of run, summed over the runs (``measure`` wrapped)."""

    def __init__(self, measure: Callable[[str, str, int], float], seconds: int) -> None:
        self.measure = measure
        self.seconds = seconds
        self.totals: dict[str, list[float]] = {}

    def run(self, kind: str, server: Gunicorn, path: str, method: str) -> float:
        before = workers_cpu_seconds(server.process.pid)
        per_second = self.measure(f"{server.url}{path}", method, self.seconds)
        total = self.totals.setdefault(kind, [0.0, 0.0])
        total[0] += workers_cpu_seconds(server.process.pid) - before
        total[1] += per_second * self.seconds
        return per_second

    def per_request_us(self, kind: str) -> float:
        cpu_seconds, requests = self.totals[kind]
        return cpu_seconds / requests * 1e6


def compare_routes(first: tuple, second: tuple, rounds: int, seconds: int) -> dict[str, float]:
    """Two routes, each ``(server, path, method)``, measured in alternated pairs of ``seconds`` runs:
    the medians of their req/s and of the pairs' ratio (first / second), and the workers' CPU per
    request of each, which a shared VM's wall-clock noise disturbs far less."""
    measure = wrk_rate if shutil.which("wrk") else python_rate
    for server in {first[0], second[0]}:
        measure(f"{server.url}/livez", "GET", 1)  # warm up every worker
    cpu = CpuMeter(measure, seconds)
    result = paired_measurements(lambda: cpu.run("first", *first), lambda: cpu.run("second", *second), rounds)
    return {
        "first": result.first,
        "second": result.second,
        "ratio": result.ratio,
        "ratio_low": result.ratios[0],
        "ratio_high": result.ratios[-1],
        "first_cpu_us": cpu.per_request_us("first"),
        "second_cpu_us": cpu.per_request_us("second"),
        "cpu_ratio": cpu.per_request_us("second") / cpu.per_request_us("first"),
    }


COUNTER_ROUTE = "/api/counters/bench/incr"


def http_pair(env: dict[str, str], rounds: int, seconds: int) -> tuple[dict[str, float], bool]:
    """Counter route vs the bare ``/livez`` of the same server (gunicorn 4x8); and whether 32
    clients x 30 increments came back exact first."""
    server = Gunicorn(env, workers=4, threads=8)
    try:
        server.start()
        check = run_load(f"{server.url}/api/counters/exact/incr", clients=32, requests=30)
        result = compare_routes((server, COUNTER_ROUTE, "POST"), (server, "/livez", "GET"), rounds, seconds)
        return result, check.passed(0)
    finally:
        server.stop()


def raw_route_pair(env: dict[str, str], raw_env: dict[str, str], rounds: int, seconds: int):
    """Tally's counter route vs the raw client's own increment in a bare Flask view
    (tests/naive_app.py ``/raw/<name>/incr``), each under gunicorn 4x8: what Tally's route costs
    beyond the store's round trip that any correct shared counter pays."""
    tally = Gunicorn(env, workers=4, threads=8)
    raw = Gunicorn(raw_env, workers=4, threads=8, app="naive_app:app", use_project_config=False)
    try:
        tally.start()
        raw.start()
        return compare_routes(
            (tally, COUNTER_ROUTE, "POST"), (raw, "/raw/bench-raw/incr", "POST"), rounds, seconds
        )
    finally:
        tally.stop()
        raw.stop()


#: A limit no bench run reaches: every request is a hit that passes, and is counted.
BENCH_LIMIT = "100000000 per minute"


def limited_pair(env: dict[str, str], other: dict[str, str], rounds: int, seconds: int) -> dict[str, float]:
    """The counter route with a rate limit on ``tally://`` (``env``) against the same route on a
    server whose environment adds ``other`` (no limit, or Flask-Limiter's own storage), each under
    gunicorn 4x8, alternated."""
    limited = {**env, "FLASK_RATELIMIT_ENABLED": "true", "FLASK_RATELIMIT_DEFAULT": BENCH_LIMIT}
    first = Gunicorn(limited, workers=4, threads=8)
    second = Gunicorn({**env, **other}, workers=4, threads=8)
    try:
        first.start()
        second.start()
        return compare_routes(
            (first, COUNTER_ROUTE, "POST"), (second, COUNTER_ROUTE, "POST"), rounds, seconds
        )
    finally:
        first.stop()
        second.stop()


def limits_rows(row, http_stores, peers: dict[str, str], rounds: int, seconds: int) -> None:
    """The limited route (tally://) against the same route unlimited, on every store; and against
    Flask-Limiter's own storage on the same servers (``peers``: store name -> storage URI)."""
    for name, env, _, _ in http_stores:
        env = {**env, "FLASK_COUNTER_DIR": tempfile.mkdtemp(prefix="bench-limits-")}
        unlimited = limited_pair(env, {"FLASK_RATELIMIT_ENABLED": "false"}, rounds, seconds)
        row(
            f"HTTP POST {COUNTER_ROUTE} limited on tally://, {name}",
            unlimited["first"],
            "req/s",
            "the same route unlimited",
            f"{unlimited['ratio']:.2f}x",
        )
        # limits' memory:// keeps a limit per worker (wrong across workers): what Flask-Limiter costs
        # with a storage that costs nearly nothing, for scale.
        per_worker = limited_pair(
            env,
            {
                "FLASK_RATELIMIT_ENABLED": "true",
                "FLASK_RATELIMIT_DEFAULT": BENCH_LIMIT,
                "FLASK_RATELIMIT_STORAGE_URI": "memory://",
            },
            rounds,
            seconds,
        )
        row(
            f"HTTP POST {COUNTER_ROUTE} limited on tally://, {name}",
            per_worker["first"],
            "req/s",
            "limited on memory:// (per worker: not a limit across workers)",
            f"{per_worker['ratio']:.2f}x",
        )
        if name not in peers:
            continue
        peer = {
            "FLASK_RATELIMIT_ENABLED": "true",
            "FLASK_RATELIMIT_DEFAULT": BENCH_LIMIT,
            "FLASK_RATELIMIT_STORAGE_URI": peers[name],
        }
        versus = limited_pair(env, peer, rounds, seconds)
        row(
            f"HTTP POST {COUNTER_ROUTE} limited on tally://, {name}",
            versus["first"],
            "req/s",
            f"limited on Flask-Limiter's {peers[name].split(':')[0]}://",
            f"{versus['ratio']:.2f}x",
            ">= 1.0x",
        )


# -- the issue-15 comparison: gunicorn -w 2 --threads 8 --keep-alive 5 on both sides -----------------

#: The same flags on every side of the 2x8 comparison.
FLAGS_2X8 = ["-w", "2", "--threads", "8", "--keep-alive", "5", "--no-control-socket"]
BENCH_DIR = ROOT / "bench"


class FlaggedGunicorn(Gunicorn):
    """gunicorn with FLAGS_2X8 on its command line.  Tally runs under the project's gunicorn.conf.py
    (its hooks are part of how it is served); the bare and peer apps under an empty config file, so
    that no hook of the demo's runs there (without ``-c``, gunicorn would read ./gunicorn.conf.py)."""

    def __init__(self, env: dict[str, str], app: str, config: Path) -> None:
        super().__init__(env, workers=2, threads=8, app=app)
        self.config = config

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "gunicorn", "-c", str(self.config), *FLAGS_2X8, "-b", self.address]
        if self.app.startswith("peer_app:"):
            command += ["--pythonpath", str(BENCH_DIR)]
        return [*command, self.app]


def request_latency(url: str, path: str, count: int) -> float:
    """Median seconds of ``count`` POSTs to ``path`` sent one after the other on one keep-alive
    connection: the latency of a request on an idle server."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    times = []
    try:
        for _ in range(count):
            began = time.perf_counter()
            connection.request("POST", path, headers={"Content-Length": "0"})
            response = connection.getresponse()
            response.read()
            times.append(time.perf_counter() - began)
            if response.status != 200:
                raise RuntimeError(f"{url}{path} answered {response.status}")
    finally:
        connection.close()
    return statistics.median(times)


def paired_latency(first: str, second: str, path: str, rounds: int, count: int) -> tuple[float, float, float]:
    """Idle latency of ``first`` and ``second`` (URLs), in adjacent alternated blocks of ``count``
    requests: medians of each and of the blocks' ratio first/second."""
    return paired(
        lambda: request_latency(first, path, count), lambda: request_latency(second, path, count), rounds
    )


def http_2x8(stores: list[tuple[str, dict[str, str], str, dict[str, str] | None]], rounds: int, seconds: int):
    """Rows of the 2x8 table.  ``stores``: (name, Tally's environment, target vs bare, the peer app's
    environment or None).  Per store: Tally vs the bare app; Tally vs the Flask-Caching ``inc`` route
    on the same server; on the stores that combine, Tally with COUNTER_COMBINE on vs off under load,
    and the idle latency of one request on vs off.  Every comparison: paired, alternated runs."""
    rows: list[tuple[str, str, str, str, str]] = []
    scratch = Path(tempfile.mkdtemp(prefix="bench-2x8-"))  # the empty config and the counters
    empty_config = scratch / "empty.conf.py"
    empty_config.write_text("")
    project_config = ROOT / "gunicorn.conf.py"
    bare = FlaggedGunicorn({}, "peer_app:bare", empty_config)
    started: list[Gunicorn] = [bare]
    try:
        bare.start()
        for name, env, target, peer_env in stores:
            # Counters of their own: the 4x8 table's exactness check starts again from 0 on the same servers.
            env = {
                **env,
                "FLASK_COUNTER_DIR": tempfile.mkdtemp(dir=scratch),
                "FLASK_COUNTER_KEY_PREFIX": f"http2x8-{os.getpid()}:",
            }
            tally = FlaggedGunicorn(env, "app:app", project_config)
            started.append(tally)
            tally.start()
            check = run_load(f"{tally.url}/api/counters/exact/incr", clients=32, requests=30)
            wrong = "" if check.passed(0) else " (VALUES WRONG)"
            versus_bare = compare_routes(
                (tally, COUNTER_ROUTE, "POST"), (bare, COUNTER_ROUTE, "POST"), rounds, seconds
            )
            rows.append(
                (f"2x8 bare Flask view ({name} run)", f"{versus_bare['second']:,.0f} req/s", "", "", "")
            )
            rows.append(
                (
                    f"2x8 Tally POST {COUNTER_ROUTE}, {name}{wrong}",
                    f"{versus_bare['first']:,.0f} req/s",
                    "bare Flask view, same flags",
                    f"{versus_bare['ratio']:.2f}x",
                    target,
                )
            )
            print(f"  2x8 {name}: {versus_bare['ratio']:.2f}x bare", file=sys.stderr)
            if peer_env is None:
                continue
            peer = FlaggedGunicorn(peer_env, "peer_app:app", empty_config)
            started.append(peer)
            peer.start()
            versus_peer = compare_routes(
                (tally, COUNTER_ROUTE, "POST"), (peer, COUNTER_ROUTE, "POST"), rounds, seconds
            )
            peer.stop()
            rows.append(
                (
                    f"2x8 Flask-Caching cache.cache.inc route, {name}",
                    f"{versus_peer['second']:,.0f} req/s",
                    "",
                    "",
                    "",
                )
            )
            rows.append(
                (
                    f"2x8 Tally POST {COUNTER_ROUTE}, {name}",
                    f"{versus_peer['first']:,.0f} req/s",
                    "Flask-Caching inc route, same store and flags",
                    f"{versus_peer['ratio']:.2f}x ({versus_peer['ratio_low']:.2f}-"
                    f"{versus_peer['ratio_high']:.2f}, {rounds} pairs)",
                    ">= 1.0x in every pair",
                )
            )
            print(f"  2x8 {name}: {versus_peer['ratio']:.2f}x Flask-Caching inc", file=sys.stderr)
            off = FlaggedGunicorn({**env, "FLASK_COUNTER_COMBINE": "false"}, "app:app", project_config)
            started.append(off)
            off.start()
            on_off = compare_routes(
                (tally, COUNTER_ROUTE, "POST"), (off, COUNTER_ROUTE, "POST"), rounds, seconds
            )
            rows.append(
                (f"2x8 Tally, {name}, COUNTER_COMBINE off", f"{on_off['second']:,.0f} req/s", "", "", "")
            )
            rows.append(
                (
                    f"2x8 Tally, {name}, COUNTER_COMBINE on (32 connections)",
                    f"{on_off['first']:,.0f} req/s",
                    "COUNTER_COMBINE off, under load",
                    f"{on_off['ratio']:.2f}x",
                    "> 1.0x to keep it",
                )
            )
            on_us, off_us, latency_ratio = paired_latency(tally.url, off.url, COUNTER_ROUTE, rounds, 300)
            off.stop()
            rows.append(
                (
                    f"2x8 Tally, {name}, one request on an idle server, COUNTER_COMBINE on",
                    f"{on_us * 1e6:,.0f} us",
                    f"COUNTER_COMBINE off: {off_us * 1e6:,.0f} us",
                    f"{latency_ratio:.2f}x",
                    "<= 1.05x (no idle cost)",
                )
            )
            print(
                f"  2x8 {name}: combining {on_off['ratio']:.2f}x under load,"
                f" {latency_ratio:.2f}x idle latency",
                file=sys.stderr,
            )
            tally.stop()
    finally:
        for server in started:
            server.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def machine() -> str:
    """The machine the figures come from: cores, CPU model, Python, and today's date."""
    model = platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()} cores ({model}), Python {platform.python_version()},"
        f" {datetime.date.today().isoformat()}"
    )


def write_chart(ratios: list[tuple[str, float, float | None, float]], rounds: int, path: Path) -> None:
    """Each store's counter route against the bare route and against the raw-client route, as a PNG
    readable in a narrow column (640 px wide).  ``ratios``: (store, vs bare, vs raw or None, target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 0.9 * len(ratios) + 1.4), dpi=100)
    height = 0.36
    bars = [("bare GET /livez, same server", "#4c72b0"), ("raw client's incr in a bare view", "#dd8452")]
    for index, (_store, bare, raw, target) in enumerate(ratios):
        for offset, (value, (_, colour)) in enumerate(zip((bare, raw), bars, strict=True)):
            y = index + (offset - 0.5) * height
            if value is None:
                axes.text(
                    0.02, y, "no raw-client route for this store", va="center", fontsize=8, color="grey"
                )
                continue
            axes.barh(y, value, height=height, color=colour)
            axes.text(value + 0.02, y, f"{value:.2f}x", va="center", fontsize=8)
        axes.plot([target, target], [index - height, index], color="black", linewidth=2)
    top = max([1.2] + [v * 1.15 for _, bare, raw, _ in ratios for v in (bare, raw) if v is not None])
    axes.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xlim(0, top)
    axes.set_yticks(range(len(ratios)), [store for store, *_ in ratios], fontsize=9)
    axes.invert_yaxis()
    axes.set_xlabel("counter route req/s ÷ compared route req/s (1.0: as fast)", fontsize=9)
    axes.tick_params(axis="x", labelsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for _, colour in bars]
    handles.append(plt.Line2D([0], [0], color="black", linewidth=2))
    labels = [f"vs {label}" for label, _ in bars] + ["target vs the bare route"]
    axes.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    axes.set_title(
        f"POST {COUNTER_ROUTE} under gunicorn 4x8, medians of {rounds} paired runs\n{machine()}",
        fontsize=9,
    )
    axes.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, bbox_inches="tight")  # the legend sits below the axes
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (noisier figures)")
    parser.add_argument(
        "--only",
        default="filesystem,memory,memcached,redis,redis-sentinel,redis-cluster,sqlite,postgresql,manager",
    )
    parser.add_argument(
        "--parts",
        default="helpers,scaling,http4x8,http2x8,limits",
        help="helpers (store steps), scaling (cost as the counters grow: bench/scaling.py; add"
        " 'million' to --only for 1,000,000 counters), http4x8 (the 4x8 HTTP table), http2x8 (the -w 2"
        " --threads 8 table), limits (the rate-limited route: tally:// against no limit and against"
        " Flask-Limiter's storage)",
    )
    parser.add_argument(
        "--chart",
        type=Path,
        default=None,
        help=f"PNG of the HTTP ratios (default {CHART}; none with --quick)",
    )
    args = parser.parse_args()
    chart = args.chart or (None if args.quick else CHART)
    chart_ratios: list[tuple[str, float, float | None, float]] = []
    only = set(args.only.split(","))
    parts = set(args.parts.split(","))
    seconds = 0.5 if args.quick else 1.5
    rounds, http_seconds = (2, 1) if args.quick else (10, 1)
    rows: list[tuple[str, str, str, str, str]] = []
    rows_2x8: list[tuple[str, str, str, str, str]] = []

    def row(what: str, figure: float, unit: str, compared: str = "", ratio: str = "", target: str = ""):
        rows.append((what, f"{figure:,.0f} {unit}", compared, ratio, target))
        print(f"  {what}: {figure:,.0f} {unit} {ratio}", file=sys.stderr)

    began = time.monotonic()
    memcached = Memcached(threads=1).start() if "memcached" in only else None
    redis_server = Redis(appendfsync="everysec").start() if "redis" in only else None
    postgres = Postgres().start() if "postgresql" in only else None
    manager_server = Manager().start() if "manager" in only else None
    sentinel, cluster = start_topologies(only)
    try:
        if "filesystem" in only and "helpers" in parts:
            fs = FileCounterStore(tempfile.mkdtemp(prefix="bench-fs-"))
            row(
                "filesystem helper incr, 1 process",
                rate(lambda: fs.add("c", 1), seconds),
                "ops/s",
                target=">= 100,000 ops/s",
            )
            row(
                "filesystem helper incr, 4 processes, one counter",
                four_processes(partial(FileCounterStore, tempfile.mkdtemp(prefix="bench-fs4-")), seconds),
                "ops/s (sum)",
            )
            row(
                "filesystem update (shared value)",
                rate(lambda: fs.update_value("v", append_one), seconds),
                "ops/s",
            )
        if "filesystem" in only and "helpers" in parts:
            library_row(row, seconds)
        if "memory" in only and "helpers" in parts:
            memory = MemoryCounterStore()
            row(
                "memory helper incr, 1 process (one process only)",
                rate(lambda: memory.add("c", 1), seconds),
                "ops/s",
            )
            row(
                "memory update (shared value)",
                rate(lambda: memory.update_value("v", append_one), seconds),
                "ops/s",
            )
        if memcached is not None and "helpers" in parts:
            store = MemcachedCounterStore([memcached.address], key_prefix="bench:")
            # The client the store wraps (pymemcache, with the same socket options), and pylibmc, the
            # C client it replaced (see tally/stores/memcached_client.py), for reference.
            raw = PymemcacheClient(parse_address(memcached.address), no_delay=True, default_noreply=False)
            c_client = pylibmc.Client([memcached.address], behaviors={"tcp_nodelay": True})
            raw.set("raw", b"1000")
            raw.set("raw-c", b"1000")
            references = [
                ("pymemcache", lambda: raw.incr("raw", 1), ">= 0.90x"),
                ("pylibmc", lambda: c_client.incr("raw-c", 1), "(reference)"),
            ]
            for client_name, raw_incr, target in references:
                helper_rate, raw_rate, ratio = interleaved(lambda: store.add("c", 1), raw_incr, seconds)
                row(f"memcached raw {client_name} incr (median call)", raw_rate, "ops/s")
                row(
                    f"memcached helper incr vs {client_name} (median call)",
                    helper_rate,
                    "ops/s",
                    f"raw {client_name} incr, call by call",
                    f"{ratio:.2f}x",
                    target,
                )
            row(
                "memcached update (gets/cas)",
                rate(lambda: store.update_value("v", append_one), seconds),
                "ops/s",
            )
        if redis_server is not None and "helpers" in parts:
            store = RedisCounterStore(redis_server.url, key_prefix="bench:")
            raw = redis.Redis.from_url(redis_server.url)
            helper_rate, raw_rate, ratio = interleaved(
                lambda: store.add("c", 1), lambda: raw.incrby("raw", 1), seconds
            )
            row("redis raw redis-py incrby (median call)", raw_rate, "ops/s")
            row(
                "redis helper incr (median call)",
                helper_rate,
                "ops/s",
                "raw redis-py incrby, call by call",
                f"{ratio:.2f}x",
                ">= 0.90x",
            )
            row(
                "redis update (compare-and-set script)",
                rate(lambda: store.update_value("v", append_one), seconds),
                "ops/s",
            )
        if ("sqlite" in only or postgres is not None) and "helpers" in parts:
            sql_rows(row, interleaved, four_processes, seconds, postgres, sqlite="sqlite" in only)
        if sentinel is not None and "helpers" in parts:
            sentinel_rows(row, interleaved, seconds, sentinel)
        if manager_server is not None and "helpers" in parts:
            manager_rows(row, seconds, manager_server)
        if "scaling" in parts:
            scaling_rows(row, seconds, only)
        if "helpers" in parts:  # counters.incr against the store's own add, on every other store
            for name, config in library_configs(
                only, memcached, redis_server, postgres, sentinel, manager_server
            ):
                library_row(row, seconds, name, config)
        http_stores = []  # (name, Tally's environment, target, the raw-client app's environment)
        if "filesystem" in only:
            http_stores.append(("filesystem", {"FLASK_CACHE_TYPE": "FileSystemCache"}, ">= 0.85x", None))
        if memcached is not None:
            pylibmc.Client([memcached.address]).set("bench-raw", b"0")
            http_stores.append(
                (
                    "memcached",
                    {
                        "FLASK_CACHE_TYPE": "MemcachedCache",
                        "FLASK_CACHE_MEMCACHED_SERVERS": f'["{memcached.address}"]',
                        "FLASK_COUNTER_KEY_PREFIX": f"http{os.getpid()}:",
                    },
                    ">= 0.85x",
                    {"NAIVE_MEMCACHED_SERVERS": memcached.address},
                )
            )
        if redis_server is not None:
            http_stores.append(
                (
                    "redis",
                    {
                        "FLASK_CACHE_TYPE": "RedisCache",
                        "FLASK_CACHE_REDIS_URL": redis_server.url,
                        "FLASK_COUNTER_KEY_PREFIX": f"http{os.getpid()}:",
                    },
                    ">= 0.75x",
                    {"NAIVE_REDIS_URL": redis_server.url},
                )
            )
        sql_http = {"FLASK_COUNTER_STORE": "sql", "FLASK_CACHE_TYPE": "FileSystemCache"}
        if "sqlite" in only:
            database = f"sqlite:///{tempfile.mkdtemp(prefix='bench-http-sql-')}/tally.db"
            http_stores.append(
                ("sqlite", {**sql_http, "FLASK_SQLALCHEMY_DATABASE_URI": database}, ">= 0.85x", None)
            )
        if postgres is not None:
            http_stores.append(
                ("postgresql", {**sql_http, "FLASK_SQLALCHEMY_DATABASE_URI": postgres.url}, ">= 0.75x", None)
            )
        if manager_server is not None:  # at the default socket: gunicorn's master starts the manager
            http_stores.append(("manager", {"FLASK_COUNTER_STORE": "manager"}, "", None))
        for name, env in http_environments(sentinel, cluster, f"http{os.getpid()}"):
            http_stores.append((name, env, "", None))
        if "http2x8" in parts:
            # Peers on the same servers as Tally (their own key prefix): Flask-Caching's inc route.
            peers = {}
            if memcached is not None:
                peers["memcached"] = {
                    "PEER_CACHE_TYPE": "MemcachedCache",
                    "PEER_MEMCACHED_SERVERS": memcached.address,
                }
            if redis_server is not None:
                peers["redis"] = {"PEER_CACHE_TYPE": "RedisCache", "PEER_REDIS_URL": redis_server.url}
            stores_2x8 = [
                (name, env, target, peers.get(name))
                for name, env, target, _ in http_stores
                if name in ("filesystem", "memcached", "redis")
            ]
            rows_2x8 = http_2x8(stores_2x8, rounds, http_seconds)
        if "limits" in parts:
            limit_peers = {}
            if memcached is not None:
                limit_peers["memcached"] = f"memcached://{memcached.address}"
            if redis_server is not None:
                limit_peers["redis"] = redis_server.url.rsplit("/", 1)[0] + "/5"
            limits_rows(row, http_stores, limit_peers, rounds, http_seconds)
        for name, env, target, raw_env in http_stores if "http4x8" in parts else []:
            env = {**env, "FLASK_COUNTER_DIR": tempfile.mkdtemp(prefix="bench-http-")}
            result, exact = http_pair(env, rounds, http_seconds)
            wrong = "" if exact else " (VALUES WRONG)"
            row(f"HTTP bare GET /livez ({name} config)", result["second"], "req/s")
            row(
                f"HTTP POST {COUNTER_ROUTE}, {name}{wrong}",
                result["first"],
                "req/s",
                "bare route",
                f"{result['ratio']:.2f}x",
                target,
            )
            row(f"worker CPU per request, bare route ({name} config)", result["second_cpu_us"], "us")
            row(
                f"worker CPU per request, counter route, {name}",
                result["first_cpu_us"],
                "us",
                "bare route (capacity = 1/CPU)",
                f"{result['cpu_ratio']:.2f}x",
                target,
            )
            if raw_env is None:
                if target:  # the stores the issue set a target for are charted
                    chart_ratios.append((name, result["ratio"], None, float(target.split()[1].rstrip("x"))))
                continue
            versus_raw = raw_route_pair(env, raw_env, rounds, http_seconds)
            chart_ratios.append(
                (name, result["ratio"], versus_raw["ratio"], float(target.split()[1].rstrip("x")))
            )
            row(f"HTTP raw-client route, {name} (bare view)", versus_raw["second"], "req/s")
            row(
                f"HTTP POST {COUNTER_ROUTE}, {name}",
                versus_raw["first"],
                "req/s",
                "raw-client route",
                f"{versus_raw['ratio']:.2f}x",
            )
            row(
                f"worker CPU per request, counter route vs raw-client route, {name}",
                versus_raw["first_cpu_us"],
                "us",
                f"raw-client route: {versus_raw['second_cpu_us']:,.0f} us",
                f"{versus_raw['cpu_ratio']:.2f}x",
            )
    finally:
        if memcached is not None:
            memcached.stop()
        if redis_server is not None:
            redis_server.remove()
        if postgres is not None:
            postgres.remove()
        if manager_server is not None:
            manager_server.remove()
        for topology in (sentinel, cluster):
            if topology is not None:
                topology.remove()

    print(
        f"\nTally bench: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.machine()}; HTTP: gunicorn 4 workers x 8 threads, "
        f"{'wrk' if shutil.which('wrk') else 'Python clients'} with 32 keep-alive connections, "
        f"medians of {rounds} alternated pairs of {http_seconds} s runs; "
        f"{time.monotonic() - began:.0f} s in all\n"
    )
    print("| measurement | figure | compared with | ratio | target |")
    print("| --- | ---: | --- | ---: | --- |")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    if rows_2x8:
        print(
            f"\nHTTP as in issue 15: gunicorn {' '.join(FLAGS_2X8[:6])} on every side (Tally under its"
            " gunicorn.conf.py, the bare and Flask-Caching apps (bench/peer_app.py) under an empty config),"
            f" {'wrk' if shutil.which('wrk') else 'Python clients'} with 32 keep-alive connections,"
            f" medians of {rounds} alternated pairs of {http_seconds} s runs; idle latency: medians of"
            f" {rounds} alternated blocks of 300 sequential requests on one connection\n"
        )
        print("| measurement | figure | compared with | ratio | target |")
        print("| --- | ---: | --- | ---: | --- |")
        for cells in rows_2x8:
            print("| " + " | ".join(cells) + " |")
    if chart is not None and chart_ratios:
        try:
            write_chart(chart_ratios, rounds, chart)
            print(f"chart: {chart}", file=sys.stderr)
        except ImportError:
            print("no chart: matplotlib is not installed (pip install -e '.[charts]')", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
